"""Kill points for the fault suite: SIGKILL the whole workflow at the k-th event of a stage.

Python imports this module at start-up in every process whose PYTHONPATH names this
folder, which the suite gives Snakemake, and so every job and torchrun worker it starts.
It does nothing unless ROBOVQA_FAULTS names the suite's events folder.

An event is a write under the working directory's results/: a file opened for writing
(after the open: the file exists, empty), a file or folder renamed into place (before
the rename), a folder made (after). Its stage comes from its path (`stage_of`). The
counts per stage live in the events folder and go on across the restarts of one chain,
so the k-th event of a stage is always reached: a restart repeats at least what the
kill cut short. ROBOVQA_FAULT_PLAN ("stage=k;stage=k") names the kill points; at one,
the event is written to fired.log, then the process group named in the folder's `pgid`
file (Snakemake and its jobs) and this process (a torchrun worker has a session of its
own) get SIGKILL.
"""

from __future__ import annotations

import builtins
import fcntl
import io
import json
import os
import re
import signal

FOLDER = os.environ.get("ROBOVQA_FAULTS")
# Checkpoint files and adapters are per run; metrics rows are one per logging step.
_RUN_FILE = re.compile(r"(stage1|stage2|stage2_only)/(train_metrics\.csv|eval_metrics\.csv)$")
_CHECKPOINT = re.compile(r"checkpoints/(stage1|stage2|stage2_only)/(tmp-)?checkpoint-")
_ADAPTER = re.compile(r"(stage1|stage2|stage2_only)/\.?adapter")
_EVALUATION = re.compile(
    r"(base|stage1|stage2|stage2_only)/(eval_progress\.jsonl|\.?eval\.json"
    r"|\.?predictions\.jsonl|\.?val_losses\.jsonl)"
)


def stage_of(relative: str) -> str | None:
    """The stage a write under results/ belongs to, or None for one that is no kill point
    (logs, locks, the run's config)."""
    if relative.endswith((".log", ".lock")) or "/.snakemake" in relative:
        return None
    if relative.startswith("bucket/") or relative == "data/shards.tsv":
        return "download"
    if relative.startswith(("data/.staging", "data/images", "data/clips")):
        return "frames"
    if relative.startswith("data/"):
        return "jsonl"
    if relative.startswith("models/"):
        return "model"
    if match := _CHECKPOINT.match(relative):
        return f"{match[1]} saving"
    if match := _ADAPTER.match(relative):
        return f"{match[1]} saving"
    if match := _RUN_FILE.match(relative):
        return f"{match[1]} stepping"
    if _EVALUATION.match(relative):
        return "evaluation"
    if relative.startswith("ablation/"):
        return "report"
    return None


def _plan() -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {}
    for point in filter(None, os.environ.get("ROBOVQA_FAULT_PLAN", "").split(";")):
        stage, k = point.rsplit("=", 1)
        plan.setdefault(stage, set()).add(int(k))
    return plan


def _event(kind: str, path) -> None:
    try:
        absolute = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return  # a file descriptor
    if not absolute.startswith(RESULTS):
        return
    relative = absolute[len(RESULTS) :]
    stage = stage_of(relative)
    if stage is None:
        return
    with _real_open(os.path.join(FOLDER, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counts_file = os.path.join(FOLDER, "counts.json")
        counts = json.loads(_read(counts_file) or "{}")
        counts[stage] = k = counts.get(stage, 0) + 1
        with _real_open(counts_file + ".new", "w") as handle:
            json.dump(counts, handle)
        _real_replace(counts_file + ".new", counts_file)
        line = f"{stage}={k}\t{kind}\t{relative}\t{os.getpid()}\n"
        with _real_open(os.path.join(FOLDER, "events.log"), "a") as handle:
            handle.write(line)
        if k in PLAN.get(stage, ()):
            with _real_open(os.path.join(FOLDER, "fired.log"), "a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            group = _read(os.path.join(FOLDER, "pgid"))  # written as Snakemake starts
            os.killpg(int(group) if group else os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def _read(path: str) -> str:
    try:
        with _real_open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def _writing(mode) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def _open(file, mode="r", *args, **kwargs):
    handle = _real_open(file, mode, *args, **kwargs)
    if _writing(mode):
        _event("open", file)
    return handle


def _replace(src, dst, *args, **kwargs):
    _event("rename", dst)
    return _real_replace(src, dst, *args, **kwargs)


def _rename(src, dst, *args, **kwargs):
    _event("rename", dst)
    return _real_rename(src, dst, *args, **kwargs)


def _mkdir(path, *args, **kwargs):
    result = _real_mkdir(path, *args, **kwargs)
    _event("mkdir", path)
    return result


if FOLDER:
    RESULTS = os.path.join(os.path.abspath(os.environ["ROBOVQA_FAULT_WORKDIR"]), "results", "")
    PLAN = _plan()
    _real_open, _real_replace, _real_rename, _real_mkdir = (
        io.open,
        os.replace,
        os.rename,
        os.mkdir,
    )
    builtins.open = io.open = _open
    os.replace, os.rename, os.mkdir = _replace, _rename, _mkdir
