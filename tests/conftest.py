"""Shared fixtures: small shards in the exact RoboVQA format, written by TensorFlow."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from robovqa_ft.demo_bucket import (
    clip_frames,
    clip_text,
    random_clip,
    sequence_example,
    write_tfrecord,
)

SMALL_FRAME = (64, 48)


def good_record(unique_id: str | None, seed: int = 0, size=SMALL_FRAME) -> bytes:
    rng = random.Random(seed)
    clip = random_clip(rng)
    return sequence_example(unique_id, clip_frames(clip, rng, size, 16), clip_text(clip, rng))


@pytest.fixture
def make_shard(tmp_path: Path):
    """Write records to tmp_path/bucket/<split>/<name> and return the path."""

    def make(records: list[bytes], name: str = "train-00000-of-00001", split: str = "train"):
        path = tmp_path / "bucket" / split / name
        write_tfrecord(path, records)
        return path

    return make
