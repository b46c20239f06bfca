"""Where the shards come from: the public GCS bucket, a local copy, or the demo generator.

Every source ends as one manifest (`split`, `shard`, `path`, `bytes` per line) that
the frame extraction fans out over. GCS shards are downloaded in parallel to a
folder that is not a Snakemake output, so a complete shard is never fetched twice and
a partial one is resumed.
"""

from __future__ import annotations

import base64
import csv
import logging
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
from tqdm import tqdm

from robovqa_ft.core.files import atomic_open
from robovqa_ft.core.space import disk_full, is_disk_full, require_free_space, size_text
from robovqa_ft.data.tfrecord import not_a_tfrecord

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DEFAULT_SOURCE = "gs://gdm-robovqa/tfrecord"
# The anonymised bucket of the paper's review, still named by the official notebook.
SOURCE_ALIASES = {"gs://anon_robovqa/tfrecord": DEFAULT_SOURCE}
MANIFEST_FIELDS = ("split", "shard", "path", "bytes")
# Files that an interrupted download leaves: ours, and gcloud/gsutil's.
PARTIAL_SUFFIXES = (".part", ".gstmp", "_.gstmp")
GCS_ENDPOINT = "https://storage.googleapis.com"
# The client library's own convention for pointing at a GCS emulator (tests do).
EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


class BucketError(RuntimeError):
    """The source cannot provide shards; the message says what to do instead."""


