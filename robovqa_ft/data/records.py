"""Read RoboVQA records: the SequenceExample inside each TFRecord (the framing is
tfrecord.py's). TensorFlow is used only to decode the protocol buffers, and only in
processes without torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


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
