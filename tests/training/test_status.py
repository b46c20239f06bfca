"""The status command (robovqa_ft/tools/status.py) on a finished, a running and a crashed run,
from the files a training leaves (its heartbeat, from robovqa_ft/training/curves.py), without
touching the checkpoint lock; and the training log's progress line."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_helpers import csv_rows, run_settings

from robovqa_ft.core.logs import ATTEMPT_START, FORMAT, PACKAGE_LOGGER, line_format
from robovqa_ft.core.runs import HEARTBEAT
from robovqa_ft.tools.status import (
    FAILED,
    FINISHED,
    TRAINING,
    last_attempt_error,
    run_status,
    status_report,
)
from robovqa_ft.training.checkpoints import COMPLETE_MARKER, LOCK_FILE
from robovqa_ft.training.train import log as train_log
from robovqa_ft.training.train import train_run

ROOT = Path(__file__).resolve().parents[2]
RUN = "stage1"

DRIVER = """
import json, logging, sys
sys.path.insert(0, {tests!r})
from training_helpers import run_settings
from robovqa_ft.core.logs import FORMAT
from robovqa_ft.training.train import train_run
logging.basicConfig(level=logging.INFO, format=FORMAT)
args = json.loads(sys.argv[1])
train_run(**args["paths"], **run_settings(args["model"], **args["training"]))
"""


def run_paths(setup: dict, work: Path) -> dict:
    """`train_run`'s paths for `RUN` in the workflow directory `work`, as the rule has them."""
    return {
        "train_jsonl": str(setup["stage1_train"]),
        "val_jsonl": str(setup["stage1_val"]),
        "images_dir": str(setup["images"]),
        "adapter_dir": str(work / "results" / RUN / "adapter"),
        "run_dir": str(work / "results" / RUN),
        "checkpoint_dir": str(work / "results" / "checkpoints" / RUN),
    }


