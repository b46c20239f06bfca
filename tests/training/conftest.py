"""A tiny training setup made here: frames, curriculum JSONL and a tiny InternVL."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from robovqa_ft.training.random_model import build_tiny_internvl


def write_clip(images_dir: Path, video_id: str, bright: bool) -> list[str]:
    """16 frames; the last has a white square when `bright` (the answer to "satisfied?")."""
    paths = []
    for i in range(16):
        image = Image.new("RGB", (64, 64), (90, 90, 90))
        if bright and i == 15:
            ImageDraw.Draw(image).rectangle([20, 20, 60, 60], fill=(255, 255, 255))
        path = images_dir / video_id / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(f"{video_id}/{i:02d}.jpg")
    return paths


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> dict:
    """Paths of a tiny model and stage-1/stage-2 data (train and val)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    files = {}
    for split, count in (("train", 48), ("val", 8)):
        stage1, stage2 = [], []
        for c in range(count):
            vid = f"{split}-{c:03d}"
            bright = rng.random() < 0.5
            images = write_clip(root / "images", vid, bright)
            pairs = [
                ("put cup Q: satisfied?", "yes" if bright else "no"),
                ("Q: what just happened?", "pick up the cup"),
            ]
            turns = [[{"from": "human", "value": q}, {"from": "gpt", "value": a}] for q, a in pairs]
            kinds = [("success", "yes_no"), ("past_description", "freeform")]
            for k, (pair, (task, answer_type)) in enumerate(zip(turns, kinds, strict=True)):
                row = {"id": f"{vid}-{k}", "video_id": vid, "images": images}
                stage1.append({**row, "task": task, "answer_type": answer_type,
                               "conversations": pair})  # fmt: skip
            stage2.append({"id": vid, "video_id": vid, "images": images, "task": "multi",
                           "tasks": [task for task, _ in kinds],
                           "answer_types": [kind for _, kind in kinds],
                           "conversations": sum(turns, [])})  # fmt: skip
        for stage, rows in (("stage1", stage1), ("stage2", stage2)):
            path = root / stage / f"{split}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            files[f"{stage}_{split}"] = path
    build_tiny_internvl(root / "model", [files["stage1_train"]], vocab_size=400)
    return {"root": root, "images": root / "images", "model": root / "model", **files}
