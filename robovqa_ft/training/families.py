"""What differs between the model families (InternVL, Qwen2.5-VL, Qwen3-VL): how a clip's
frames reach the model (their prompt content and the processor's inputs), which modules
4-bit loading skips, and whether samples can share a row.

`model.frames_as` (shaping):
- "video", the default: the frames as the family's video input. InternVL's is its own
  video prompt, each frame one tile labelled "FrameN: " (what it has always been here).
  Qwen2.5-VL and Qwen3-VL take the processor's video input: frames in pairs (the
  temporal patch), about half the tokens of separate images, with their times: Qwen3-VL
  writes "<t seconds>" before each pair, Qwen2.5-VL spaces its temporal positions by
  them. The workflow already chose the frames (`samples.frame_indices`), so the processor
  samples none; a frame's time is its index among the clip's stored frames over
  `frame_rate`, a nominal rate (the records give no times). An odd number of frames gets
  its last one repeated to fill the last pair (the processor would pad so too; done here
  so that the frames and their times are stated, not guessed).
- "images", Qwen-VL only: each frame its own image, duplicated by the processor to fill
  its temporal patch, no times: the seed recipe's way of giving frames, kept to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoConfig
from transformers.video_utils import VideoMetadata

from robovqa_ft.core.settings import frames_as_problem


def _internvl_frames(count: int) -> list[dict]:
    # InternVL's own video prompt: "Frame1: <image>\nFrame2: <image>\n..."
    content = []
    for i in range(count):
        content += [{"type": "text", "text": f"Frame{i + 1}: "}, {"type": "image"}]
    return content


def _images(count: int) -> list[dict]:
    return [{"type": "image"} for _ in range(count)]


@dataclass(frozen=True)
class Family:
    name: str  # the model type of config.json
    image_content: Callable[[int], list[dict]]  # chat content items for n frames as images
    keep_unquantized: tuple[str, ...]  # full module paths that 4-bit loading must skip
    image_kwargs: dict = field(default_factory=dict)  # passed with every image batch
    packs: bool = False  # 1-D rotary positions, so samples can share a row (`pack_batch`)
    takes_video: bool = False  # has a video input of its own (the processor's)
    video: bool = False  # this run gives the frames as that video (`frames_as`)

    def content(self, frames: int) -> list[dict]:
        """The chat content items that stand for `frames` frames (the processor expands them)."""
        return [{"type": "video"}] if self.video else self.image_content(frames)

    def processor_inputs(
        self, frames: list[Image.Image], indices: list[int], total: int, rate: float | None
    ) -> dict[str, Any]:
        """The processor's frame arguments for one sample: `frames` are the clip's stored
        frames `indices` (in order) of its `total`, stored at `rate` frames a second."""
        if not self.video:
            return {"images": [frames], **self.image_kwargs}
        if rate is None:
            raise ValueError(f"{self.name}: frames as a video need their rate (frame_rate)")
        frames, indices = list(frames), list(indices)
        if len(frames) % 2:  # the temporal patch takes pairs: the last frame twice
            frames.append(frames[-1])
            indices.append(indices[-1])
        metadata = VideoMetadata(total_num_frames=total, fps=rate, frames_indices=indices)
        return {"videos": [frames], "video_metadata": [metadata], "do_sample_frames": False}


FAMILIES: dict[str, Family] = {
    # One tile per frame, as InternVL's video path does (no dynamic tiling, no thumbnail).
    "internvl": Family(
        "internvl",
        _internvl_frames,
        ("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        {"crop_to_patches": False},
        packs=True,
    ),
    "qwen2_5_vl": Family("qwen2_5_vl", _images, ("model.visual", "lm_head"), takes_video=True),
    "qwen3_vl": Family("qwen3_vl", _images, ("model.visual", "lm_head"), takes_video=True),
}


def family_of(model_type: str, frames_as: str = "video") -> Family:
    """The family of a `model_type`, giving its frames `frames_as`."""
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not one of {sorted(FAMILIES)}")
    problem = frames_as_problem(model_type, frames_as)
    if problem:
        raise ValueError(problem)
    family = FAMILIES[model_type]
    return replace(family, video=family.takes_video and frames_as == "video")


def model_family(
    name_or_path: str | Path, revision: str | None = None, frames_as: str = "video"
) -> Family:
    """The family of a model (read from its config.json), giving its frames `frames_as`."""
    model_type = AutoConfig.from_pretrained(name_or_path, revision=revision).model_type
    if model_type not in FAMILIES:
        raise ValueError(
            f"{name_or_path}: model type {model_type!r} is not one of {sorted(FAMILIES)}"
        )
    return family_of(model_type, frames_as)