@pytest.fixture(scope="module")
def finished(tiny_setup, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    training = {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "report_to": ["tensorboard"]}
    train_run(**run_paths(tiny_setup, work), **run_settings(tiny_setup["model"], **training))
    return work


def heartbeat(work: Path) -> dict:
    return json.loads((work / "results" / RUN / HEARTBEAT).read_text())


def test_a_finished_run_shows_its_last_step_losses_checkpoint_and_curves(finished):
    run_dir = finished / "results" / RUN
    status = run_status(finished, RUN)
    assert status.state == FINISHED and (status.step, status.total) == (4, 4)
    assert status.loss == pytest.approx(float(csv_rows(run_dir / "train_metrics.csv")[-1]["loss"]))
    evals = csv_rows(run_dir / "eval_metrics.csv")
    assert status.val_loss == pytest.approx(float(evals[-1]["eval_loss"]))
    assert status.samples_per_s > 0 and status.checkpoint_step == 4 and status.eta is None
    report = status_report(finished)
    lines = report.splitlines()
    assert lines[0].split() == ["run", "state", "step", "loss", "val", "loss", "samples/s",
                                "last", "checkpoint", "ETA", "evaluation"]  # fmt: skip
    assert re.match(r"stage1 +finished +4/4 +\d+\.\d{3} +\d+\.\d{3} ", lines[1]), lines[1]
    assert lines[2].split()[:2] == ["stage2", "not"] and lines[4].split()[:2] == ["base", "–"]
    assert lines[-1] == f"TensorBoard: tensorboard --logdir {finished / 'results'}"


def test_the_training_log_shows_step_total_and_eta_at_each_logging_step(finished):
    log = (finished / "results" / RUN / "training.log").read_text()
    progress = re.findall(r"step (\d+)/4 \(\d+%\): loss [\d.]+.*, ETA (\w+)", log)
    assert [int(step) for step, _ in progress] == [1, 2, 3, 4]
    assert progress[-1][1] == "0s"


def test_nothing_run_yet_is_not_started_and_names_no_curves(tmp_path):
    report = status_report(tmp_path)
    assert [line.split()[1:3] for line in report.splitlines()[1:4]] == [["not", "started"]] * 3
    assert "TensorBoard" not in report


def _as_if(finished: Path, tmp_path: Path, **beat) -> Path:
    """A copy of the finished run's files without its adapter, its heartbeat changed."""
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    shutil.rmtree(work / "results" / RUN / "adapter")
    path = work / "results" / RUN / HEARTBEAT
    path.write_text(json.dumps({**json.loads(path.read_text()), **beat}))
    return work


def test_a_run_on_another_node_is_training_while_its_heartbeat_is_fresh(finished, tmp_path):
    now = time.time()
    work = _as_if(finished, tmp_path, host="elsewhere", step=2, eta_seconds=100.0,
                  updated=now - 10, longest_gap_seconds=600.0)  # fmt: skip
    status = run_status(work, RUN, now=now)
    assert status.state == TRAINING and status.step == 2 and status.eta == pytest.approx(90)
    # silent for longer than 3 × its longest gap (and 15 min): failed, and why
    later = run_status(work, RUN, now=now + 3 * 600 + 1)
    assert later.state == FAILED and later.eta is None
    assert later.note.startswith("no heartbeat for 30m") and "from elsewhere" in later.note


# The logger that wrote "Training with": today's module, the one before the package had
# subpackages (a log written then is read the same), and any later one.
TRAINING_LOGGERS = ["robovqa_ft.training.train", "robovqa_ft.train", "robovqa_ft.somewhere.else"]


@pytest.mark.parametrize("logger", TRAINING_LOGGERS)
def test_a_failed_attempt_shows_the_error_its_job_log_ends_with(finished, tmp_path, logger):
    gone = subprocess.Popen(["true"])
    gone.wait()
    work = _as_if(finished, tmp_path, pid=gone.pid)
    job_log = work / "logs" / "train" / f"{RUN}.log"
    job_log.parent.mkdir(parents=True)
    job_log.write_text(
        f"2026-12-02 10:00:00,000 INFO {logger}: Training with 1 processes; …\n"
        "2026-12-02 10:05:00,000 ERROR robovqa_ft: CUDA out of memory (traceback in x.log)\n"
        "Traceback (most recent call last):\n"
    )
    status = run_status(work, RUN)
    assert (status.state, status.note) == (FAILED, "CUDA out of memory (traceback in x.log)")
    assert "stage1 failed: CUDA out of memory" in status_report(work)
    with job_log.open("a") as handle:  # a retry that started: no longer that error
        handle.write(f"2026-12-02 10:06:00,000 INFO {logger}: Training with 1 processes\n")
    assert "is gone" in run_status(work, RUN).note


def test_the_attempt_line_is_the_one_training_logs(tmp_path):
    """What status looks for is what the job writes, through the real log format: the
    job's last words from the package's logger, the attempt's start from train_run's."""
    job_log = tmp_path / "job.log"
    handler = logging.FileHandler(job_log)
    handler.setFormatter(logging.Formatter(FORMAT))
    package = logging.getLogger(PACKAGE_LOGGER)
    package.addHandler(handler)
    level, package.level = package.level, logging.INFO  # a job logs at INFO (log_to)
    try:
        package.error("CUDA out of memory")
        assert last_attempt_error(job_log) == "CUDA out of memory"
        train_log.info(ATTEMPT_START + "%d processes; base model %s at revision %s", 2, "m", "r")
        assert last_attempt_error(job_log) is None
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


@pytest.mark.slow
def test_a_running_then_killed_training_is_training_then_failed(tiny_setup, tmp_path):
    work = tmp_path / "work"
    training = {"max_steps": 400, "save_steps": 2, "eval_steps": 1000}
    args = json.dumps({"paths": run_paths(tiny_setup, work), "model": str(tiny_setup["model"]),
                       "training": training})  # fmt: skip
    code = DRIVER.format(tests=str(Path(__file__).parent))
    job_log = work / "logs" / "train" / f"{RUN}.log"
    job_log.parent.mkdir(parents=True)
    with job_log.open("w") as log:
        trainer = subprocess.Popen([sys.executable, "-c", code, args], stdout=log, stderr=log)
    checkpoints = work / "results" / "checkpoints" / RUN
    lock = checkpoints / LOCK_FILE
    try:
        deadline = time.monotonic() + 180
        while not (checkpoints / "checkpoint-2" / COMPLETE_MARKER).exists():
            assert trainer.poll() is None, job_log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock_before = lock.read_text()
        status = run_status(work, RUN)
        assert status.state == TRAINING and status.total == 400 and status.step >= 2
        assert status.eta > 0 and status.checkpoint_step >= 2 and status.note is None
        stepped = status.step
        while heartbeat(work)["step"] <= stepped:  # undisturbed: it trains on
            assert trainer.poll() is None, job_log.read_text()[-3000:]
            time.sleep(0.05)
        assert lock.read_text() == lock_before  # the holder's line, as the trainer wrote it
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    status = run_status(work, RUN)
    assert status.state == FAILED and f"its trainer (pid {trainer.pid}) is gone" in status.note


def _without_ages(report: str) -> list[str]:
    """The report's lines, less the checkpoint's age (a second may pass between two)."""
    return [re.sub(r"\S+ ago", "ago", " ".join(line.split())) for line in report.splitlines()]


def test_the_status_command_reads_only_without_torch_or_the_lock(finished):
    checkpoints = finished / "results" / "checkpoints" / RUN
    os.unlink(checkpoints / LOCK_FILE)  # the trainer leaves it; the command never makes one
    command = [sys.executable, "-m", "robovqa_ft.tools.status", "--directory", str(finished)]
    shown = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    assert _without_ages(shown.stdout) == _without_ages(status_report(finished))
    assert not (checkpoints / LOCK_FILE).exists()
    probe = "import sys, robovqa_ft.tools.status; print('torch' in sys.modules)"
    imports = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True, cwd=ROOT)  # fmt: skip
    assert imports.stdout.strip() == "False"


def test_a_worker_ranks_error_line_counts_as_the_jobs_error(tmp_path):
    """torchrun's workers above rank 0 log with "rank N" before the level (launch.py)."""
    worker = logging.Formatter(line_format(1))
    failed = logging.LogRecord(PACKAGE_LOGGER, logging.ERROR, __file__, 1, "rank 1 failed",
                               None, None)  # fmt: skip
    job_log = tmp_path / "job.log"
    job_log.write_text(
        "2026-12-02 10:00:00,000 INFO robovqa_ft.training.train: Training with 2 processes\n"
        + worker.format(failed)
        + "\n"
    )
    assert last_attempt_error(job_log) == "rank 1 failed"
