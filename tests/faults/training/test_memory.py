"""The memory guard (`robovqa_ft.training.memory`): a run near `model.max_memory_gb` saves and
stops, one over it stops without saving. Runs on the CPU: whole trainings measure the host's
resident memory; the GPU readings are driven by a stand-in for torch's CUDA allocator."""

import logging
import tempfile
from types import SimpleNamespace

import pytest
import torch
from training_helpers import csv_rows, train_tiny
from transformers import TrainerControl, TrainerState

from robovqa_ft.training import memory
from robovqa_ft.training.checkpoints import COMPLETE_MARKER
from robovqa_ft.training.memory import GB, MemoryGuard, Reading, host_memory_gb
from robovqa_ft.training.metrics import MetricsLog

STAGE = {"batch_size": 4, "grad_accum": 2, "max_frames": 4, "max_seq_len": 512}


def fake_memory(monkeypatch, per_step):
    """The guard measures `per_step(step)` GB of host memory at each step's end (its first
    call, at the training's start, is step 0)."""
    calls = []

    def measure():
        calls.append(len(calls))
        return per_step(calls[-1])

    monkeypatch.setattr(memory, "host_memory_gb", measure)
    return calls


def checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))


def test_a_run_near_the_limit_saves_stops_non_zero_and_resumes_with_a_higher_one(
    tiny_setup, tmp_path, monkeypatch
):
    # 0.1 GB more at each step's end: after step 5 (1.5 GB), step 6 could reach 1.6.
    fake_memory(monkeypatch, lambda step: 1.0 + 0.1 * step)
    limit = {"max_memory_gb": 1.55}
    with pytest.raises(SystemExit) as stop:
        train_tiny(tiny_setup, tmp_path, model_settings=limit, max_steps=8, save_steps=2)
    message = str(stop.value.code)  # a str: Python prints it and exits with status 1
    assert message.startswith(
        "step 5: host resident memory reached 1.50 GB of model.max_memory_gb = 1.55 GB, "
        "and the next step could add 0.10 GB; saved checkpoint-5 in "
    )
    assert "raise model.max_memory_gb or set model.gradient_checkpointing: true" in message
    assert "micro-batch batch_size (now 4; raise grad_accum, now 2" in message
    assert "max_frames (now 4) or max_seq_len (now 512)" in message
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "checkpoints" / "checkpoint-5" / COMPLETE_MARKER).exists()
    assert not (tmp_path / "adapter").exists()

    # Snakemake's retry (train has `retries: 2`), or the same command, at the same limit
    # would take the step the guard stopped before: refused before anything loads.
    monkeypatch.setattr("robovqa_ft.training.train.load_model", _must_not_load)
    with pytest.raises(SystemExit) as again:
        train_tiny(tiny_setup, tmp_path, model_settings=limit, max_steps=8, save_steps=2)
    assert str(again.value.code).startswith(f"the memory guard stopped the last attempt: {message}")
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    monkeypatch.undo()

    fake_memory(monkeypatch, lambda step: 1.0 + 0.1 * step)  # a new process counts anew
    train_tiny(tiny_setup, tmp_path, model_settings={"max_memory_gb": 4.0}, max_steps=8,
               save_steps=2)  # fmt: skip
    assert "Resumed from checkpoint: step=5" in (tmp_path / "training.log").read_text()
    assert [int(r["step"]) for r in csv_rows(tmp_path / "train_metrics.csv")] == list(range(1, 9))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_crossing_the_limit_within_a_step_stops_non_zero_without_saving(
    tiny_setup, tmp_path, monkeypatch
):
    # Step 4, a save step, ends at 5 GB: over the limit, so not even its save happens.
    fake_memory(monkeypatch, lambda step: 5.0 if step == 4 else 1.0)
    with pytest.raises(SystemExit) as stop:
        train_tiny(tiny_setup, tmp_path, model_settings={"max_memory_gb": 2},
                   max_steps=8, save_steps=2)  # fmt: skip
    assert str(stop.value.code).startswith(
        "step 4: host resident memory reached 5.00 GB, over model.max_memory_gb = 2 GB, "
        "within this step; stopped without saving (a rerun resumes from checkpoint-2 in "
        f"{tmp_path / 'checkpoints'}). To resume from the last checkpoint, raise "
        "model.max_memory_gb"
    )
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    assert not (tmp_path / "adapter").exists()
    assert "memory guard: step 4:" in (tmp_path / "training.log").read_text()


