"""Several training processes (torchrun, gloo on the CPU) against one: the same recipe,
the same samples in each step, and the same crash safety."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
from training_helpers import (
    adapter_weights,
    csv_rows,
    max_difference,
    train_tiny,
    wait_for,
    with_unfit_rows,
)

from robovqa_ft.training.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint
from robovqa_ft.training.launch import check_given_gpus, train_job
from robovqa_ft.training.steps import StepSampler

pytestmark = pytest.mark.slow  # two training processes (torchrun, gloo) in every test

TESTS = Path(__file__).parent
# No LoRA dropout: its masks are drawn per process, so they differ between 1 and 2.
RECIPE = {"lora": {"dropout": 0.0}, "stage": {"batch_size": 2, "grad_accum": 4}}

LAUNCHER = """
import json, sys
sys.path.insert(0, {tests!r})
from training_helpers import run_settings
from robovqa_ft.training.launch import train_job
from robovqa_ft.core.logs import log_to
args = json.loads(sys.argv[1])
with log_to(args["log"]):
    train_job(args["processes"], args["processes"], 2,
              {{**args["paths"], **run_settings(args["model"], **args["settings"])}})
"""

# Imported by every Python process of a test that sets SLOW_RANK1_SAVE: rank 1 writes its
# part of each checkpoint late, so a marker written without waiting for it would show.
SLOW_SAVE = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("SLOW_RANK1_SAVE"):
    import time, torch
    _save = torch.save
    def _slow_save(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_RANK1_SAVE"]))
        return _save(*args, **kwargs)
    torch.save = _slow_save
"""