@dataclass(frozen=True)
class Patience:
    """How long talking to GCS may take before it counts as failed: the production values,
    which tests against an emulator shrink to about a second."""

    timeout: float = 60  # seconds per HTTP request: to connect, and between two reads
    list_deadline: float = 60  # seconds the client retries the listing: offline fails in a minute
    download_deadline: float = 120  # seconds it retries one download (its DEFAULT_RETRY's)
    backoff: float = 1  # seconds before the client's first retry, then doubling (DEFAULT_RETRY's)
    attempts: int = 3  # our own tries at a shard, each resuming where the last one stopped
    retry_wait: float = 10  # seconds before our try n + 1, times n

    def retry(self, deadline: float) -> Any:
        """The client's retry of one call: DEFAULT_RETRY's errors, these waits."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(deadline).with_delay(initial=self.backoff)


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
    # A README, .DS_Store or stats file beside the shards is harmless: said, not fatal.
    listed = {Path(s.path) for s in shards}
    ignored = [f"{split}/{path.name}" for split in SPLITS if (root / split).is_dir()
               for path in sorted((root / split).iterdir()) if path not in listed]  # fmt: skip
    if ignored:
        log.warning("%s: ignored %d entries not named like shards (train/train*, val/val*) or "
                    "half-copied: %s", root, len(ignored), ", ".join(ignored))  # fmt: skip
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


def _anonymous_bucket(name: str, endpoint: str) -> Any:
    from google.cloud import storage

    client = storage.Client(
        project=None,  # anonymous: no project to bill
        client_options={"api_endpoint": endpoint},
        use_auth_w_custom_endpoint=False,  # anonymous credentials, as the endpoint is given
    )
    return client.bucket(name)


def download_gcs(
    uri: str,
    dest: Path | str,
    workers: int = 8,
    endpoint: str = GCS_ENDPOINT,
    patience: Patience = Patience(),
    max_shards: dict | None = None,
) -> list[Shard]:
    """Download the shards under `uri` into `dest` (the first `max_shards[split]` of a
    split by name, where given), skipping those already complete.

    The client is anonymous (the data is public); `endpoint` and `patience` exist so that
    tests run this same code against a local emulator.
    """
    name, prefix = parse_gcs_uri(uri)
    dest = Path(dest)
    bucket = _anonymous_bucket(name, endpoint)
    retry = patience.retry(patience.list_deadline)
    try:
        blobs = [
            blob
            for split in SPLITS
            for blob in bucket.list_blobs(
                prefix="/".join(filter(None, (prefix, split, split))),
                timeout=patience.timeout,
                retry=retry,
            )
            if not blob.name.endswith("/")
        ]
    except Exception as error:  # the client raises many types: transport, auth, API
        raise BucketError(
            f"cannot list gs://{name}/{prefix} at {endpoint}: {type(error).__name__}: {error}\n"
            "If this machine has no access to Google Cloud Storage, copy the shards "
            f"elsewhere (gcloud storage cp -r gs://{name}/{prefix} DIR) and run with "
            "--config source=DIR (a folder with train/train* and val/val*)."
        ) from error
    if not blobs:
        raise BucketError(f"gs://{name}/{prefix} has no objects under train/train* or val/val*")
    blobs = first_shards(blobs, max_shards, lambda b: Path(b.name).parent.name,
                         lambda b: Path(b.name).name)  # fmt: skip

    def local(blob: Any) -> Path:
        return dest / Path(blob.name).parent.name / Path(blob.name).name

    def fetch(blob: Any) -> Shard:
        split, path = Path(blob.name).parent.name, local(blob)
        if is_complete(path, blob.size, blob.crc32c):
            log.info("%s: already complete, not fetched again", path)
        else:
            _download(blob, path, endpoint, patience)
        progress.update(blob.size)
        return Shard(split, path.name, str(path.resolve()), blob.size)

    total = sum(blob.size for blob in blobs)
    log.info("gs://%s/%s: %d shards, %.1f GB", name, prefix, len(blobs), total / 1e9)
    # Checked once, before the first byte. Still to fetch: what the listing says the shards
    # weigh, less those here at their listed size (their CRC-32C is checked below) and
    # the bytes of a `.part`, which is resumed. Their frames follow on the same results/
    # disk, estimated at the shards' own size: the shards hold little but JPEG frames,
    # which extraction re-encodes at frame_size, no larger where frame_size and
    # jpeg_quality are no higher than the source's. Frames of the shards already here
    # are not counted: `--forcerun download` re-lists a download whose frames exist.
    missing = sum(_bytes_to_fetch(local(blob), blob.size) for blob in blobs)
    require_free_space(dest, 2 * missing, f"the download of {size_text(missing)} and its frames")
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="download", mininterval=5) as progress,
        ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        return list(pool.map(fetch, blobs))


def _bytes_to_fetch(path: Path, size: int) -> int:
    """What fetching the object of `size` bytes to `path` adds, as `_fetch_rest` resumes."""
    part = path.with_name(path.name + ".part")
    if path.is_file() and path.stat().st_size == size:
        return 0
    return size - part.stat().st_size if part.is_file() and part.stat().st_size <= size else size


def _download(blob: Any, path: Path, endpoint: str, patience: Patience) -> None:
    """Fetch one object to `path` via `path.part`, a few times if a try fails.

    A try resumes after the bytes that the one before left in `path.part` (a Range
    request), rather than fetching the shard anew: tries fail on flaky links, where
    starting a shard of hundreds of MB over each time may never finish, and a killed job
    keeps what its shards in flight had fetched. Resuming is safe because the whole file's
    CRC-32C is checked after every try, and a part that fails it (a changed object, a
    damaged file) is deleted, so the next try starts from the first byte.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    retry = patience.retry(patience.download_deadline)
    for attempt in range(1, patience.attempts + 1):
        try:
            _fetch_rest(blob, part, patience.timeout, retry)
            part.replace(path)
            return
        except Exception as error:  # transport, checksum, API: all worth another try
            if is_disk_full(error):  # but not a full disk
                raise disk_full(part, "a shard", "complete shards are kept, and this one "
                                "resumes from what its .part holds") from error  # fmt: skip
            if attempt == patience.attempts:
                raise BucketError(
                    f"gs://{blob.bucket.name}/{blob.name} at {endpoint}: {attempt} attempts "
                    f"failed, the last with {type(error).__name__}: {error}"
                ) from error
            log.warning("%s: attempt %d failed (%s); retrying", blob.name, attempt, error)
            time.sleep(patience.retry_wait * attempt)


