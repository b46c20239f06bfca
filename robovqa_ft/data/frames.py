"""Extract one shard: frames to `images/<video_id>/<NN>.jpg`, and a per-record index.

A shard is published all at once: frames are written to a staging folder and each
clip's folder is renamed into `images/` only when the whole shard has been read,
just before the index appears. A kill at any point leaves no half-written JPEG in
`images/`, and a re-run starts the shard afresh.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError
from PIL import Image
from tqdm import tqdm

from robovqa_ft.core.files import atomic_open
from robovqa_ft.core.space import named_if_full
from robovqa_ft.data.qa import parse_qa_text
from robovqa_ft.data.records import decode_sequence_example
from robovqa_ft.data.tfrecord import iter_tfrecord

log = logging.getLogger(__name__)

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_ID_LENGTH = 100
# Names the shard that published a clip folder, so a duplicate id never mixes two clips.
OWNER_FILE = ".shard"
# Decodable records whose frame counts say whether frames_per_clip suits the data.
FRAME_COUNT_PROBE = 20


class FrameCountError(ValueError):
    """frames_per_clip does not match the data: no record would be usable."""


def frame_name(index: int) -> str:
    return f"{index:02d}.jpg"


def clip_frame_paths(video_id: str, frames_per_clip: int) -> list[str]:
    """The clip's frame paths relative to the images folder, in frame order."""
    return [f"{video_id}/{frame_name(i)}" for i in range(frames_per_clip)]


def video_id_for(unique_id: str | None, shard: str, index: int) -> str:
    """A folder-safe, stable id: the record's own id when it has one, else shard and index."""
    if unique_id is None or not unique_id.strip():
        return sanitize_id(f"{shard}-{index:06d}")
    return sanitize_id(unique_id)


def sanitize_id(raw: str) -> str:
    """`raw` if it is a safe folder name; otherwise a cleaned form plus a hash of `raw`."""
    clean = _UNSAFE_ID_CHARS.sub("_", raw).strip("._-")[:_MAX_ID_LENGTH]
    if clean and clean == raw:
        return clean
    digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:10]
    return f"{clean or 'id'}-{digest}"


def resize_jpeg(data: bytes, size: tuple[int, int], quality: int) -> tuple[bytes, tuple[int, int]]:
    """The frame re-encoded at `size`, and its original size.

    `draft` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT domain, so a
    large frame is never decoded at full size only to be shrunk.
    """
    with Image.open(io.BytesIO(data)) as image:
        original = image.size
        image.draft("RGB", size)
        return resized_jpeg(image, size, quality), original


