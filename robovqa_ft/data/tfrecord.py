"""TFRecord framing: each record's length, payload and their masked CRC-32Cs, read in
pure Python (no TensorFlow), so that a truncated or corrupt file is reported with its
exact byte offset, and so that a training process can read TensorBoard's event files,
which are framed the same way, without TensorFlow.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

_MASK_DELTA = 0xA282EAD8


# Where a gs:// source's shards are fetched to: the download rule's download_dir, under
# the working directory every job runs in.
DOWNLOADS = Path("results", "bucket")


class CorruptShardError(RuntimeError):
    """A shard whose framing or checksums are broken: nothing from it is published."""

    def __init__(self, shard: Path | str, offset: int, problem: str):
        downloaded = DOWNLOADS.absolute() in Path(shard).absolute().parents
        advice = (
            "delete it and run again with --forcerun download, which fetches it anew"
            if downloaded  # a local source's own file: deleting it would drop its clips
            else "replace it with a good copy and run again (deleted, its clips would be "
            "left out without an error)"
        )
        super().__init__(
            f"{shard}: {problem} at byte offset {offset}. The shard is damaged or "
            f"was cut short: {advice}."
        )
        self.shard, self.offset, self.problem = str(shard), offset, problem


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _read_exact(stream: BinaryIO, size: int, shard: Path, offset: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise CorruptShardError(shard, offset, f"truncated record ({what})")
    return data


def not_a_tfrecord(path: Path | str) -> str | None:
    """Why `path` is not a TFRecord file, judged by its first record's length and the
    length's CRC (12 bytes, so every shard of a source is checked before any is read);
    None when it starts like one."""
    with Path(path).open("rb") as stream:
        header = stream.read(12)
    if not header:
        return "it is empty"
    if len(header) < 12:
        return f"it is {len(header)} bytes long, shorter than one record's header"
    if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
        return "its first 12 bytes are not a record length and its CRC"
    return None


def iter_tfrecord(path: Path | str) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset, payload) of each record of a TFRecord file, checking both CRCs."""
    path = Path(path)
    with path.open("rb") as stream:
        offset = 0
        while True:
            header = stream.read(12)
            if not header:
                return
            if len(header) != 12:
                raise CorruptShardError(path, offset, "truncated record (length header)")
            length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
            if masked_crc32c(length_bytes) != length_crc:
                raise CorruptShardError(path, offset, "CRC mismatch in record length")
            (length,) = struct.unpack("<Q", length_bytes)
            payload = _read_exact(stream, length, path, offset, "payload")
            (payload_crc,) = struct.unpack("<I", _read_exact(stream, 4, path, offset, "CRC"))
            if masked_crc32c(payload) != payload_crc:
                raise CorruptShardError(path, offset, "CRC mismatch in record data")
            yield offset, payload
            offset += 12 + length + 4