def _fetch_rest(blob: Any, part: Path, timeout: float, retry: Any) -> None:
    """Append to `part` the bytes of `blob` that it lacks, then check the whole file.

    The check is ours, not the client's: the client skips its own whenever it resumed a
    dropped transfer (it checks no 206 answer), so it would miss the very case resuming is for.
    """
    offset = part.stat().st_size if part.is_file() else 0
    if offset > blob.size:  # not the beginning of this object
        offset = 0
    if offset == 0 or offset < blob.size:  # a part as long as the object needs only the check
        with part.open("ab" if offset else "wb") as handle:
            blob.download_to_file(
                handle, start=offset or None, checksum=None, timeout=timeout, retry=retry
            )
    crc32c = gcs_crc32c(part)
    if blob.crc32c is not None and crc32c != blob.crc32c:
        part.unlink()
        raise BucketError(
            f"the {'resumed ' if offset else ''}download's CRC-32C is {crc32c}, GCS lists "
            f"{blob.crc32c}: {part.name} deleted"
        )


def source_folders(source: str) -> list[str]:
    """A local source's split folders, whose shards the manifest lists: a shard added to
    or deleted from them changes their time stamp, so the listing is redone. None for
    gs:// (its listing is known only online, and a dry run stays offline: it is redone
    when asked, `--forcerun download`) or the demo (its settings are params)."""
    if source == "demo" or source.startswith("gs://"):
        return []
    root = Path(source)
    return [str(root / split) for split in SPLITS if (root / split).is_dir()]


def prepare_source(
    source: str,
    manifest: Path | str,
    download_dir: Path | str,
    workers: int,
    demo: dict,
    max_shards: dict | None = None,
) -> list[Shard]:
    """Resolve `source` (gs:// URI, local folder or `demo`) to shards and write the manifest.
    `max_shards` ({split: N or None}) keeps the first N shards of a split by name: a smoke
    test or a first run on part of the data fetches and extracts only those."""
    if source.startswith("gs://"):
        endpoint = os.environ.get(EMULATOR_VARIABLE, GCS_ENDPOINT)
        shards = download_gcs(source, Path(download_dir, *parse_gcs_uri(source)), workers,
                              endpoint=endpoint, max_shards=max_shards)  # fmt: skip
    elif source == "demo":
        from robovqa_ft.data.demo_bucket import generate_demo_bucket

        root = Path(download_dir) / "demo"
        shutil.rmtree(root, ignore_errors=True)  # generated afresh: its settings may have changed
        generate_demo_bucket(root, **demo)
        shards = local_shards(root)
    else:
        shards = local_shards(source)  # used in place, never copied
    shards = first_shards(shards, max_shards, lambda s: s.split, lambda s: s.shard)
    refuse_non_tfrecords(source, shards)
    write_manifest(manifest, shards)
    for split in SPLITS:
        chosen = [s for s in shards if s.split == split]
        log.info("%s: %d shards, %.2f GB", split, len(chosen), sum(s.bytes for s in chosen) / 1e9)
    return shards


def first_shards(items: list, max_shards: dict | None, split_of, name_of) -> list:
    """The first `max_shards[split]` items of each split by name; every one where the
    split's limit is None."""
    kept = []
    for split in SPLITS:
        chosen = sorted((item for item in items if split_of(item) == split), key=name_of)
        limit = (max_shards or {}).get(split)
        kept += chosen if limit is None else chosen[:limit]
    return kept


def refuse_non_tfrecords(source: str, shards: list[Shard]) -> None:
    """Stop before any extraction when a file named like a shard is not a TFRecord (a
    `train-stats.json`, a copy cut short to nothing), naming every such file."""
    bad = [f"{s.path} ({why})" for s in shards if (why := not_a_tfrecord(s.path))]
    if bad:
        raise BucketError(
            f"source {source}: {len(bad)} files named like shards are not TFRecord files: "
            f"{'; '.join(bad)}. Nothing was extracted. Move them out of the split folders, "
            "or replace them with good copies of the shards (from a gs:// source they are "
            "the bucket's own objects: copy its good shards to a folder and use that)"
        )
