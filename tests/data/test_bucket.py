import shutil
from pathlib import Path

import pytest
import requests

from robovqa_ft.bucket import (
    DEFAULT_SOURCE,
    BucketError,
    download_gcs,
    gcs_crc32c,
    local_shards,
    parse_gcs_uri,
    prepare_source,
    read_manifest,
)


class FakeBlob:
    """A GCS object served from a local file, counting downloads."""

    def __init__(self, name: str, source: Path):
        self.name, self.source = name, source
        self.size = source.stat().st_size
        self.crc32c = gcs_crc32c(source)
        self.downloads = 0

    def download_to_filename(self, filename, checksum, timeout, retry):
        assert checksum == "crc32c"
        self.downloads += 1
        shutil.copyfile(self.source, filename)


class FakeBucket:
    def __init__(self, blobs):
        self.blobs = blobs

    def list_blobs(self, prefix, timeout, retry):
        return [b for b in self.blobs if b.name.startswith(prefix)]


@pytest.fixture
def fake_bucket(tmp_path):
    blobs = []
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            source = tmp_path / "remote" / f"{split}{i}"
            source.parent.mkdir(exist_ok=True)
            source.write_bytes(f"{split}-{i}".encode() * 1000)
            blobs.append(FakeBlob(f"tfrecord/{split}/{split}-{i:05d}-of-{n:05d}", source))
    blobs.append(FakeBlob("tfrecord/json/train/ignored.json", source))
    return FakeBucket(blobs)


def test_download_fetches_every_shard_once_and_resumes(tmp_path, fake_bucket):
    dest = tmp_path / "dest"
    shards = download_gcs(DEFAULT_SOURCE, dest, workers=2, bucket=fake_bucket)
    assert sorted((s.split, s.shard) for s in shards) == [
        ("train", "train-00000-of-00003"),
        ("train", "train-00001-of-00003"),
        ("train", "train-00002-of-00003"),
        ("val", "val-00000-of-00001"),
    ]
    for shard in shards:
        assert Path(shard.path).read_bytes().startswith(f"{shard.split}-".encode())
    # A second run fetches only what is missing or damaged.
    (dest / "train" / "train-00001-of-00003").unlink()
    (dest / "val" / "val-00000-of-00001").write_bytes(b"x" * fake_bucket.blobs[3].size)
    download_gcs(DEFAULT_SOURCE, dest, workers=2, bucket=fake_bucket)
    assert [b.downloads for b in fake_bucket.blobs] == [1, 2, 1, 2, 0]
    assert not list(dest.rglob("*.part"))


def test_a_dropped_download_is_tried_again_then_reported(tmp_path, fake_bucket, monkeypatch):
    monkeypatch.setattr("robovqa_ft.bucket.RETRY_WAIT_SECONDS", 0)
    flaky = fake_bucket.blobs[0]
    real_download = flaky.download_to_filename
    failures = iter([True])

    def once_broken(filename, **kwargs):
        if next(failures, False):
            Path(filename).write_bytes(b"half")
            raise ConnectionResetError("connection reset")
        real_download(filename, **kwargs)

    flaky.download_to_filename = once_broken
    download_gcs(DEFAULT_SOURCE, tmp_path / "dest", workers=1, bucket=fake_bucket)
    assert (
        flaky.downloads == 1 and (tmp_path / "dest" / "train" / flaky.name.split("/")[-1]).is_file()
    )

    def always_broken(filename, **kwargs):
        raise ConnectionResetError("connection reset")

    fake_bucket.blobs[3].download_to_filename = always_broken
    (tmp_path / "dest" / "val" / "val-00000-of-00001").unlink()
    with pytest.raises(BucketError, match="val-00000-of-00001: 3 attempts failed"):
        download_gcs(DEFAULT_SOURCE, tmp_path / "dest", workers=1, bucket=fake_bucket)


def test_bucket_without_prefix_lists_train_and_val_at_its_root(tmp_path, fake_bucket):
    for blob in fake_bucket.blobs:
        blob.name = blob.name.removeprefix("tfrecord/")
    shards = download_gcs("gs://mirror", tmp_path, bucket=fake_bucket)
    assert len(shards) == 4


def test_unreachable_bucket_says_what_failed_and_how_to_use_a_local_copy(tmp_path):
    class Offline:
        def list_blobs(self, **kwargs):
            raise requests.exceptions.ConnectionError("Name or service not known")

    with pytest.raises(BucketError) as error:
        download_gcs(DEFAULT_SOURCE, tmp_path, bucket=Offline())
    message = str(error.value)
    assert "gs://gdm-robovqa/tfrecord" in message and "Name or service not known" in message
    assert "--config source=DIR" in message


def test_empty_bucket_prefix_is_an_error(tmp_path):
    with pytest.raises(BucketError, match="no objects"):
        download_gcs("gs://somebucket/nothing", tmp_path, bucket=FakeBucket([]))


def test_review_bucket_is_an_alias_of_the_public_one():
    assert parse_gcs_uri("gs://anon_robovqa/tfrecord") == ("gdm-robovqa", "tfrecord")
    assert parse_gcs_uri("gs://gdm-robovqa/tfrecord/") == ("gdm-robovqa", "tfrecord")
    with pytest.raises(BucketError):
        parse_gcs_uri("gs:///tfrecord")


def test_local_source_is_used_in_place(tmp_path):
    names = ("train/train-0", "train/train-1", "val/val-0", "train/README", "val/val-1_.gstmp")
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"1234")
    manifest = tmp_path / "out" / "shards.tsv"
    shards = prepare_source(str(tmp_path), manifest, tmp_path / "dl", workers=1, demo={})
    assert read_manifest(manifest) == shards
    assert [(s.split, s.shard, s.bytes) for s in shards] == [
        ("train", "train-0", 4),
        ("train", "train-1", 4),
        ("val", "val-0", 4),
    ]
    assert all(Path(s.path).parent.parent == tmp_path for s in shards)
    assert not (tmp_path / "dl").exists()


def test_local_source_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(BucketError, match=r"train/train\*"):
        local_shards(tmp_path)
    with pytest.raises(BucketError, match="not a folder"):
        local_shards(tmp_path / "missing")


def test_demo_source_generates_a_bucket(tmp_path):
    demo = {"clips": 6, "shards_per_split": 2, "frame_size": [32, 32], "val_fraction": 0.5}
    shards = prepare_source("demo", tmp_path / "shards.tsv", tmp_path / "dl", 1, demo)
    assert [s.split for s in shards] == ["train", "train", "val", "val"]
    assert all(Path(s.path).is_file() and s.bytes > 0 for s in shards)
