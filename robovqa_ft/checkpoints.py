"""The run's checkpoint folder: who may write it, which checkpoints may be resumed.

Kept apart from the training code (and free of torch) so that the workflow can ask
which settings shape the weights without loading a deep-learning stack.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from robovqa_ft.files import atomic_open

log = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = "lock"


class CheckpointLockedError(RuntimeError):
    pass


@contextmanager
def exclusive_lock(checkpoint_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run's checkpoint folder, or fail at once saying who has it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise CheckpointLockedError(
                f"{checkpoint_dir} is in use by another trainer ({handle.read().strip()}); "
                "two trainers on one run would overwrite each other's checkpoints"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        yield


# The one table of bookkeeping keys: settings that change how a job is watched, saved,
# sped up or scheduled, never what it writes. No job has one in its params and no
# training fingerprint holds one, so changing it after a complete run plans nothing (the
# scripts read them from the config). The GPU count is one: the global batch stays
# batch_size × grad_accum on any count. By config section; TOP_LEVEL holds the keys at
# the top of the config. Every other key shapes the outputs of the jobs that read it
# (`READS`) and reaches their params, and the training fingerprint where it reads it.
TOP_LEVEL = ""
BOOKKEEPING = {
    TOP_LEVEL: {"download_workers"},
    "training": {"logging_steps", "eval_steps", "eval_clips", "save_steps",
                 "save_every_minutes", "save_total_limit", "dataloader_workers", "gpus",
                 "hang_timeout_minutes", "stop_grace_seconds", "report_to"},
    "model": {"max_memory_gb", "attn_implementation", "gradient_checkpointing"},
    "evaluation": {"generation_batch_size", "dataloader_workers"},
}  # fmt: skip
# What each job reads of the config: whole sections, or "key" for a top-level key. The
# frames and the split reach training through the data's metadata.json.
READS = {
    "download": ["source", "download_workers", "demo", "max_shards"],
    "extract_frames": ["frame_size", "frames_per_clip", "jpeg_quality"],
    "build_jsonl": ["split", "val_ratio", "split_seed", "subset_ratio", "frames_per_clip",
                    "frame_size", "jpeg_quality", "source"],
    "build_tiny_model": ["tiny_model", "training"],
    "train": ["model", "lora", "training", "stage1", "stage2", "evaluation"],
    "evaluate": ["model", "stage1", "stage2", "evaluation"],
    "merge": ["model", "training", "stage1", "stage2"],
    "ablation_report": ["source", "model", "lora", "training", "stage1", "stage2",
                        "evaluation", "report"],
}  # fmt: skip


def shaping_settings(section: str, values: dict) -> dict:
    """The part of a config section that shapes the trained weights."""
    shaping = {k: v for k, v in values.items() if k not in BOOKKEEPING.get(section, ())}
    # Padding and packing see the same samples in the same order, to float rounding;
    # only length grouping changes the order.
    if section == "training" and shaping.get("padding") in ("longest", "packed"):
        del shaping["padding"]
    return shaping


def fingerprint(settings: dict, inputs: list[Path | str]) -> str:
    """A hash of the settings that shape the trained weights, and of the input files."""
    shaping = {
        section: shaping_settings(section, values) if isinstance(values, dict) else values
        for section, values in settings.items()
    }
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode())
    for path in inputs:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            with file.open("rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def prepare_checkpoint_dir(
    checkpoint_dir: Path, current: str, events_dir: Path | None = None
) -> None:
    """Move checkpoints of another configuration or data aside, so they are never resumed,
    with the fingerprint they were written under, so that moving them back resumes them.
    The run's TensorBoard events (`events_dir`) go with them: they are those checkpoints'
    curves, and the new run's would be drawn over them."""
    stored = checkpoint_dir / FINGERPRINT_FILE
    old = json.loads(stored.read_text())["fingerprint"] if stored.exists() else None
    checkpoints = sorted(checkpoint_dir.glob("checkpoint-*"))
    if old != current and checkpoints:
        aside = Path(
            tempfile.mkdtemp(dir=checkpoint_dir, prefix=f"stale-{time.strftime('%Y%m%d-%H%M%S')}-")
        )
        for path in checkpoints:
            path.rename(aside / path.name)
        if stored.exists():
            shutil.copy2(stored, aside / FINGERPRINT_FILE)
        if events_dir is not None and events_dir.is_dir():
            # not a rename: results/checkpoints may link to another disk
            shutil.move(events_dir, aside / events_dir.name)
            log.info("their TensorBoard events went with them: to resume them, move %s back "
                     "to %s", aside / events_dir.name, events_dir)  # fmt: skip
        log.warning(
            "configuration or data changed since the checkpoints in %s were written: moved "
            "%d to %s, and this run starts from step 0. Delete that folder when you no longer "
            "need it. To resume them instead: stop this run, put back the settings and data "
            "they were written with, delete the checkpoints this run wrote, and move "
            "everything in that folder back into %s",
            checkpoint_dir, len(checkpoints), aside, checkpoint_dir,
        )  # fmt: skip
    with atomic_open(stored) as handle:
        json.dump({"fingerprint": current}, handle)


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished; a half-written one is never resumed."""
    return max(complete_checkpoints(checkpoint_dir), key=_step, default=None)


def _step(path: Path) -> int | None:
    suffix = path.name.split("-")[-1]
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints with their completion marker, in no order."""
    return [p for p in checkpoint_dir.glob("checkpoint-*")
            if _step(p) is not None and (p / COMPLETE_MARKER).exists()]  # fmt: skip


def set_aside_incomplete(checkpoint_dir: Path) -> list[Path]:
    """Move every checkpoint without its completion marker (a save a kill cut short) to
    `incomplete-*/`, before a run starts: it is never resumed, never counted against
    `save_total_limit`, and never mistaken for the newest. Returns where they went."""
    halves = [p for p in checkpoint_dir.glob("checkpoint-*")
              if _step(p) is not None and not (p / COMPLETE_MARKER).exists()]  # fmt: skip
    if not halves:
        return []
    aside = Path(tempfile.mkdtemp(dir=checkpoint_dir, prefix="incomplete-"))
    moved = []
    for path in halves:
        moved.append(path.rename(aside / path.name))
    log.warning("moved %d half-written checkpoints to %s: %s", len(moved), aside,
                ", ".join(p.name for p in moved))  # fmt: skip
    return moved


def rotate_checkpoints(checkpoint_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (None keeps all). Only complete
    ones count and only complete ones go: called once a save is marked complete, so the
    newest complete checkpoint is always among those kept."""
    if keep is None:
        return []
    complete = sorted(complete_checkpoints(checkpoint_dir), key=_step)
    old = complete[: max(len(complete) - keep, 0)]
    for path in old:
        # the marker first: a kill in the middle leaves a folder that no longer counts
        (path / COMPLETE_MARKER).unlink()
        shutil.rmtree(path)
    return old
