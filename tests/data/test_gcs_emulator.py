"""`download_gcs` with the real google-cloud-storage client against a local GCS emulator
(gcp-storage-emulator, in this process), reached through a relay that counts requests
and drops connections. Only the endpoint and the waits differ from production."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from gcp_storage_emulator.server import create_server
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from tcp_relay import Relay, Request

from robovqa_ft.data.bucket import BucketError, Patience, download_gcs

# Seconds, not minutes: a test that hangs or gives up too early shows within the run.
PATIENCE = Patience(
    timeout=1, list_deadline=1, download_deadline=1, backoff=0.05, attempts=3, retry_wait=0
)
SOURCE = "gs://gdm-robovqa/tfrecord"
SHARD_BYTES = 200_000


class Emulator:
    """The emulator with one bucket, seeded through the client, behind a relay."""

    def __init__(self, bucket: str):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        self.server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
        self.server.start()
        self.relay = Relay(port)
        self.endpoint = self.relay.endpoint
        # Seeded through the relay too: an object's mediaLink, which the client downloads
        # from, names the host it was uploaded to.
        client = storage.Client(
            project=None,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )
        self.bucket = client.bucket(bucket)

    def put(self, name: str, size: int = SHARD_BYTES) -> bytes:
        data = random.Random(name).randbytes(size)
        self.bucket.blob(name).upload_from_string(data)
        self.relay.requests.clear()  # the tests count the download's requests only
        return data

    def put_shards(self, prefix: str = "tfrecord/", train: int = 3, val: int = 1) -> dict:
        """RoboVQA's layout: {split: {shard: bytes}}."""
        return {
            split: {
                f"{split}-{i:05d}-of-{n:05d}": self.put(
                    f"{prefix}{split}/{split}-{i:05d}-of-{n:05d}"
                )
                for i in range(n)
            }
            for split, n in (("train", train), ("val", val))
        }

    def stop(self) -> None:
        self.relay.close()
        self.server.stop()


@pytest.fixture
def gcs():
    emulator = Emulator("gdm-robovqa")
    yield emulator
    emulator.stop()


def download(gcs: Emulator, dest: Path, uri: str = SOURCE, workers: int = 2):
    return download_gcs(uri, dest, workers=workers, endpoint=gcs.endpoint, patience=PATIENCE)


def resumed_at(request: Request) -> int:
    """The first byte a download asked for."""
    return int(request.range.removeprefix("bytes=").removesuffix("-")) if request.range else 0


def assert_downloaded(dest: Path, shards: dict) -> None:
    for split, contents in shards.items():
        for shard, data in contents.items():
            assert (dest / split / shard).read_bytes() == data, shard
    assert not list(dest.rglob("*.part"))


@pytest.mark.parametrize("prefix", ["tfrecord/", ""])
def test_listing_finds_train_and_val_shards_with_their_sizes(tmp_path, gcs, prefix):
    gcs.put_shards(prefix, train=2, val=1)
    gcs.put(f"{prefix}val/val-00001-of-00002", 1234)
    for decoy in ("json/train/train-00000.json", "train/README", "train/train/", "validation"):
        gcs.put(prefix + decoy, 10)
    uri = SOURCE if prefix else "gs://gdm-robovqa"
    shards = download(gcs, tmp_path, uri)
    assert [(s.split, s.shard, s.bytes) for s in shards] == [
        ("train", "train-00000-of-00002", SHARD_BYTES),
        ("train", "train-00001-of-00002", SHARD_BYTES),
        ("val", "val-00000-of-00001", SHARD_BYTES),
        ("val", "val-00001-of-00002", 1234),
    ]
    assert all(Path(s.path) == tmp_path / s.split / s.shard for s in shards)
    listed = [
        parse_qs(urlsplit(r.line.split()[1]).query)["prefix"]
        for r in gcs.relay.requests
        if r.line.startswith("GET /storage/v1/b/gdm-robovqa/o?")
    ]
    assert listed == [[f"{prefix}train/train"], [f"{prefix}val/val"]]


def test_several_shards_download_at_once(tmp_path, gcs):
    shards = gcs.put_shards(train=3, val=1)
    gcs.relay.media_delay = 0.3  # long enough for the workers' downloads to overlap
    download(gcs, tmp_path, workers=4)
    assert_downloaded(tmp_path, shards)
    assert gcs.relay.most_in_flight >= 2


def test_a_complete_shard_is_not_fetched_again(tmp_path, gcs):
    shards = gcs.put_shards(train=3, val=1)
    download(gcs, tmp_path)
    first = len([r for r in gcs.relay.requests if r.is_media])
    download(gcs, tmp_path)
    assert first == 4 and len([r for r in gcs.relay.requests if r.is_media]) == 4
    # Missing, or of the right size but other bytes: fetched again, and only those.
    (tmp_path / "train" / "train-00001-of-00003").unlink()
    (tmp_path / "val" / "val-00000-of-00001").write_bytes(b"x" * SHARD_BYTES)
    download(gcs, tmp_path)
    counts = {s: len(gcs.relay.media(s)) for split in shards.values() for s in split}
    assert list(counts.values()) == [1, 2, 1, 2]
    assert_downloaded(tmp_path, shards)


