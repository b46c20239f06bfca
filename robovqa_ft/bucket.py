"""Where the shards come from: the public GCS bucket, a local copy, or the demo generator.

Every source ends as one manifest (`split`, `shard`, `path`, `bytes` per line) that
the frame extraction fans out over. GCS shards are downloaded in parallel to a
folder that is not a Snakemake output, so a complete shard is never fetched twice.
"""

from __future__ import annotations

import base64
import csv
import logging
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
from tqdm import tqdm

from robovqa_ft.files import atomic_open

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DEFAULT_SOURCE = "gs://gdm-robovqa/tfrecord"
# The anonymised bucket of the paper's review, still named by the official notebook.
SOURCE_ALIASES = {"gs://anon_robovqa/tfrecord": DEFAULT_SOURCE}
MANIFEST_FIELDS = ("split", "shard", "path", "bytes")
# Files that an interrupted download leaves: ours, and gcloud/gsutil's.
PARTIAL_SUFFIXES = (".part", ".gstmp", "_.gstmp")
DOWNLOAD_ATTEMPTS = 3
RETRY_WAIT_SECONDS = 10


class BucketError(RuntimeError):
    """The source cannot provide shards; the message says what to do instead."""


@dataclass(frozen=True)
class Shard:
    split: str
    shard: str
    path: str
    bytes: int


def write_manifest(path: Path | str, shards: Iterable[Shard]) -> None:
    with atomic_open(path) as handle:
        writer = csv.DictWriter(handle, MANIFEST_FIELDS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for shard in shards:
            writer.writerow(shard.__dict__)


def read_manifest(path: Path | str) -> list[Shard]:
    with open(path, encoding="utf-8") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return [Shard(r["split"], r["shard"], r["path"], int(r["bytes"])) for r in rows]


def local_shards(root: Path | str) -> list[Shard]:
    """The shards of a local folder laid out like the bucket (`train/train*`, `val/val*`)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise BucketError(f"source {root} is not a folder (expected {root}/train/train*, ...)")
    shards = [
        Shard(split, path.name, str(path), path.stat().st_size)
        for split in SPLITS
        for path in sorted((root / split).glob(f"{split}*"))
        if path.is_file() and not path.name.endswith(PARTIAL_SUFFIXES)
    ]
    if not shards:
        raise BucketError(
            f"no shards in {root}: expected files matching {root}/train/train* and "
            f"{root}/val/val* (the layout of {DEFAULT_SOURCE})"
        )
    return shards


def parse_gcs_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of a gs:// URI, after resolving the known aliases."""
    uri = SOURCE_ALIASES.get(uri.rstrip("/"), uri.rstrip("/"))
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    if not bucket:
        raise BucketError(f"{uri!r} names no bucket; expected gs://BUCKET/PREFIX")
    return bucket, prefix


def gcs_crc32c(path: Path, chunk: int = 1 << 22) -> str:
    """The file's CRC-32C in the base64 form GCS reports for objects."""
    checksum = google_crc32c.Checksum()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode()


def is_complete(path: Path, size: int, crc32c: str | None) -> bool:
    """A local copy matches the object by size and, where GCS gives it, checksum."""
    return (
        path.is_file()
        and path.stat().st_size == size
        and (crc32c is None or gcs_crc32c(path) == crc32c)
    )


def _anonymous_bucket(name: str) -> Any:
    from google.cloud import storage

    return storage.Client.create_anonymous_client().bucket(name)


def download_gcs(
    uri: str, dest: Path | str, workers: int = 8, bucket: Any = None, timeout: float = 60
) -> list[Shard]:
    """Download the shards under `uri` into `dest`, skipping those already complete.

    `bucket` defaults to an anonymous client's bucket (the data is public); tests pass
    a stand-in with the same `list_blobs` and `Blob.download_to_filename`.
    """
    from google.cloud.storage.retry import DEFAULT_RETRY

    name, prefix = parse_gcs_uri(uri)
    dest = Path(dest)
    bucket = bucket if bucket is not None else _anonymous_bucket(name)
    retry = DEFAULT_RETRY.with_timeout(timeout)  # fail within a minute when offline
    try:
        blobs = [
            blob
            for split in SPLITS
            for blob in bucket.list_blobs(
                prefix="/".join(filter(None, (prefix, split, split))), timeout=timeout, retry=retry
            )
            if not blob.name.endswith("/")
        ]
    except Exception as error:  # the client raises many types: transport, auth, API
        raise BucketError(
            f"cannot list gs://{name}/{prefix}: {type(error).__name__}: {error}\n"
            "If this machine has no access to Google Cloud Storage, copy the shards "
            f"elsewhere (gcloud storage cp -r gs://{name}/{prefix} DIR) and run with "
            "--config source=DIR (a folder with train/train* and val/val*)."
        ) from error
    if not blobs:
        raise BucketError(f"gs://{name}/{prefix} has no objects under train/train* or val/val*")

    def fetch(blob: Any) -> Shard:
        split = Path(blob.name).parent.name
        path = dest / split / Path(blob.name).name
        if is_complete(path, blob.size, blob.crc32c):
            log.info("%s: already complete, not fetched again", path)
        else:
            _download(blob, path, timeout)
        progress.update(blob.size)
        return Shard(split, path.name, str(path.resolve()), blob.size)

    total = sum(blob.size for blob in blobs)
    log.info("gs://%s/%s: %d shards, %.1f GB", name, prefix, len(blobs), total / 1e9)
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="download", mininterval=5) as progress,
        ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        return list(pool.map(fetch, blobs))


def _download(blob: Any, path: Path, timeout: float) -> None:
    """Fetch one object to `path` via `path.part`, a few times if the connection drops."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            # The client verifies the CRC-32C itself and raises on a mismatch.
            blob.download_to_filename(
                str(part), checksum="crc32c", timeout=timeout, retry=DEFAULT_RETRY
            )
            part.replace(path)
            return
        except Exception as error:  # transport, checksum, API: all worth another try
            if attempt == DOWNLOAD_ATTEMPTS:
                raise BucketError(f"{blob.name}: {attempt} attempts failed: {error}") from error
            log.warning("%s: attempt %d failed (%s); retrying", blob.name, attempt, error)
            time.sleep(RETRY_WAIT_SECONDS * attempt)


def source_folders(source: str, download_dir: str) -> list[str]:
    """The existing folders whose shards the manifest lists: a shard added to or deleted
    from them changes their time stamp, so the download step runs again."""
    if source == "demo":
        return []
    if source.startswith("gs://"):
        root = Path(download_dir, *parse_gcs_uri(source))
    else:
        root = Path(source)
    return [str(root / split) for split in SPLITS if (root / split).is_dir()]


def prepare_source(
    source: str, manifest: Path | str, download_dir: Path | str, workers: int, demo: dict
) -> list[Shard]:
    """Resolve `source` (gs:// URI, local folder or `demo`) to shards and write the manifest."""
    if source.startswith("gs://"):
        shards = download_gcs(source, Path(download_dir, *parse_gcs_uri(source)), workers)
    elif source == "demo":
        from robovqa_ft.demo_bucket import generate_demo_bucket

        root = Path(download_dir) / "demo"
        shutil.rmtree(root, ignore_errors=True)  # generated afresh: its settings may have changed
        generate_demo_bucket(root, **demo)
        shards = local_shards(root)
    else:
        shards = local_shards(source)  # used in place, never copied
    write_manifest(manifest, shards)
    for split in SPLITS:
        chosen = [s for s in shards if s.split == split]
        log.info("%s: %d shards, %.2f GB", split, len(chosen), sum(s.bytes for s in chosen) / 1e9)
    return shards