def guard_steps(values, max_steps=10, limit=2.0, stage=STAGE):
    """A guard fed `values` (GB) at the ends of steps 1, 2, ...; the control of each step."""
    feed = iter([0.0, *values])
    with tempfile.TemporaryDirectory() as checkpoints:  # where a stop is remembered
        guard = MemoryGuard({"max_memory_gb": limit}, stage, checkpoints,
                            reading=Reading("memory", lambda: next(feed)))  # fmt: skip
        state, controls = TrainerState(max_steps=max_steps), []
        guard.on_train_begin(None, state, TrainerControl())
        for step in range(1, len(values) + 1):
            state.global_step, control = step, TrainerControl()
            guard.on_step_end(None, state, control)
            controls.append(control)
    return guard, controls


def test_the_headroom_is_the_largest_growth_seen_not_the_last():
    # +0.3 at step 2, then less: at 1.75 GB the next step could still add 0.3.
    guard, controls = guard_steps([1.0, 1.3, 1.5, 1.6, 1.75])
    assert [c.should_save for c in controls] == [False, False, False, False, True]
    assert controls[-1].should_training_stop
    assert "could add 0.30 GB" in guard.stop_message


def test_the_first_steps_rise_from_the_loaded_model_is_not_growth():
    # 0 GB loaded, 1.5 GB after step 1: set-up, so 1.5 GB is no headroom.
    _, controls = guard_steps([1.5, 1.5, 1.5])
    assert not any(c.should_save or c.should_training_stop for c in controls)


def test_near_the_limit_on_the_last_step_nothing_stops():
    guard, controls = guard_steps([1.0, 1.2, 1.9], max_steps=3)
    assert not controls[-1].should_training_stop and guard.stop_message is None


def test_every_rank_stops_when_any_rank_is_near_the_limit(monkeypatch):
    # This rank measures 1 GB; another 1.99 GB: the highest of each decides on both.
    monkeypatch.setattr(memory.ranks, "highest", lambda values: [1.99, values[1]])
    guard, controls = guard_steps([1.0])
    assert controls[0].should_save and controls[0].should_training_stop
    assert "reached 1.99 GB" in guard.stop_message


def test_without_a_limit_nothing_is_measured_and_that_is_logged_once(caplog):
    def measure():
        raise AssertionError("measured with no limit")

    with caplog.at_level(logging.INFO, logger="robovqa_ft.training.memory"):
        guard = MemoryGuard({"max_memory_gb": None}, STAGE, "unused",
                            reading=Reading("memory", measure))  # fmt: skip
        state, control = TrainerState(max_steps=3, global_step=1), TrainerControl()
        guard.on_train_begin(None, state, control)
        guard.on_step_end(None, state, control)
    assert caplog.messages == ["model.max_memory_gb is not set: no memory guard"]
    assert not control.should_training_stop


def test_the_host_measurement_counts_a_peak_freed_before_the_steps_end():
    host_memory_gb()  # the mark starts from here
    block = bytearray(256 * 2**20)  # zero-filled: every page touched
    del block
    peak = host_memory_gb()
    after = host_memory_gb()
    assert peak - after > 0.2  # the freed 256 MB counted once, then the mark was reset


class FakeAllocator:
    """A stand-in for torch's CUDA caching allocator, in GB. A step allocates `need` on
    top of what stays allocated (the model) and frees it at its end, but the allocator
    keeps the freed blocks, up to its cap: batches of other shapes fit no cached block, so
    its reserved memory climbs toward the cap while what any step needed stays low."""

    def __init__(self, cap: float, kept: float):
        self.cap, self.allocated = cap * GB, kept * GB
        self.reserved = self.peak = self.allocated
        self.resets = 0

    def step(self, need: float) -> None:
        self.peak = max(self.peak, self.allocated + need * GB)
        self.reserved = min(self.cap, self.reserved + need * GB)

    def reset_peak_memory_stats(self, device=None) -> None:
        self.resets += 1
        self.peak = self.allocated


def fake_gpu(monkeypatch, allocator: FakeAllocator, integrated: bool) -> None:
    """This process on one GPU, of its own memory or sharing the host's (`integrated`),
    whose CUDA allocator is `allocator`."""
    properties = SimpleNamespace(is_integrated=integrated, total_memory=allocator.cap)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: allocator.reserved)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator.peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", allocator.reset_peak_memory_stats)


