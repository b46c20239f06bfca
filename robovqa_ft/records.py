"""Read RoboVQA TFRecord shards: the record framing and the SequenceExample inside.

The framing is read here rather than with `tf.data.TFRecordDataset` so that a
truncated or corrupt shard is reported with its exact byte offset. TensorFlow is
used only to decode the protocol buffers, and only in processes without torch.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import google_crc32c

_MASK_DELTA = 0xA282EAD8


class CorruptShardError(RuntimeError):
    """A shard whose framing or checksums are broken: nothing from it is published."""

    def __init__(self, shard: Path | str, offset: int, problem: str):
        super().__init__(
            f"{shard}: {problem} at byte offset {offset}. The shard is damaged or "
            "was cut short; fetch it again (delete it and re-run the download rule)."
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


@dataclass
class RawClip:
    """The fields of one RoboVQA record that the pipeline uses."""

    unique_id: str | None
    frames: list[bytes]
    text: str | None
    extra_texts: int = 0  # text values beyond the first, which are not read


def import_tensorflow():
    if "torch" in sys.modules:
        raise RuntimeError(
            "TensorFlow must not be imported in a process that uses torch (the two "
            "have been seen to crash together); read TFRecords in their own process."
        )
    import tensorflow as tf

    return tf


def decode_sequence_example(payload: bytes) -> RawClip:
    """The frames, text and id of one serialized `tf.train.SequenceExample`."""
    tf = import_tensorflow()
    example = tf.train.SequenceExample.FromString(payload)
    features = example.feature_lists.feature_list
    # An empty frame stays in place (as b"") so that it is reported as undecodable.
    frames = [
        f.bytes_list.value[0] if f.bytes_list.value else b"" for f in features["images"].feature
    ]
    texts = features["texts"].feature if "texts" in features else []
    values = [value for feature in texts for value in feature.bytes_list.value]
    text = values[0].decode("utf-8", "replace") if values else None
    context = example.context.feature
    unique_id = None
    if "unique_id" in context and context["unique_id"].bytes_list.value:
        unique_id = context["unique_id"].bytes_list.value[0].decode("utf-8", "replace")
    return RawClip(unique_id, frames, text, extra_texts=max(0, len(values) - 1))
