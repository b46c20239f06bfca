"""The run's checkpoint folder: who may write it (the lock), what it was trained with (the
fingerprint), which checkpoint to resume, rotation, and the disk space a run still needs.
Free of torch: `robovqa-status` reads it.
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

from robovqa_ft.core.files import atomic_open
from robovqa_ft.core.settings import shaping_settings
from robovqa_ft.core.space import require_free_space

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


# A checkpoint holds the LoRA weights and AdamW's two moments: three numbers per
# trainable parameter, in fp32 (peft keeps LoRA weights in fp32, and the moments take
# their dtype), plus a few kB of scheduler, RNG and Trainer state. The adapter: one.
CHECKPOINT_BYTES_PER_PARAMETER = 3 * 4
ADAPTER_BYTES_PER_PARAMETER = 4


def training_bytes(trainable: int, keep: int | None, complete: int) -> int:
    """What a run still writes: checkpoints until `keep` complete ones and the one being
    saved are on disk at once (the project deletes old ones only after a new one is
    complete), less the `complete` ones already there, and the adapter. A run that keeps
    every checkpoint (`keep` None) is counted one checkpoint ahead, as it has no bound."""
    checkpoints = 1 if keep is None else max(keep + 1 - complete, 1)
    per_checkpoint = trainable * CHECKPOINT_BYTES_PER_PARAMETER
    return checkpoints * per_checkpoint + trainable * ADAPTER_BYTES_PER_PARAMETER


def require_training_space(
    checkpoint_dir: Path, trainable: int, keep: int | None, run: str
) -> None:
    """Stop before a training's first checkpoint when what it will still write
    (`training_bytes`) does not fit beside its checkpoints."""
    complete = len(complete_checkpoints(checkpoint_dir))
    aside = [*checkpoint_dir.glob("incomplete-*"), *checkpoint_dir.glob("stale-*")]
    require_free_space(
        checkpoint_dir, training_bytes(trainable, keep, complete),
        f"the checkpoints and adapter of run {run} ({trainable:,} trainable parameters: "
        "LoRA weights and AdamW's two moments, in fp32)",
        f" (the set-aside {', '.join(map(str, aside))} can go)" if aside else "",
    )  # fmt: skip
