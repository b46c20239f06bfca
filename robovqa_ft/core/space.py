"""Disk space, which every stage fills: before a stage starts, a check that what it will
write fits; during a write, a full disk stops the job naming what it was writing.

A write's OSError carries no file name (only `open` sets one), and some libraries drop
the errno altogether, so the place that writes names the path: `named_if_full`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# A write that found no room: a full file system, or the user's quota on it.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads where the errno is lost: the C library's words, which Rust's
# and C++'s errors quote (safetensors), and torch's zip writer, whose write on a full
# disk fails with "PytorchStreamWriter failed writing file data/0: file write failed"
# or "unexpected pos 704 vs 598" and no errno (pytorch/pytorch#10577). Only writes are
# wrapped, so these words name a failed write; the message adds the free space left.
FULL_WORDS = (
    os.strerror(errno.ENOSPC),
    os.strerror(errno.EDQUOT),
    "file write failed",
    "unexpected pos",
)
WHAT_TO_DO = "(or point results/ to a larger disk) and rerun the same command"


class DiskFullError(OSError):
    """No room for what a stage writes, found before it started or during a write. An
    OSError of errno ENOSPC, so that code asking for a full disk still recognises it;
    `filename` is the path, and the message says where, how much and what to do."""

    def __str__(self) -> str:
        return self.strerror


def free_space(path: Path | str) -> tuple[Path, int]:
    """The mount point of the file system that holds (or will hold) `path`, and the bytes
    free there. `path` need not exist: its nearest existing folder counts. A user quota
    (common on clusters' Lustre or GPFS) is not seen here: a write past it fails with
    EDQUOT, which `named_if_full` names like a full disk."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    mount = folder
    while not os.path.ismount(mount):
        mount = mount.parent
    return mount, free


def size_text(count: float, round_up: bool = False) -> str:
    """`count` bytes in GB, MB or kB, one decimal (rounded up: freeing that is enough)."""
    units = [(unit, scale) for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
             if count >= scale]  # fmt: skip
    if not units:
        return f"{math.ceil(count)} bytes"
    unit, scale = units[0]
    value = math.ceil(count / scale * 10) / 10 if round_up else count / scale
    return f"{value:.1f} {unit}"


def require_free_space(path: Path | str, needed: int, what: str, hint: str = "") -> None:
    """Stop before a stage writes anything when `needed` bytes (the stage's estimate of
    what it will write, which `what` names) do not fit on the file system of `path`.
    `hint` says what could go to make room."""
    mount, free = free_space(path)
    if needed > free:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough free space on {mount} for {what}: it needs about "
            f"{size_text(needed)}, {size_text(free)} are free; free "
            f"{size_text(needed - free, round_up=True)}{hint} {WHAT_TO_DO}",
            str(path),
        )
    log.info("%s: about %s to write, %s free on %s", what, size_text(needed),
             size_text(free), mount)  # fmt: skip


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is a write that
    found no room (see `FULL_ERRNOS` and `FULL_WORDS`)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return True
        if any(words in str(current) for words in FULL_WORDS):
            return True
        # an error raised from one, or an OSError met while handling one (a close that
        # failed too); not any error that merely followed a full disk
        context = current.__context__ if isinstance(current, OSError) else None
        current = current.__cause__ or context
    return False


def disk_full(path: Path | str, what: str, kept: str = "finished work is kept") -> DiskFullError:
    """The error for a full disk met while writing `what` at `path`; `kept` says what of
    the job's work survives."""
    mount, free = free_space(path)
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on {mount} while writing {what} {path} ({size_text(free)} free "
        f"now): free space there {WHAT_TO_DO}; {kept}",
        str(path),
    )


@contextmanager
def named_if_full(
    path: Path | str, what: str, kept: str = "finished work is kept"
) -> Iterator[None]:
    """Turn a full disk met inside the block into a `DiskFullError` that names the file
    the error names (an open, or `files.atomic_files`), else `path` (what the block
    writes), and says what to do; the original error is its cause. One already named,
    by a block nested inside, passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        named = error.filename if isinstance(error, OSError) and error.filename else path
        raise disk_full(named, what, kept) from error
