"""Split clips by video and write the curriculum JSONL for both stages, plus metadata.

Stage 1 has one question per line, stage 2 one clip per line with all its QAs as
turns; both come from the same clip split, so no val clip is trained on by either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from robovqa_ft.core.files import atomic_files, write_json_atomic
from robovqa_ft.core.space import named_if_full
from robovqa_ft.data.bucket import SPLITS
from robovqa_ft.data.frames import clip_frame_paths
from robovqa_ft.data.qa import FAMILIES, answer_type

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2")


def jsonl_paths(root: str = "results/data") -> dict[str, str]:
    """The four curriculum files, keyed `stage1_train` ... `stage2_val` as the rule names them."""
    return {
        f"{stage}_{split}": f"{root}/{stage}/{split}.jsonl" for stage in STAGES for split in SPLITS
    }


def unit_hash(seed: int, purpose: str, video_id: str) -> float:
    """A number in [0, 1) fixed by the seed, the purpose and the video id alone."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    bucket_splits: dict[str, str], method: str, val_ratio: float, seed: int
) -> dict[str, str]:
    """video_id -> "train" or "val".

    `hash` pools both bucket splits; a clip is in val when its seeded hash falls below
    `val_ratio`, so its split never depends on which other clips are present (a partial
    copy or a re-parse cannot move a val clip into train). `official` keeps the bucket's.
    """
    if method == "official":
        return dict(bucket_splits)
    if method != "hash":
        raise ValueError(f"split method {method!r} is not 'hash' or 'official'")
    return {
        vid: "val" if unit_hash(seed, "val", vid) < val_ratio else "train" for vid in bucket_splits
    }


def select_subset(splits: dict[str, str], subset_ratio: float, seed: int) -> dict[str, str]:
    """The clips whose subset hash falls below `subset_ratio`, with their split.

    Independent of the split hash, so each split keeps about the same share; a smaller
    ratio keeps a subset of what a larger one keeps.
    """
    return {
        vid: split for vid, split in splits.items() if unit_hash(seed, "subset", vid) < subset_ratio
    }


def read_shard_indexes(index_paths: Iterable[Path | str]) -> tuple[list[dict], Counter]:
    """The usable clips of all shards in order, and the skipped records by reason.

    A video id seen in an earlier shard is skipped as a duplicate.
    """
    clips, skipped, seen = [], Counter(), set()
    for path in index_paths:
        split = Path(path).parent.name
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                if entry["status"] == "ok" and entry["video_id"] in seen:
                    entry.update(status="skipped", reason="duplicate_video_id")
                    log.warning("%s: video id %s already seen; skipped", path, entry["video_id"])
                if entry["status"] != "ok":
                    skipped[entry["reason"]] += 1
                    continue
                seen.add(entry["video_id"])
                clips.append({**entry, "bucket_split": split})
    return clips, skipped


def stage1_lines(clip: dict, images: list[str]) -> list[dict]:
    return [
        {
            "id": f"{clip['video_id']}-{k:02d}",
            "video_id": clip["video_id"],
            "images": images,
            "task": qa["family"],
            "answer_type": answer_type(qa["tag"]),
            "conversations": [
                {"from": "human", "value": qa["prompt"]},
                {"from": "gpt", "value": qa["answer"]},
            ],
        }
        for k, qa in enumerate(clip["qas"])
    ]


def stage2_line(clip: dict, images: list[str]) -> dict:
    turns = []
    for qa in clip["qas"]:
        turns += [{"from": "human", "value": qa["prompt"]}, {"from": "gpt", "value": qa["answer"]}]
    return {
        "id": clip["video_id"],
        "video_id": clip["video_id"],
        "images": images,
        "task": "multi",
        "tasks": [qa["family"] for qa in clip["qas"]],
        "answer_types": [answer_type(qa["tag"]) for qa in clip["qas"]],
        "conversations": turns,
    }