def guard_on_gpu(allocator, needs, limit=8.0, max_steps=20):
    """The guard, measuring for itself, over steps that each need `needs[i]` GB more than
    the model; the step it stopped at (None: it did not) and its stop message."""
    with tempfile.TemporaryDirectory() as checkpoints:
        guard = MemoryGuard({"max_memory_gb": limit}, STAGE, checkpoints)
        state = TrainerState(max_steps=max_steps)
        guard.on_train_begin(None, state, TrainerControl())
        for step, need in enumerate(needs, 1):
            allocator.step(need)
            state.global_step, control = step, TrainerControl()
            guard.on_step_end(None, state, control)
            if control.should_training_stop:
                return step, guard.stop_message
    return None, guard.stop_message


# Batches of varying length: 0.5 to 1.5 GB of activations over a 3 GB model.
VARYING_NEEDS = [0.5, 1.5, 0.8, 1.2, 0.6, 1.4, 1.0, 0.7, 1.3, 0.9, 1.1, 0.5]


def test_on_a_gpu_of_its_own_cached_blocks_do_not_stop_a_run_whose_steps_need_little(
    monkeypatch,
):
    allocator = FakeAllocator(cap=8.0, kept=3.0)  # load_model caps CUDA at the limit
    fake_gpu(monkeypatch, allocator, integrated=False)
    stopped_at, message = guard_on_gpu(allocator, VARYING_NEEDS, limit=8.0)
    assert stopped_at is None, message  # no step needed more than 4.5 GB ...
    assert allocator.reserved == 8.0 * GB  # ... of all the allocator holds, by design
    assert allocator.resets == 1 + len(VARYING_NEEDS)  # at the start and after each step


def test_on_a_gpu_sharing_the_hosts_memory_reserved_and_host_memory_stop_the_run(monkeypatch):
    # Unified memory (DGX Spark): the allocator's cached blocks are taken from the host,
    # whose processes can then thrash, so what it holds counts with the resident pages.
    allocator = FakeAllocator(cap=8.0, kept=3.0)
    fake_gpu(monkeypatch, allocator, integrated=True)
    monkeypatch.setattr(memory, "host_memory_gb", lambda: 2.5)
    stopped_at, message = guard_on_gpu(allocator, VARYING_NEEDS, limit=8.0)
    assert stopped_at == 2, message  # 5 GB reserved + 2.5 resident, and 1.5 could follow
    assert message.startswith("step 2: host resident + CUDA reserved memory reached 7.50 GB")
    assert allocator.resets == 0  # the allocator's peak is not what is watched here


def test_on_a_gpu_of_its_own_a_step_whose_peak_nears_the_limit_stops_the_run(monkeypatch):
    allocator = FakeAllocator(cap=8.0, kept=3.0)
    fake_gpu(monkeypatch, allocator, integrated=False)
    # Peaks of 4, 5, 6 and 7 GB allocated: 4.4 ... 7.7 GB with the fragmentation margin.
    stopped_at, message = guard_on_gpu(allocator, [1.0, 2.0, 3.0, 4.0], limit=8.0)
    assert stopped_at == 4
    assert message.startswith(
        "step 4: CUDA peak allocated memory per step reached 7.00 GB (7.70 GB with 10% for "
        "fragmentation) of model.max_memory_gb = 8 GB, and the next step could add 1.00 GB"
    )


@pytest.mark.parametrize("last", [False, True])
def test_on_a_gpu_of_its_own_a_step_within_the_margin_of_the_cap_finished_and_is_saved(
    monkeypatch, last
):
    # A 7.5 GB peak under an 8 GB cap: the step ran (the cap would have failed it), so it
    # is no crossing: save and stop before the next, or, at the last step, simply finish.
    allocator = FakeAllocator(cap=8.0, kept=3.0)
    fake_gpu(monkeypatch, allocator, integrated=False)
    stopped_at, message = guard_on_gpu(allocator, [4.5], limit=8.0, max_steps=1 if last else 20)
    assert (stopped_at, message is None) == ((None, True) if last else (1, False)), message


def test_the_logged_peak_memory_is_the_runs_highest_though_the_guard_resets_it_each_step(
    monkeypatch, tmp_path
):
    allocator = FakeAllocator(cap=8.0, kept=3.0)
    fake_gpu(monkeypatch, allocator, integrated=False)
    monkeypatch.setattr(memory, "_highest_step_peak", 0)  # this test's steps only
    guard_on_gpu(allocator, [2.0, 0.5])  # 5 GB at step 1, then 3.5: the last reset
    metrics = MetricsLog(tmp_path, resumed_step=0, eval_samples=0)
    assert metrics.figures()["peak_memory_gb"] == 5.0
