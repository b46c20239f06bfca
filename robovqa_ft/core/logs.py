"""Logging of the workflow's jobs: all to the rule's log file, errors also to the terminal."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from pathlib import Path
from typing import IO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A line of `line_format`, read back by `robovqa-status`: by level and message, never by
# the logger's name beyond the package's own (log_to's), which a move of a module changes.
LINE = re.compile(r"^\S+ \S+ (?:rank \d+ )?(?P<level>[A-Z]+) (?P<name>\S+): (?P<message>.*)$")
PACKAGE_LOGGER = "robovqa_ft"  # log_to's: a job's last words
ATTEMPT_START = "Training with "  # the message each training attempt starts with


def line_format(rank: int = 0) -> str:
    """A log line's format: FORMAT, with "rank N" before the level for a torchrun worker
    above rank 0 (whose lines share the job's log with rank 0's)."""
    return FORMAT.replace(" %(levelname)s", f" rank {rank} %(levelname)s") if rank else FORMAT


@contextmanager
def log_to(path: Path | str) -> Iterator[None]:
    """Send logging, warnings, progress bars and native libraries' stderr of one job to `path`.

    Errors are also shown on the terminal, where Snakemake's own report appears.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    with (
        _closed_quietly(open(path, "a", encoding="utf-8", buffering=1)) as stream,
        os.fdopen(terminal_fd, "w", encoding="utf-8", buffering=1) as terminal,
    ):
        os.dup2(stream.fileno(), 2)  # TensorFlow's C++ start-up chatter goes to the log
        to_terminal = logging.StreamHandler(terminal)
        to_terminal.setLevel(logging.ERROR)
        logging.basicConfig(
            level=logging.INFO,
            format=FORMAT,
            handlers=[logging.StreamHandler(stream), to_terminal],
            force=True,
        )
        logging.captureWarnings(True)
        try:
            with redirect_stderr(stream):
                yield
        except SystemExit as stop:
            if isinstance(stop.code, str):  # a one-line reason: in the log and on the terminal
                logging.getLogger(PACKAGE_LOGGER).error("%s", stop.code)
                raise SystemExit(1) from None
            raise
        except Exception as error:
            logging.getLogger(PACKAGE_LOGGER).error("%s (traceback in %s)", error, path)
            with suppress(OSError):  # a full disk: the error still reaches the terminal
                stream.write("".join(traceback.format_exception(error)))
            raise
        finally:
            with suppress(OSError):
                stream.flush()
            os.dup2(terminal.fileno(), 2)
            logging.basicConfig(force=True)


@contextmanager
def _closed_quietly(stream: IO[str]) -> Iterator[IO[str]]:
    """`stream`, closed at the end even when the disk is full: what its buffer still held
    is lost, rather than the job's own error replaced by the log's."""
    try:
        yield stream
    finally:
        with suppress(OSError):
            stream.close()
