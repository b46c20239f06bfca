"""Sources other than GCS, and gs:// URIs; downloading from GCS is tested against an
emulator in test_gcs_emulator.py."""

from pathlib import Path

import pytest

from robovqa_ft.data.bucket import BucketError, parse_gcs_uri, prepare_source, read_manifest
from robovqa_ft.data.demo_bucket import write_tfrecord


def test_review_bucket_is_an_alias_of_the_public_one():
    assert parse_gcs_uri("gs://anon_robovqa/tfrecord") == ("gdm-robovqa", "tfrecord")
    assert parse_gcs_uri("gs://gdm-robovqa/tfrecord/") == ("gdm-robovqa", "tfrecord")
    with pytest.raises(BucketError):
        parse_gcs_uri("gs:///tfrecord")


def test_max_shards_keeps_the_first_shards_of_a_split_by_name(tmp_path):
    for name in ("train/train-2", "train/train-0", "train/train-1", "val/val-1", "val/val-0"):
        write_tfrecord(tmp_path / name, [b"1234"])
    manifest = tmp_path / "out" / "shards.tsv"
    shards = prepare_source(str(tmp_path), manifest, tmp_path / "dl", workers=1, demo={},
                            max_shards={"train": 2, "val": None})  # fmt: skip
    assert [(s.split, s.shard) for s in read_manifest(manifest)] == [
        ("train", "train-0"), ("train", "train-1"), ("val", "val-0"), ("val", "val-1"),
    ]  # fmt: skip
    assert read_manifest(manifest) == shards


def test_local_source_is_used_in_place(tmp_path):
    for name in ("train/train-0", "train/train-1", "val/val-0"):
        write_tfrecord(tmp_path / name, [b"1234"])  # one record: 4 bytes and 16 of framing
    for name in ("train/README", "val/val-1_.gstmp"):
        (tmp_path / name).write_bytes(b"1234")
    manifest = tmp_path / "out" / "shards.tsv"
    shards = prepare_source(str(tmp_path), manifest, tmp_path / "dl", workers=1, demo={})
    assert read_manifest(manifest) == shards
    assert [(s.split, s.shard, s.bytes) for s in shards] == [
        ("train", "train-0", 20),
        ("train", "train-1", 20),
        ("val", "val-0", 20),
    ]
    assert all(Path(s.path).parent.parent == tmp_path for s in shards)
    assert not (tmp_path / "dl").exists()


def test_demo_source_generates_a_bucket(tmp_path):
    demo = {"clips": 6, "shards_per_split": 2, "frame_size": [32, 32], "val_fraction": 0.5}
    shards = prepare_source("demo", tmp_path / "shards.tsv", tmp_path / "dl", 1, demo)
    assert [s.split for s in shards] == ["train", "train", "val", "val"]
    assert all(Path(s.path).is_file() and s.bytes > 0 for s in shards)
