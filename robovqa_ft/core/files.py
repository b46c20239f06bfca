"""Atomic file writes: a file under its final name is always complete, and what a killed
writer left beside it is removed by the next writer."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_files(paths: dict[str, Path | str]) -> Iterator[dict[str, IO[str]]]:
    """Text files that appear together or not at all: each is written to a temporary
    beside its path, and they replace their paths only once every one is written and
    synced. A failed flush or sync names its file's final path (`OSError.filename`)."""
    paths = {key: Path(path) for key, path in paths.items()}
    temporaries: dict[str, str] = {}
    handles: dict[str, IO[str]] = {}
    try:
        for key, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_parts(path)
            fd, temporaries[key] = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".part"
            )
            handles[key] = os.fdopen(fd, "w", encoding="utf-8")
        yield handles
        for key, handle in handles.items():
            try:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            except OSError as error:
                raise OSError(error.errno, error.strerror, str(paths[key])) from error
        for key, path in paths.items():
            os.replace(temporaries[key], path)
    except BaseException:
        for handle in handles.values():
            with suppress(OSError):
                handle.close()
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | str, obj: Any) -> None:
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


@contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """A temporary folder beside `path` that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_parts(path: Path) -> None:
    """Remove the temporary files or folders of `path` that a killed writer left (a
    SIGKILL or a power loss runs no cleanup). Every path has one writer at a time."""
    # mkstemp's and mkdtemp's random part: 8 characters (not another file's `.x.bak.…`)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.part"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
