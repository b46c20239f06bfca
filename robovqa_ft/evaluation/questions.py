"""Which questions an evaluation asks: a fixed sample of val questions, taken clip by clip
and stratified by score group, each in both answer formats; and the controls, every
yes/no question also on blank frames and on another clip's frames of its group."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from robovqa_ft.core.runs import FORMATS
from robovqa_ft.evaluation.scoring import score_group
from robovqa_ft.training.samples import clip_order

# What a question is answered on: its clip's frames, blank ones, or another clip's.
CONDITIONS = ("frames", "blank_frames", "other_clip")


def answer_sample(val_jsonl: Path | str, per_group: int, seed: int) -> list[dict]:
    """Up to `per_group` val questions of each score group, taken clip by clip in the
    seeded clip order (`clip_order`; within a clip, by a seeded hash of the question's id):
    the same questions for every run."""
    rank = {clip: i for i, clip in enumerate(clip_order(val_jsonl, seed))}
    by_group: dict[str, list[tuple[int, str, dict]]] = defaultdict(list)
    with open(val_jsonl, encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            key = hashlib.sha256(f"{seed}:answers:{row['id']}".encode()).hexdigest()
            by_group[score_group(row)].append((rank[row["video_id"]], key, row))
    return [row for group in sorted(by_group)
            for *_, row in sorted(by_group[group], key=lambda t: t[:2])[:per_group]]  # fmt: skip


def other_clip_rows(rows: list[dict], seed: int) -> dict[str, dict]:
    """Each row (by id) with another clip's frames of its own score group, so the question
    still fits: a seeded derangement of the group's clips (a cyclic shift of a seeded
    order, so no clip keeps its own frames). A group of one clip has none."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_group[score_group(row)].append(row)
    swapped = {}
    for items in by_group.values():
        frames = {row["video_id"]: row["images"] for row in items}
        clips = sorted(frames, key=lambda c: hashlib.sha256(f"{seed}:other:{c}".encode()).digest())
        if len(clips) < 2:
            continue
        shown = {clip: clips[(i + 1) % len(clips)] for i, clip in enumerate(clips)}
        for row in items:
            other = shown[row["video_id"]]
            swapped[row["id"]] = {**row, "images": frames[other], "frames_of": other}
    return swapped


def clip_conversations(stage2_jsonl: Path | str, clips: set[str]) -> dict[str, dict]:
    """The stage-2 row (the whole conversation) of each of `clips`."""
    with open(stage2_jsonl, encoding="utf-8") as lines:
        rows = (json.loads(line) for line in lines if line.strip())
        return {row["video_id"]: row for row in rows if row["video_id"] in clips}


def question_turn(row: dict, conversation: dict) -> int:
    """Where a stage-1 question (`{clip}-{k:02d}`) sits in its clip's conversation: k,
    checked against the conversation's own k-th question."""
    turn = int(row["id"].rsplit("-", 1)[1])
    turns = conversation["conversations"]
    if 2 * turn >= len(turns) or turns[2 * turn]["value"] != row["conversations"][0]["value"]:
        raise ValueError(
            f"question {row['id']} is not question {turn} of clip {row['video_id']}'s "
            "stage-2 conversation: were the stage-1 and stage-2 val files built together?"
        )
    return turn


def questions_to_ask(rows: list[dict], conversations: dict[str, dict], seed: int) -> list[dict]:
    """Every (format, condition, question) to answer: each question in both formats with
    the clip's frames; yes/no questions also on blank frames and on another clip's."""
    yes_no_rows = [r for r in rows if r.get("answer_type") == "yes_no"]
    swapped = other_clip_rows(yes_no_rows, seed)
    shown = {"frames": rows, "blank_frames": yes_no_rows, "other_clip": list(swapped.values())}
    asks = []
    for form in FORMATS:
        for condition in CONDITIONS:
            for row in shown[condition]:
                frames_of = row.get("frames_of", row["video_id"])
                if form == "stage1":
                    asked, turn = row, 0
                else:
                    conversation = conversations[row["video_id"]]
                    asked = {**conversation, "images": row["images"]}
                    turn = question_turn(row, conversation)
                asks.append({"key": ["answer", form, condition, row["id"]], "row": asked,
                             "turn": turn, "question": row, "frames_of": frames_of})  # fmt: skip
    return asks
