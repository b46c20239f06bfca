"""Clips as `extract_frames` and `build_jsonl` would leave them (frames on disk, stage-1
and stage-2 JSONL), made without TensorFlow so that torch benchmarks can use them, and
read back as training reads them.

Texts come from the demo generator, with the number of questions per clip drawn to
match the real data (ROBOVQA.md: about 3.6 QAs per clip, 2 to 7 seen): the two yes/no
questions plus Binomial(5, 0.32) free-form ones, so 2 to 7 with mean 3.6. The real
distribution's shape is not published; this one has the known mean and range.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from robovqa_ft.data.demo_bucket import clip_frames, clip_text, random_clip
from robovqa_ft.data.frames import clip_frame_paths
from robovqa_ft.data.jsonl import stage1_lines, stage2_line
from robovqa_ft.data.qa import parse_qa_text
from robovqa_ft.training.families import FAMILIES, Family
from robovqa_ft.training.random_model import build_processor, conversation_texts
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder

FRAMES_PER_CLIP = 16
# The real run's settings: each stage's frames, sequence length and hyperparameters.
CONFIG = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
STAGES = ("stage1", "stage2")
FREEFORM_DRAWS, FREEFORM_SHARE = 5, 0.32  # free-form questions: Binomial(5, 0.32)


def robovqa_freeform_count(rng: random.Random) -> int:
    return sum(rng.random() < FREEFORM_SHARE for _ in range(FREEFORM_DRAWS))


def questions_per_clip() -> dict[int, float]:
    """The share of clips of each question count that `write_clips` draws: the two yes/no
    questions plus Binomial(5, 0.32) free-form ones (2 to 7, mean 3.6)."""
    return {
        2 + k: math.comb(FREEFORM_DRAWS, k) * FREEFORM_SHARE**k
        * (1 - FREEFORM_SHARE) ** (FREEFORM_DRAWS - k)
        for k in range(FREEFORM_DRAWS + 1)
    }  # fmt: skip


def write_clips(
    root: Path | str, clips: int, frame_size: int = 288, seed: int = 0, shared_frames: bool = False
) -> dict[str, Path]:
    """Frames under `root/images`, rows in `root/stage1.jsonl` and `root/stage2.jsonl`.

    `shared_frames`: every row points at the first clip's frames (enough for token
    lengths, which do not depend on pixels; far faster for thousands of clips).
    """
    root, rng = Path(root), random.Random(seed)
    images = root / "images"
    stage1, stage2 = [], []
    for c in range(clips):
        clip = random_clip(rng)
        video_id = f"synthetic-{c:06d}"
        if c == 0 or not shared_frames:
            folder = images / video_id
            folder.mkdir(parents=True, exist_ok=True)
            for path, jpeg in zip(
                clip_frame_paths(video_id, FRAMES_PER_CLIP),
                clip_frames(clip, rng, (frame_size, frame_size), FRAMES_PER_CLIP),
                strict=True,
            ):
                (images / path).write_bytes(jpeg)
        text = clip_text(clip, rng, freeform=robovqa_freeform_count(rng))
        qas = [
            {"tag": qa.tag, "family": qa.family, "prompt": qa.prompt, "answer": qa.answer}
            for qa in parse_qa_text(text).qas
        ]
        entry = {"video_id": video_id, "qas": qas}
        frames = clip_frame_paths(
            "synthetic-000000" if shared_frames else video_id, FRAMES_PER_CLIP
        )
        stage1 += stage1_lines(entry, frames)
        stage2.append(stage2_line(entry, frames))
    paths = {"images": images, "stage1": root / "stage1.jsonl", "stage2": root / "stage2.jsonl"}
    for name, rows in (("stage1", stage1), ("stage2", stage2)):
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def processor_for(paths: dict[str, Path], image_size: int = 448):
    """InternVL's processor with a tokenizer trained on the clips' text."""
    return build_processor(conversation_texts([paths["stage2"]]), image_size, vocab_size=8000)


def stage_dataset(
    processor,
    paths: dict[str, Path],
    stage: str,
    family: Family = FAMILIES["internvl"],
    frame_rate: float | None = None,
) -> JsonlDataset:
    """The stage's samples as training builds them for `family`, at config.yaml's frames
    and length; `frame_rate`: the stored frames' rate (frames a second), which a family
    that takes the frames as a video needs (`SampleBuilder`)."""
    settings = CONFIG[stage]
    builder = SampleBuilder(processor, family, paths["images"], settings["max_frames"],
                            settings["max_seq_len"], frame_rate=frame_rate)  # fmt: skip
    return JsonlDataset(paths[stage], builder)