def test_a_partial_download_resumes_with_a_range_request(tmp_path, gcs):
    shards = gcs.put_shards(train=1, val=0)
    part = tmp_path / "train" / "train-00000-of-00001.part"
    part.parent.mkdir()
    part.write_bytes(shards["train"]["train-00000-of-00001"][:75_000])
    download(gcs, tmp_path)
    assert [r.range for r in gcs.relay.media("train-00000")] == ["bytes=75000-"]
    assert_downloaded(tmp_path, shards)


def test_a_damaged_partial_download_is_fetched_anew(tmp_path, gcs, caplog):
    shards = gcs.put_shards(train=1, val=0)
    part = tmp_path / "train" / "train-00000-of-00001.part"
    part.parent.mkdir()
    part.write_bytes(b"not the object's first bytes")
    download(gcs, tmp_path)
    assert [r.range for r in gcs.relay.media("train-00000")] == ["bytes=28-", None]
    assert "train-00000-of-00001: attempt 1 failed" in caplog.text and "CRC-32C" in caplog.text
    assert_downloaded(tmp_path, shards)


def test_an_object_unlike_its_stored_crc32c_is_refused_and_named(tmp_path, gcs, caplog):
    shards = gcs.put_shards(train=2, val=1)
    blob = gcs.bucket.get_blob("tfrecord/val/val-00000-of-00001")
    blob.crc32c = "AAAAAA=="  # as if the object had been damaged after GCS summed it
    blob.patch()
    with pytest.raises(BucketError) as error:
        download(gcs, tmp_path)
    message = str(error.value)
    assert message.startswith(
        f"gs://gdm-robovqa/tfrecord/val/val-00000-of-00001 at {gcs.endpoint}: 3 attempts failed"
    )
    assert "GCS lists AAAAAA==" in message
    assert caplog.text.count("val-00000-of-00001: attempt") == 2
    assert [r.range for r in gcs.relay.media("val-00000")] == [None, None, None]
    assert list((tmp_path / "val").iterdir()) == []  # no shard, no part
    del shards["val"]
    assert_downloaded(tmp_path, shards)  # the good shards are not held up by the bad one


def test_a_dropped_connection_is_resumed_and_checked(tmp_path, gcs):
    shards = gcs.put_shards(train=2, val=0)
    gcs.relay.drop("train-00001", after=50_000, times=2)
    download(gcs, tmp_path)
    # Each retry asks for the rest, after the whole 8 KiB blocks the client had written.
    starts = [resumed_at(r) for r in gcs.relay.media("train-00001")]
    assert len(starts) == 3 and 0 == starts[0] < starts[1] - 40_000 < starts[2] - 80_000
    assert_downloaded(tmp_path, shards)


def test_a_connection_that_keeps_dropping_is_a_clear_error(tmp_path, gcs):
    gcs.put_shards(train=1, val=0)
    gcs.put("tfrecord/val/val-00000-of-00001", 2_000_000)
    gcs.relay.drop("val-00000", after=20_000)  # far too little to finish in the tries allowed
    started = time.monotonic()
    with pytest.raises(BucketError) as error:
        download(gcs, tmp_path)
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert f"val-00000-of-00001 at {gcs.endpoint}: 3 attempts failed" in message
    assert "Connection broken" in message or "IncompleteRead" in message
    # Retried by the client within each of our tries, each resuming; the next run resumes too.
    starts = [resumed_at(r) for r in gcs.relay.media("val-00000")]
    assert len(starts) > 3 and 0 == starts[0] < starts[1] < starts[-1]
    assert (tmp_path / "val" / "val-00000-of-00001.part").stat().st_size > starts[-1]


@pytest.mark.parametrize("kind", ["closed port", "silent server"])
def test_an_unreachable_endpoint_is_a_clear_error_not_a_hang(tmp_path, kind):
    with socket.create_server(("127.0.0.1", 0)) as server:  # listens, never answers
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        if kind == "closed port":
            server.close()
        started = time.monotonic()
        with pytest.raises(BucketError) as error:
            download_gcs(SOURCE, tmp_path, endpoint=endpoint, patience=PATIENCE)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert message.startswith(f"cannot list {SOURCE} at {endpoint}: ")
    assert "--config source=DIR" in message


def test_an_empty_prefix_is_an_error(tmp_path, gcs):
    gcs.put_shards()
    with pytest.raises(BucketError, match="gs://gdm-robovqa/nothing has no objects"):
        download(gcs, tmp_path, "gs://gdm-robovqa/nothing")


def test_max_shards_fetches_only_the_first_shards_of_a_split(gcs, tmp_path):
    gcs.put_shards(train=3, val=2)
    shards = download_gcs(SOURCE, tmp_path, workers=1, endpoint=gcs.endpoint, patience=PATIENCE,
                          max_shards={"train": 1, "val": 1})  # fmt: skip
    assert [(s.split, s.shard) for s in shards] == [
        ("train", "train-00000-of-00003"), ("val", "val-00000-of-00002"),
    ]  # fmt: skip
    fetched = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert fetched == ["train/train-00000-of-00003", "val/val-00000-of-00002"]
    media = [r for r in gcs.relay.requests if "alt=media" in r.line]
    assert all("00000-of" in r.line for r in media) and len(media) == 2
