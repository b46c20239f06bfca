"""An append-only record of finished work, so that an interrupted job resumes after the
last batch it completed instead of from zero.

One JSON line per batch of records, flushed to disk before the next batch starts: a
batch is on disk whole or (a line cut short by a kill, dropped on reading) not at all, so
a rerun resumes on a batch boundary and makes the same batches as a run that never
stopped. The first line names what the records were computed for (a fingerprint of the
model, adapter, data, settings and code); a journal of anything else is started anew,
never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Iterable
from pathlib import Path

from robovqa_ft.core.source_imports import ROOT, first_party_files
from robovqa_ft.training.checkpoints import fingerprint

log = logging.getLogger(__name__)


class Journal:
    """Records by key (`record["key"]`, a list), read back from `path` if it was written
    for `fingerprint`."""

    def __init__(self, path: Path | str, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint
        self.records: dict[Hashable, dict] = {}
        if self.path.exists():
            self._read()
        self.resumed = len(self.records)
        if self.resumed:
            log.info("resuming: %d records of an earlier attempt in %s", self.resumed, self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    def _read(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        # the last element is the text after the final newline: empty, or a cut-short line
        complete, tail = lines[:-1], lines[-1]
        try:
            header = json.loads(complete[0]) if complete else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            if complete:
                log.info("%s was written for other inputs or settings: starting anew", self.path)
            return
        for line in complete[1:]:
            for record in json.loads(line)["batch"]:
                self.records[self.key(record)] = record
        if tail:  # a write cut short: drop it, so the next append starts on a new line
            with self.path.open("r+b") as handle:
                handle.truncate(len(self.path.read_bytes()) - len(tail))

    @staticmethod
    def key(record: dict) -> Hashable:
        return tuple(record["key"])

    def __contains__(self, key: Iterable) -> bool:
        return tuple(key) in self.records

    def append(self, records: list[dict]) -> None:
        """Add one batch of records, on disk before this returns."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"batch": records}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self.records[self.key(record)] = record

    def remove(self) -> None:
        """Once the job's own outputs hold everything."""
        self.path.unlink(missing_ok=True)


# The module whose imports, followed through the package, are the evaluation's code.
CODE_OF = Path(__file__).with_name("evaluate.py")


def journal_fingerprint(model: dict, stages: dict, evaluation: dict, inputs: list) -> str:
    """What a journal's records were computed with: every setting that could change a
    number (batch sizes and the attention kernel included: batches must come out as an
    uninterrupted run makes them), the adapter and val files, and the code: every module
    of the package that the evaluation runs, in whichever subpackage (`CODE_OF`)."""
    code = hashlib.sha256()
    for source in first_party_files(CODE_OF):
        code.update(str(source.relative_to(ROOT)).encode() + b"\0" + source.read_bytes())
    exact = {
        "model": model,
        "stages": stages,
        "code": code.hexdigest(),
        "evaluation": {k: v for k, v in evaluation.items() if k != "dataloader_workers"},
    }
    # section names BOOKKEEPING does not know: fingerprint() keeps every key
    return fingerprint({"journal": exact}, inputs)