def launch(setup, out: Path, processes: int, env=None, **settings) -> subprocess.Popen:
    """The training job's launcher (as the workflow script runs it) in a process of its
    own, so that tests can signal it; its log is out/job.log."""
    paths = {
        "train_jsonl": str(setup["stage1_train"]),
        "val_jsonl": str(setup["stage1_val"]),
        "images_dir": str(setup["images"]),
        "adapter_dir": str(out / "adapter"),
        "run_dir": str(out),
        "checkpoint_dir": str(out / "checkpoints"),
    }
    out.mkdir(parents=True, exist_ok=True)
    args = {"paths": paths, "model": str(setup["model"]), "settings": settings,
            "processes": processes, "log": str(out / "job.log")}  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER.format(tests=str(TESTS)), json.dumps(args)],
        env={**clean, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def succeeded(process: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    assert process.wait(timeout=timeout) == 0, (out / "job.log").read_text()[-5000:]


def processes_of(out: Path) -> list[int]:
    """Live processes whose command line names `out` (launcher, torchrun, workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def rank_pid(out: Path, rank: int) -> int:
    for pid in processes_of(out):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} process for {out}")


def none_left(out: Path, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not processes_of(out)


def step_samples(processes: int, lengths=None, batch_size=2, grad_accum=4) -> list[set]:
    """Which samples make each optimizer step when accelerate deals the sampler's
    micro-batches to `processes` ranks (as the Trainer does)."""
    step = batch_size * grad_accum
    sampler = StepSampler(45, step, seed=1, lengths=lengths, batch_size=batch_size,
                          ranks=processes)  # fmt: skip
    per_rank = grad_accum // processes
    steps = [set() for _ in range(sampler.steps)]
    for rank in range(processes):
        micro = list(BatchSamplerShard(BatchSampler(sampler, batch_size, False), processes, rank))
        for k in range(sampler.steps):
            for batch in micro[k * per_rank : (k + 1) * per_rank]:
                steps[k].update(batch)
    return steps


@pytest.mark.parametrize("grouped", [False, True])
def test_each_optimizer_step_holds_the_same_samples_on_one_two_or_four_processes(grouped):
    lengths = [(i * 37) % 101 for i in range(45)] if grouped else None
    one = step_samples(1, lengths)
    assert len(one) == 5 and all(len(step) == 8 for step in one)  # 5 whole steps of 45
    assert step_samples(2, lengths) == one
    assert step_samples(4, lengths) == one


def test_grouped_steps_deal_the_longest_micro_batches_to_alternating_ranks():
    lengths = list(range(100, 116))  # all distinct
    sampler = StepSampler(16, 16, seed=0, lengths=lengths, batch_size=2, ranks=2)
    micro = [list(BatchSamplerShard(BatchSampler(sampler, 2, False), 2, r)) for r in (0, 1)]
    longest = [[max(lengths[i] for i in batch) for batch in m] for m in micro]
    # Rounds of micro-batches, sorted longest first: rank 0 gets the 1st, 4th, 5th, 8th.
    assert longest[0] == [115, 109, 107, 101] and longest[1] == [113, 111, 105, 103]


def test_a_capped_gpu_count_stops_the_job_naming_the_flag():
    check_given_gpus(2, 2)
    with pytest.raises(SystemExit, match="pass --resources gpu=4"):
        check_given_gpus(1, 4)


def test_a_process_count_that_does_not_divide_grad_accum_stops_before_loading(tmp_path):
    run = {"stage": {"grad_accum": 3}, "model": {"name": str(tmp_path / "missing")}}
    with pytest.raises(ValueError, match="grad_accum 3 does not divide over 2 processes"):
        train_job(2, 2, 2, run)


@pytest.mark.parametrize("layout", ["separate", "tree"])
def test_two_processes_give_the_one_process_adapter_writing_each_file_once(
    tiny_setup, tmp_path, layout
):
    recipe = {**RECIPE, "stage": {**RECIPE["stage"], "layout": layout}}
    one = adapter_weights(train_tiny(tiny_setup, tmp_path / "one", max_steps=6, **recipe))
    out = tmp_path / "two"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_SAVE)
    env = {"PYTHONPATH": str(tmp_path / "site"), "SLOW_RANK1_SAVE": "1.0"}
    succeeded(launch(tiny_setup, out, 2, env=env, max_steps=6, save_steps=3, **recipe), out)

    two = adapter_weights(out / "adapter")
    assert max_difference(two, one) < 1e-5
    assert max(w.abs().max().item() for w in two.values()) > 1e-3  # it did train
    rows = csv_rows(out / "train_metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # one row per step
    assert all(int(r["samples"]) == 8 for r in rows)  # both ranks' samples: the global batch
    # The loss is divided by both ranks' labelled tokens and scaled back for DDP's mean:
    # a wrong scale would hardly move Adam's adapter, but it moves the loss and the norm.
    single = csv_rows(tmp_path / "one" / "train_metrics.csv")
    for row, alone in zip(rows, single, strict=True):
        assert float(row["loss"]) == pytest.approx(float(alone["loss"]), rel=1e-5)
        assert float(row["grad_norm"]) == pytest.approx(float(alone["grad_norm"]), rel=1e-4)
    # The periodic val loss: each rank's share of the val set, its sums added up.
    evals = [csv_rows(folder / "eval_metrics.csv") for folder in (out, tmp_path / "one")]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] != []
    for row, alone in zip(*evals, strict=True):
        assert row["eval_tokens"] == alone["eval_tokens"]
        assert float(row["eval_loss"]) == pytest.approx(float(alone["eval_loss"]), rel=1e-5)
    log = (out / "training.log").read_text()
    assert log.count("Training with 2 processes") == 1
    assert log.count("adapter written") == 1
    assert not list(out.glob(".adapter.*")), "a second write left its temporary folder"
    for step in (3, 6):
        marked = (out / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER).read_text()
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                     "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"):  # fmt: skip
            assert name in marked.split(), f"checkpoint-{step} was marked before {name} existed"


def test_a_killed_two_process_run_resumes_in_epoch_two_exactly_on_two_or_one(tiny_setup, tmp_path):
    # 96 samples, 8 a step: 12 steps an epoch, 24 in all; killed after step 16.
    settings = {**RECIPE, "stage": {**RECIPE["stage"], "epochs": 2}, "max_steps": -1,
                "save_steps": 4}  # fmt: skip
    reference = launch(tiny_setup, tmp_path / "reference", 2, **settings)
    succeeded(reference, tmp_path / "reference")
    expected = adapter_weights(tmp_path / "reference" / "adapter")

    killed = tmp_path / "killed"
    process = launch(tiny_setup, killed, 2, **settings)
    wait_for(killed / "checkpoints" / "checkpoint-16" / COMPLETE_MARKER, process, seconds=300)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert none_left(killed), "training processes outlived their launcher"
    saved = latest_complete_checkpoint(killed / "checkpoints")
    assert 12 < int(saved.name.split("-")[1]) < 24  # mid second epoch
    assert not (killed / "adapter").exists()
    on_one = tmp_path / "on_one"
    shutil.copytree(killed, on_one)

    succeeded(launch(tiny_setup, killed, 2, **settings), killed)
    assert (
        f"Resumed from checkpoint: step={saved.name.split('-')[1]}"
        in (killed / "training.log").read_text()
    )
    assert max_difference(adapter_weights(killed / "adapter"), expected) < 1e-6
    steps = [int(r["step"]) for r in csv_rows(killed / "train_metrics.csv")]
    assert steps == list(range(1, 25)), "rows past the checkpoint are logged once, not twice"

    succeeded(launch(tiny_setup, on_one, 1, **settings), on_one)
    assert "Training with 1 processes" in (on_one / "training.log").read_text()
    assert max_difference(adapter_weights(on_one / "adapter"), expected) < 1e-5


def test_sigterm_stops_both_ranks_at_one_step_with_a_checkpoint_to_resume(tiny_setup, tmp_path):
    settings = {**RECIPE, "max_steps": 40, "save_steps": 1000}
    process = launch(tiny_setup, tmp_path, 2, **settings)
    wait_for(tmp_path / "train_metrics.csv", process, seconds=300)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    assert none_left(tmp_path)
    saved = latest_complete_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and (saved / "rng_state_1.pth").exists()
    step = int(saved.name.split("-")[1])
    assert step < 40 and not (tmp_path / "adapter").exists()
    job_log = (tmp_path / "job.log").read_text()
    # by level and message: which module logs it is no part of the log's format
    stops = re.findall(r"(rank 1 )?WARNING \S+: stopping at step (\d+)", job_log)
    assert sorted(stops) == [("", str(step)), ("rank 1 ", str(step))], job_log[-3000:]

    succeeded(launch(tiny_setup, tmp_path, 2, **settings), tmp_path)
    assert f"Resumed from checkpoint: step={step}" in (tmp_path / "training.log").read_text()
    assert [int(r["step"]) for r in csv_rows(tmp_path / "train_metrics.csv")] == list(range(1, 41))


def test_a_stuck_rank_ends_the_job_within_the_hang_timeout(tiny_setup, tmp_path):
    settings = {**RECIPE, "max_steps": 400, "save_steps": 1000, "hang_timeout_minutes": 0.3,
                "stop_grace_seconds": 5}  # fmt: skip
    process = launch(tiny_setup, tmp_path, 2, **settings)
    wait_for(tmp_path / "train_metrics.csv", process, seconds=300)
    os.kill(rank_pid(tmp_path, 1), signal.SIGSTOP)  # alive, but never answers again
    stuck = time.monotonic()
    assert process.wait(timeout=120) != 0
    # The timeout, then torchrun's 30 s for the other ranks to exit, and slack for the CPU.
    assert time.monotonic() - stuck < 18 + 30 + 30
    assert none_left(tmp_path)
    assert "Timed out" in (tmp_path / "job.log").read_text()


def test_micro_batches_in_which_nothing_fits_keep_two_processes_equal_to_one(tiny_setup, tmp_path):
    # Most rows fit nothing: some micro-batches of a rank are stand-ins with nothing to
    # learn, while the other rank's are real; DDP must still meet in every step.
    unfit = with_unfit_rows(tiny_setup["stage1_train"], tmp_path / "unfit.jsonl", every=1)
    rows = unfit.read_text().splitlines()
    short = tiny_setup["stage1_train"].read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    kept = [s if i % 4 == 0 else u for i, (s, u) in enumerate(zip(short, rows, strict=True))]
    mixed.write_text("".join(f"{line}\n" for line in kept))
    setup = {**tiny_setup, "stage1_train": mixed}
    one = adapter_weights(train_tiny(setup, tmp_path / "one", max_steps=4, **RECIPE))
    out = tmp_path / "two"
    succeeded(launch(setup, out, 2, max_steps=4, **RECIPE), out)
    assert max_difference(adapter_weights(out / "adapter"), one) < 1e-5
    two, alone = (
        csv_rows(out / "train_metrics.csv"),
        csv_rows(tmp_path / "one" / "train_metrics.csv"),
    )
    assert [r["skipped_samples"] for r in two] == [r["skipped_samples"] for r in alone]
    assert sum(int(r["skipped_samples"]) for r in two) > 8  # stand-ins were made
    for row, single in zip(two, alone, strict=True):
        assert float(row["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
