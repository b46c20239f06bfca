"""Every run's state at a glance, from its files only: `robovqa-status`
(`make status`) prints, per run, not started / training / finished / failed, its step of
the total, last loss and val loss, throughput, the time since its last complete
checkpoint and an ETA, and each run's evaluation.

It reads what the trainer leaves (its heartbeat, checkpoints, adapter and job log), so it
works while a training runs, from another node that mounts results/, and after a crash;
and it never opens a checkpoint folder's lock, whose second holder would make a starting
trainer fail. No torch here: it answers in a moment, on a login node too.

How a run's state is decided, first match wins:
- finished: its adapter exists (the trainer writes it last, atomically).
- training: the process its heartbeat names is alive (same host), or, on another host,
  the heartbeat is fresher than 3 × the longest gap the run has shown between two
  heartbeats (an evaluation, a save), and at least 15 minutes.
- failed: the job log (logs/train/<run>.log) ends the last attempt with an error (shown);
  or the heartbeat's process is gone, or went silent on another host; or checkpoints exist
  but no heartbeat.
- not started: none of these files.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from robovqa_ft.core.logs import ATTEMPT_START, LINE, PACKAGE_LOGGER
from robovqa_ft.core.runs import BASE, EVENTS_DIR, PROGRESS_FILE, TRAINED, read_heartbeat
from robovqa_ft.core.text import duration
from robovqa_ft.training.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint

NOT_STARTED, TRAINING, FINISHED, FAILED = "not started", "training", "finished", "failed"
STALE_FLOOR_SECONDS = 15 * 60
STALE_GAPS = 3
NONE = "–"


@dataclass
class RunStatus:
    run: str
    state: str
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    samples_per_s: float | None = None
    checkpoint_step: int | None = None
    checkpoint_age: float | None = None  # seconds since it was marked complete
    eta: float | None = None  # seconds
    evaluation: str = NONE
    note: str | None = None  # why it failed, or what looks wrong with a live one


def run_status(workdir: Path | str, run: str, now: float | None = None) -> RunStatus:
    """What the files of `run` in the workflow directory `workdir` say about it."""
    now = time.time() if now is None else now
    results = Path(workdir) / "results"
    status = RunStatus(run, NONE if run == BASE else NOT_STARTED)
    status.evaluation = evaluation_state(results / run)
    if run == BASE:
        return status
    beat = read_heartbeat(results / run)
    if beat is not None:
        status.step, status.total = beat.get("step"), beat.get("total_steps")
        status.loss, status.val_loss = beat.get("loss"), beat.get("val_loss")
        status.samples_per_s = beat.get("samples_per_s")
    checkpoint = latest_complete_checkpoint(results / "checkpoints" / run)
    if checkpoint is not None:
        status.checkpoint_step = int(checkpoint.name.split("-")[-1])
        status.checkpoint_age = now - (checkpoint / COMPLETE_MARKER).stat().st_mtime
    job_log = Path(workdir) / "logs" / "train" / f"{run}.log"
    status.state, status.note = training_state(results / run, beat, checkpoint, job_log, now)
    if status.state == TRAINING and beat.get("eta_seconds") is not None:
        status.eta = max(beat["eta_seconds"] - (now - beat["updated"]), 0.0)
    return status


def training_state(
    run_dir: Path, beat: dict | None, checkpoint: Path | None, job_log: Path, now: float
) -> tuple[str, str | None]:
    """(state, note): the rules of the module docstring, in order."""
    if (run_dir / "adapter").is_dir():
        return FINISHED, None
    alive, why = trainer_alive(beat, now) if beat is not None else (False, None)
    if alive:
        return TRAINING, why
    error = last_attempt_error(job_log)
    if error is not None:
        return FAILED, error
    if beat is not None:
        return FAILED, why
    if checkpoint is not None:
        return FAILED, f"{checkpoint.name} exists but no trainer wrote a heartbeat"
    return NOT_STARTED, None


def trainer_alive(beat: dict, now: float) -> tuple[bool, str | None]:
    """Whether the trainer of `beat` still runs, with a note when that is in doubt."""
    age = now - beat["updated"]
    host, pid = beat["host"], beat["pid"]
    if host == socket.gethostname():
        if process_exists(pid):
            quiet = age > STALE_FLOOR_SECONDS
            return True, f"no heartbeat for {duration(age)}: hung?" if quiet else None
        return False, (
            f"its trainer (pid {pid}) is gone without an adapter or an error in its log: "
            "killed (SIGKILL, out of memory, a lost node)? A rerun resumes it"
        )
    limit = max(STALE_FLOOR_SECONDS, STALE_GAPS * beat.get("longest_gap_seconds", 0))
    if age <= limit:
        return True, None
    return False, (
        f"no heartbeat for {duration(age)} from {host} (pid {pid}, which cannot be checked "
        "from here)"
    )


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks only whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def last_attempt_error(job_log: Path) -> str | None:
    """The error the job log's last attempt ended with, or None (no log, no error, or
    an attempt still going)."""
    try:
        lines = job_log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    error = None
    for line in lines:
        if not (fields := LINE.match(line)):
            continue  # a traceback's, or a library's own
        if fields["message"].startswith(ATTEMPT_START):
            error = None
        elif fields["level"] == "ERROR" and fields["name"] == PACKAGE_LOGGER:
            error = fields["message"]
    return error


def evaluation_state(run_dir: Path) -> str:
    """done, the batches an evaluation under way (or interrupted) has finished, or –."""
    if (run_dir / "eval.json").exists():
        return "done"
    # robovqa_ft.evaluation.journal: a header, one line a batch
    progress = run_dir / PROGRESS_FILE
    try:
        batches = max(len(progress.read_bytes().splitlines()) - 1, 0)
    except OSError:
        return NONE
    return f"{batches} batches done"


COLUMNS = ("run", "state", "step", "loss", "val loss", "samples/s", "last checkpoint", "ETA",
           "evaluation")  # fmt: skip


def row(status: RunStatus) -> list[str]:
    def number(value: float | None, digits: int = 3) -> str:
        return NONE if value is None else f"{value:.{digits}f}"

    step = NONE
    if status.step is not None:
        step = f"{status.step}/{status.total}" if status.total else str(status.step)
    checkpoint = NONE
    if status.checkpoint_step is not None:
        checkpoint = f"step {status.checkpoint_step}, {duration(status.checkpoint_age)} ago"
    speed = status.samples_per_s
    return [
        status.run, status.state, step, number(status.loss), number(status.val_loss),
        number(speed, 1 if speed is not None and speed >= 10 else 2), checkpoint,
        NONE if status.eta is None else duration(status.eta), status.evaluation,
    ]  # fmt: skip


def status_report(workdir: Path | str, now: float | None = None) -> str:
    """The table of every run of `workdir`, the notes on failed or doubtful ones, and
    where the TensorBoard curves are."""
    statuses = [run_status(workdir, run, now) for run in (*TRAINED, BASE)]
    rows = [list(COLUMNS), *(row(s) for s in statuses)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]  # fmt: skip
    lines += [f"{s.run} {s.state}: {s.note}" for s in statuses if s.note]
    results = Path(workdir) / "results"
    if any((results / run / EVENTS_DIR).is_dir() for run in TRAINED):
        lines.append(f"TensorBoard: tensorboard --logdir {results}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="robovqa-status",
        description="Every run's state, step, losses, speed, last checkpoint and ETA, read "
        "from its files (safe while training runs, from any node).",
    )
    parser.add_argument(
        "--directory", "-d", default=".", help="the workflow's working directory (--directory)"
    )
    args = parser.parse_args(argv)
    if not Path(args.directory).is_dir():
        parser.error(f"{args.directory} is not a folder")
    print(status_report(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
