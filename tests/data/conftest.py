"""Shared fixtures: small shards in the exact RoboVQA format, written by TensorFlow."""

from __future__ import annotations

from pathlib import Path

import pytest

from robovqa_ft.data.demo_bucket import write_tfrecord


@pytest.fixture
def make_shard(tmp_path: Path):
    """Write records to tmp_path/bucket/<split>/<name> and return the path."""

    def make(records: list[bytes], name: str = "train-00000-of-00001", split: str = "train"):
        path = tmp_path / "bucket" / split / name
        write_tfrecord(path, records)
        return path

    return make