def build_jsonl(
    index_paths: Iterable[Path | str],
    outputs: dict[str, Path | str],
    metadata_path: Path | str,
    split: str,
    val_ratio: float,
    split_seed: int,
    subset_ratio: float,
    frames_per_clip: int,
    frame_size: list[int],
    jpeg_quality: int,
    source: str,
    frame_rate: float,
) -> dict:
    """Write the four files of `outputs` (keyed as `jsonl_paths`) and the metadata; returns it.

    The metadata records every setting that made the frames and the samples (frame count,
    size and JPEG quality, split and subset): the training fingerprint holds it, so a
    checkpoint is never resumed on other data. `frame_rate` is the stored frames' nominal
    rate (the records give no times), recorded as such."""
    index_paths = sorted(map(Path, index_paths))
    clips, skipped = read_shard_indexes(index_paths)
    if not clips:
        raise ValueError(f"no usable clip in {len(index_paths)} shards; skipped: {dict(skipped)}")
    splits = assign_splits(
        {c["video_id"]: c["bucket_split"] for c in clips}, split, val_ratio, split_seed
    )
    kept = select_subset(splits, subset_ratio, split_seed)
    stats = {s: _empty_split_stats() for s in SPLITS}
    # A full disk names the file it hit: while writing a line, or at the end, when each
    # file's buffer is flushed (the error names it then).
    written = "the curriculum file"
    with (
        named_if_full(Path(outputs["stage1_train"]).parent, written),
        atomic_files(outputs) as files,  # an error leaves none of the four files
    ):

        def write(key: str, line: dict) -> None:
            with named_if_full(outputs[key], written):
                files[key].write(json.dumps(line, ensure_ascii=False) + "\n")

        for clip in clips:
            target = kept.get(clip["video_id"])
            if target is None:
                continue
            images = clip_frame_paths(clip["video_id"], frames_per_clip)
            for line in stage1_lines(clip, images):
                write(f"stage1_{target}", line)
            write(f"stage2_{target}", stage2_line(clip, images))
            _count(stats[target], clip)
    qa_skipped = sum((Counter(c["qa_skipped"]) for c in clips), Counter())
    metadata = {
        "source": source,
        "shards": len(index_paths),
        "split": {
            "method": split,
            "val_ratio": val_ratio,
            "split_seed": split_seed,
            "subset_ratio": subset_ratio,
        },
        "records": {
            "usable": len(clips),
            "skipped": dict(sorted(skipped.items())),
            "total": len(clips) + sum(skipped.values()),
            # texts beyond the first are not read, as in the official loader
            "with_extra_texts": sum(1 for c in clips if c.get("extra_texts")),
        },
        "qa_blocks_skipped": dict(sorted(qa_skipped.items())),
        "frames": {
            "per_clip": frames_per_clip,
            "size": list(frame_size),
            "jpeg_quality": jpeg_quality,
            # a frame's time is its index over the rate; the records give none of their own
            "rate": frame_rate,
            "times": "nominal: frame index / rate (the records give no frame times)",
            "source_sizes": dict(Counter(c["source_size"] for c in clips).most_common()),
        },
        "splits": {s: _finish_split_stats(v) for s, v in stats.items()},
    }
    with named_if_full(metadata_path, "the data's metadata"):
        write_json_atomic(metadata_path, metadata)
    log.info("\n%s", describe(metadata))
    return metadata


def describe(metadata: dict) -> str:
    """A few lines a person reads first: what was kept, what was skipped and why."""
    records, splits = metadata["records"], metadata["splits"]
    lines = [
        f"{records['usable']:,} of {records['total']:,} records usable; skipped: "
        f"{metadata['records']['skipped'] or 'none'}; QA blocks skipped: "
        f"{metadata['qa_blocks_skipped'] or 'none'}"
    ]
    for split, stats in splits.items():
        lines.append(
            f"{split}: {stats['clips']:,} clips, {stats['stage1_samples']:,} stage-1 samples, "
            f"{stats['qas_per_clip']['mean']} QAs per clip; {stats['families']}"
        )
    return "\n".join(lines)


def _empty_split_stats() -> dict:
    return {
        "clips": 0,
        "from_bucket_split": Counter(),
        "qas_per_clip": Counter(),
        "families": Counter({f: 0 for f in FAMILIES}),
        "answers": Counter(),
    }


def _count(stats: dict, clip: dict) -> None:
    stats["clips"] += 1
    stats["from_bucket_split"][clip["bucket_split"]] += 1
    stats["qas_per_clip"][len(clip["qas"])] += 1
    for qa in clip["qas"]:
        stats["families"][qa["family"]] += 1
        if answer_type(qa["tag"]) == "yes_no":
            stats["answers"][f"{qa['family']}:{qa['answer']}"] += 1


def _finish_split_stats(stats: dict) -> dict:
    qas = sum(stats["families"].values())
    return {
        "clips": stats["clips"],
        "stage1_samples": qas,
        "stage2_conversations": stats["clips"],
        "from_bucket_split": dict(stats["from_bucket_split"]),
        "families": dict(stats["families"]),
        "yes_no_answers": dict(sorted(stats["answers"].items())),
        "qas_per_clip": {
            "mean": round(qas / stats["clips"], 3) if stats["clips"] else 0,
            "histogram": {str(k): v for k, v in sorted(stats["qas_per_clip"].items())},
        },
    }


def main(argv: list[str] | None = None) -> None:
    """`robovqa-data-summary results/data/metadata.json`: the data's records, clips and
    samples per split, in a few lines."""
    parser = argparse.ArgumentParser(prog="robovqa-data-summary", description=main.__doc__)
    parser.add_argument("metadata", type=Path, help="results/data/metadata.json")
    print(describe(json.loads(parser.parse_args(argv).metadata.read_text())))


if __name__ == "__main__":
    main()