def resized_jpeg(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    """`image` as a stored frame: RGB, resized to `size`, JPEG at `quality` (also what
    `robovqa_ft.tools.ask` makes of a video's frames, so they match extraction's)."""
    out = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
    return out.getvalue()


@dataclass
class ShardSummary:
    records: int = 0
    clips: int = 0
    skipped: Counter = field(default_factory=Counter)
    extra_texts: int = 0  # records whose texts beyond the first were not read


def extract_shard(
    shard_path: Path | str,
    shard: str,
    images_dir: Path | str,
    staging_dir: Path | str,
    index_path: Path | str,
    frame_size: tuple[int, int],
    frames_per_clip: int,
    jpeg_quality: int,
) -> ShardSummary:
    """Write the frames of every usable record of a shard, and one index line per record."""
    shard_path, images_dir = Path(shard_path), Path(images_dir)
    staging = Path(staging_dir) / shard
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    draft_index = staging / "index.jsonl"
    kept = "nothing of this shard was published, and finished shards are kept"
    try:
        with named_if_full(staging, f"the frames of shard {shard} to", kept):
            summary = _extract_to_staging(
                shard_path, shard, staging, draft_index, tuple(frame_size), frames_per_clip,
                jpeg_quality,
            )  # fmt: skip
            taken = _publish(staging, images_dir, shard)
        with named_if_full(index_path, f"the index of shard {shard}", "finished shards are kept"):
            _write_index(draft_index, index_path, taken, summary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = (summary.records, summary.clips, dict(summary.skipped))
    log.info("%s: %d records, %d clips, skipped %s", shard, *counts)
    return summary


def _extract_to_staging(
    shard_path: Path,
    shard: str,
    staging: Path,
    draft_index: Path,
    size: tuple[int, int],
    frames_per_clip: int,
    jpeg_quality: int,
) -> ShardSummary:
    """Each usable record's frames to `staging/<video_id>/`; a line per record to the draft."""
    summary = ShardSummary()
    seen: set[str] = set()
    counts: list[int] = []  # frame counts of the first decodable records
    with (
        draft_index.open("w", encoding="utf-8") as index,
        tqdm(
            total=shard_path.stat().st_size, unit="B", unit_scale=True, desc=shard, mininterval=5
        ) as progress,
    ):
        for number, (offset, payload) in enumerate(iter_tfrecord(shard_path)):
            progress.update(offset + len(payload) + 16 - progress.n)
            summary.records += 1
            entry = _extract_record(
                payload, shard, number, staging, seen, size, frames_per_clip, jpeg_quality
            )
            entry.update(index=number, offset=offset)
            if "frame_count" in entry and len(counts) < FRAME_COUNT_PROBE:
                counts.append(entry.pop("frame_count"))
                _check_frame_count(counts, frames_per_clip, shard)
            entry.pop("frame_count", None)
            if entry["status"] == "ok":
                summary.clips += 1
                seen.add(entry["video_id"])
            else:
                summary.skipped[entry["reason"]] += 1
                log.warning(
                    "%s record %d (byte %d): skipped, %s: %s",
                    *(shard, number, offset, entry["reason"], entry["detail"]),
                )
            if entry.get("extra_texts"):
                summary.extra_texts += 1
            index.write(json.dumps(entry, ensure_ascii=False) + "\n")
    _check_frame_count(counts, frames_per_clip, shard, ended=True)
    if summary.extra_texts:
        log.warning(
            "%s: %d records hold more than one text; only the first was read (as the official "
            "loader does)", shard, summary.extra_texts,
        )  # fmt: skip
    return summary


def _check_frame_count(counts: list[int], wanted: int, shard: str, ended: bool = False) -> None:
    """Stop at the first shard whose first decodable records (`FRAME_COUNT_PROBE`, or all of
    a shorter shard, at least two) all have one frame count other than `wanted`: the
    setting is wrong, not the records. A single odd record is skipped and counted."""
    if len(counts) < (2 if ended else FRAME_COUNT_PROBE) or set(counts) != {counts[0]}:
        return
    if counts[0] != wanted:
        raise FrameCountError(
            f"{shard}: none of its first {len(counts)} records has frames_per_clip = {wanted} "
            f"frames; all have {counts[0]}. If the data is right, set frames_per_clip: "
            f"{counts[0]} (config.yaml)"
        )


def _skip(video_id: str, reason: str, detail: str) -> dict:
    return {"status": "skipped", "video_id": video_id, "reason": reason, "detail": detail}


def _extract_record(
    payload: bytes,
    shard: str,
    number: int,
    staging: Path,
    seen: set[str],
    size: tuple[int, int],
    frames_per_clip: int,
    jpeg_quality: int,
) -> dict:
    """The index entry of one record; its frames are written to `staging` if it is usable."""
    try:
        raw = decode_sequence_example(payload)
    except DecodeError as error:
        return _skip(video_id_for(None, shard, number), "unparsable_record", str(error))
    video_id = video_id_for(raw.unique_id, shard, number)
    counted = {"frame_count": len(raw.frames)}  # for `_check_frame_count`, not the index
    if video_id in seen:
        detail = f"unique_id {raw.unique_id!r} seen earlier"
        return _skip(video_id, "duplicate_video_id", detail) | counted
    if len(raw.frames) != frames_per_clip:
        detail = f"{len(raw.frames)} frames, expected {frames_per_clip}"
        return _skip(video_id, "wrong_frame_count", detail) | counted
    parsed = parse_qa_text(raw.text or "")
    if not parsed.qas:
        detail = "no text" if raw.text is None else f"no usable QA block ({dict(parsed.skipped)})"
        return _skip(video_id, "no_valid_qa", detail) | counted
    clip_dir = staging / video_id
    clip_dir.mkdir()
    source_sizes = set()
    for i, frame in enumerate(raw.frames):
        try:
            jpeg, original = resize_jpeg(frame, size, jpeg_quality)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            shutil.rmtree(clip_dir)
            return _skip(video_id, "undecodable_frame", f"frame {i}: {error}") | counted
        (clip_dir / frame_name(i)).write_bytes(jpeg)
        source_sizes.add(original)
    return {
        "status": "ok",
        "video_id": video_id,
        "unique_id": raw.unique_id,
        "source_size": "x".join(map(str, max(source_sizes))),
        "qas": [
            {"tag": qa.tag, "family": qa.family, "prompt": qa.prompt, "answer": qa.answer}
            for qa in parsed.qas
        ],
        "qa_skipped": dict(parsed.skipped),
        "extra_texts": raw.extra_texts,
    } | counted


def _publish(staging: Path, images_dir: Path, shard: str) -> dict[str, str]:
    """Move each finished clip folder into `images_dir`; a folder rename is atomic.

    A clip id that another shard has already published keeps that shard's frames
    (first come, first kept, so frames and answers always match); returns those ids
    with the shard that owns them.
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    taken = {}
    clip_dirs = [d for d in staging.iterdir() if d.is_dir()]
    for clip_dir in clip_dirs:  # every write before the first rename: a full disk publishes none
        (clip_dir / OWNER_FILE).write_text(shard, encoding="utf-8")
    for clip_dir in clip_dirs:
        target = images_dir / clip_dir.name
        for _ in range(3):
            try:
                clip_dir.rename(target)  # fails while the target exists and is not empty
                break
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise  # not a folder in the way: a full disk, a read-only one
                owner = _owner(target)
                if owner not in (None, shard):
                    taken[clip_dir.name] = owner
                    break
                shutil.rmtree(target, ignore_errors=True)  # this shard's earlier run
        else:
            raise OSError(f"cannot replace {target}: remove it by hand and re-run")
    return taken


def _owner(clip_dir: Path) -> str | None:
    try:
        return (clip_dir / OWNER_FILE).read_text(encoding="utf-8")
    except OSError:
        return None


def _write_index(
    draft: Path, index_path: Path | str, taken: dict[str, str], summary: ShardSummary
) -> None:
    """The shard's final index: the draft, with clips whose id another shard owns marked skipped."""
    with draft.open(encoding="utf-8") as lines, atomic_open(index_path) as index:
        for line in lines:
            entry = json.loads(line)
            owner = taken.get(entry["video_id"])
            if entry["status"] == "ok" and owner is not None:
                detail = f"frames of this id were published by shard {owner}"
                log.warning("%s record %d: skipped, duplicate_video_id: %s", entry["video_id"],
                            entry["index"], detail)  # fmt: skip
                entry = {**_skip(entry["video_id"], "duplicate_video_id", detail),
                         "index": entry["index"], "offset": entry["offset"]}  # fmt: skip
                summary.clips -= 1
                summary.skipped["duplicate_video_id"] += 1
                line = json.dumps(entry, ensure_ascii=False) + "\n"
            index.write(line)
