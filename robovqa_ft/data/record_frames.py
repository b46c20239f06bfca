"""The frames of clips of one RoboVQA TFRecord shard, written as extraction writes them.

`robovqa-ask` runs this as a process of its own (`python -m robovqa_ft.data.record_frames`):
decoding a record needs TensorFlow, which must never join the model's process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf.message import DecodeError
from PIL import Image

from robovqa_ft.data.frames import frame_name, resize_jpeg, video_id_for
from robovqa_ft.data.records import decode_sequence_example
from robovqa_ft.data.tfrecord import CorruptShardError, iter_tfrecord, not_a_tfrecord

# What the parent reads back: each asked clip id -> the folder (under OUT) of its frames.
CLIPS_FILE = "clips.json"
SHOWN_IDS = 5  # ids an error lists, so that the user sees what the shard holds


class RecordFramesError(ValueError):
    """A shard or clip this cannot give frames for; the message says which and why."""


def write_record_frames(
    shard_path: Path | str,
    out_dir: Path | str,
    clips: list[str],
    frame_size: int,
    jpeg_quality: int,
    frames_per_clip: int,
) -> dict[str, str]:
    """Each of `clips` (a video id as extraction names it, or the record's `unique_id`;
    none: the shard's one record) to `out_dir/<video_id>/NN.jpg`, resized and re-encoded
    by extraction's own function. Returns and writes (`CLIPS_FILE`) asked id -> folder."""
    shard_path, out_dir = Path(shard_path), Path(out_dir)
    if not shard_path.is_file():
        raise RecordFramesError(f"{shard_path}: no such file")
    problem = not_a_tfrecord(shard_path)
    if problem:
        raise RecordFramesError(f"{shard_path} is not a TFRecord shard: {problem}")
    shard, wanted = shard_path.name, set(clips)
    found: dict[str, str] = {}
    ids = []  # every record's video id, for the errors
    try:
        for number, (_, payload) in enumerate(iter_tfrecord(shard_path)):
            try:
                raw = decode_sequence_example(payload)
            except DecodeError as error:
                raise RecordFramesError(f"{shard_path} record {number}: {error}") from None
            video_id = video_id_for(raw.unique_id, shard, number)
            ids.append(video_id)
            first = {video_id} if number == 0 else set()  # no clip named: the only record
            names = {video_id, raw.unique_id} & wanted if clips else first
            if names and video_id not in found.values():  # a duplicate id: the first is kept
                _write_clip(raw.frames, out_dir / video_id, f"{shard_path} record {number} "
                            f"({video_id})", frame_size, jpeg_quality, frames_per_clip)  # fmt: skip
                found |= dict.fromkeys(names, video_id)
    except CorruptShardError as error:
        raise RecordFramesError(str(error)) from None
    if not clips and len(ids) != 1:
        raise RecordFramesError(
            f"{shard_path} holds {len(ids)} clips: name one (--clip, or each question's "
            f"clip), e.g. {', '.join(ids[:SHOWN_IDS])}"
        )
    missing = sorted(wanted - found.keys())
    if missing:
        raise RecordFramesError(
            f"{shard_path} has no clip {', '.join(missing)}; its {len(ids)} clips include "
            f"{', '.join(ids[:SHOWN_IDS])}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLIPS_FILE).write_text(json.dumps(found), encoding="utf-8")
    return found


def _write_clip(
    frames: list[bytes],
    clip_dir: Path,
    where: str,
    frame_size: int,
    jpeg_quality: int,
    frames_per_clip: int,
) -> None:
    if len(frames) != frames_per_clip:
        raise RecordFramesError(
            f"{where} has {len(frames)} frames; a clip has frames_per_clip = {frames_per_clip}"
        )
    clip_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        try:
            jpeg, _ = resize_jpeg(frame, (frame_size, frame_size), jpeg_quality)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise RecordFramesError(f"{where}: frame {i} cannot be decoded: {error}") from None
        (clip_dir / frame_name(i)).write_bytes(jpeg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shard", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--clip", action="append", default=[], help="a clip id (repeatable)")
    parser.add_argument("--frame-size", type=int, required=True)
    parser.add_argument("--jpeg-quality", type=int, required=True)
    parser.add_argument("--frames-per-clip", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        write_record_frames(args.shard, args.out_dir, args.clip, args.frame_size,
                            args.jpeg_quality, args.frames_per_clip)  # fmt: skip
    except RecordFramesError as error:
        sys.exit(f"error: {error}")  # the last line of stderr: what the parent reports


if __name__ == "__main__":
    main()
