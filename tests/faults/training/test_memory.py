"""The memory guard (`robovqa_ft.memory`): a run near `model.max_memory_gb` saves and stops,
one over it stops without saving. On the CPU only: the guard's measurement is the host's
resident memory here; its CUDA path (`memory_reserved`, shared-memory GPUs) is untested."""

import logging
import tempfile

import pytest
from training_helpers import csv_rows, train_tiny
from transformers import TrainerControl, TrainerState

from robovqa_ft import memory
from robovqa_ft.checkpoints import COMPLETE_MARKER
from robovqa_ft.memory import MemoryGuard, host_memory_gb

STAGE = {"batch_size": 4, "grad_accum": 2, "max_frames": 4, "max_seq_len": 512}


def fake_memory(monkeypatch, per_step):
    """The guard measures `per_step(step)` GB at each step's end (its first call, at the
    training's start, is step 0)."""
    calls = []

    def measure(unified):
        calls.append(unified)
        return per_step(len(calls) - 1)

    monkeypatch.setattr(memory, "memory_in_use_gb", measure)
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
    monkeypatch.setattr("robovqa_ft.train.load_model", _must_not_load)
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
                            measure=lambda: next(feed))  # fmt: skip
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

    with caplog.at_level(logging.INFO, logger="robovqa_ft.memory"):
        guard = MemoryGuard({"max_memory_gb": None}, STAGE, "unused", measure=measure)
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
