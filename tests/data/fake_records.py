"""Records in the exact RoboVQA format, for tests."""

from __future__ import annotations

import random

from robovqa_ft.data.demo_bucket import clip_frames, clip_text, random_clip, sequence_example

SMALL_FRAME = (64, 48)


def good_record(unique_id: str | None, seed: int = 0, size=SMALL_FRAME) -> bytes:
    rng = random.Random(seed)
    clip = random_clip(rng)
    return sequence_example(unique_id, clip_frames(clip, rng, size, 16), clip_text(clip, rng))
