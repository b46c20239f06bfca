"""Generate a synthetic bucket in the exact RoboVQA format, for the demo and the tests.

Records are `tf.train.SequenceExample`s with JPEG frames under `images`, the clip's
QA text under `texts` and `unique_id` in the context, written by TensorFlow's own
TFRecord writer. The answers depend on the pixels, so a model can be seen to learn:
- `success` is yes exactly when a white square fills the top-right of the last frame;
- discriminative `affordance` is yes exactly when a cyan square fills its top-left;
- the free-form answers name the object whose colour the moving blob has.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from robovqa_ft.data.qa import BINARY_ANSWER
from robovqa_ft.data.records import import_tensorflow

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
# Colons, "a:" and non-ASCII on purpose: parsers have tripped on each.
OBJECTS = ["block", "cup", "café mug", "sponge", "crème jar"]
PLACES = ["on the table", "in the bowl", "in the drawer", "on shelf a: top", "in the bin"]
BAD_KINDS = ("wrong_frame_count", "undecodable_frame", "no_valid_qa")


def qa_block(tag: str, context: str, question: str, answer: str) -> str:
    """One block of the RoboVQA text grammar."""
    prefix = f"{context} " if context else ""
    return f"<task:{tag}>\n{prefix}Q: {question} <PRED>A: {answer}\n</PRED>"


def binary_answer(yes: bool) -> str:
    return BINARY_ANSWER.format("yes" if yes else "no")


@dataclass
class DemoClip:
    colour: str
    instruction: str
    success: bool
    affordable: bool


def random_clip(rng: random.Random) -> DemoClip:
    colour = rng.choice(sorted(COLOURS))
    instruction = f"put the {colour} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
    return DemoClip(colour, instruction, rng.random() < 0.5, rng.random() < 0.5)


def clip_text(clip: DemoClip, rng: random.Random, freeform: int | None = None) -> str:
    """The two yes/no blocks and `freeform` free-form ones (default: zero to three) over
    all ten tags; no answer is implied by another's."""
    goal = f"please {clip.instruction} and close the drawer"
    history = f"current goal is: {goal}. last 20 steps: 1- open the drawer 2- look at the table"
    success_tag = f"success:discrete:{clip.success}"
    affordance_tag = f"affordance:discriminative:discrete:{clip.affordable}"
    instruction = clip.instruction
    blocks = [
        qa_block(tag, context, question, answer)
        for tag, context, question, answer in [
            ("planning:freeform", f"current goal is: {goal}", "immediate next step?",
             instruction),
            ("immediate_planning_with_context20:freeform", history, "immediate next step?",
             instruction),
            ("remaining5_planning_with_context20:freeform", history, "next 5 steps?",
             f"1- {instruction} 2- close the drawer 3- done"),
            (success_tag, instruction, "satisfied?", binary_answer(clip.success)),
            (affordance_tag, instruction, "possible right now?", binary_answer(clip.affordable)),
            ("affordance:generative:positive:freeform", "", "what action is possible right now?",
             instruction),
            ("future_prediction:freeform", "", "what is likely to happen next?", instruction),
            ("past_description:freeform", "", "what just happened?",
             f"pick up the {clip.colour} object"),
        ]
    ]  # fmt: skip
    # Each yes/no question once in every clip: plenty to learn from, and no earlier turn
    # of a conversation gives a later answer away. Free-form tags may repeat.
    yes_no, free_blocks = blocks[3:5], blocks[:3] + blocks[5:]
    count = rng.randint(0, 3) if freeform is None else freeform
    chosen = [*yes_no, *rng.choices(free_blocks, k=count)]
    rng.shuffle(chosen)
    return "".join(chosen)


def clip_frames(
    clip: DemoClip, rng: random.Random, size: tuple[int, int], count: int
) -> list[bytes]:
    """JPEG frames: a coloured blob crossing a grey table; the cues in the last frame."""
    width, height = size
    blob = max(8, min(width, height) // 5)
    frames = []
    for i in range(count):
        image = Image.new("RGB", size, (rng.randint(90, 130),) * 3)
        draw = ImageDraw.Draw(image)
        x = int((width - blob) * i / max(1, count - 1))
        y = height // 2 + rng.randint(-blob // 4, blob // 4)
        draw.ellipse([x, y - blob // 2, x + blob, y + blob // 2], fill=COLOURS[clip.colour])
        if i == count - 1:
            cue_w, cue_h = width * 2 // 5, height * 2 // 5
            if clip.success:
                draw.rectangle([width - cue_w, 0, width, cue_h], fill=(255, 255, 255))
            if clip.affordable:
                draw.rectangle([0, 0, cue_w, cue_h], fill=(0, 230, 230))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        frames.append(out.getvalue())
    return frames


def sequence_example(unique_id: str | None, frames: list[bytes], text: str | None) -> bytes:
    """A serialized RoboVQA record."""
    tf = import_tensorflow()
    example = tf.train.SequenceExample()
    if unique_id is not None:
        example.context.feature["unique_id"].bytes_list.value.append(unique_id.encode())
        example.context.feature["video_filename"].bytes_list.value.append(
            f"{unique_id}.mp4".encode()
        )
    images = example.feature_lists.feature_list["images"]
    for frame in frames:
        images.feature.add().bytes_list.value.append(frame)
    if text is not None:
        example.feature_lists.feature_list["texts"].feature.add().bytes_list.value.append(
            text.encode("utf-8")
        )
    return example.SerializeToString()


def write_tfrecord(path: Path | str, records: list[bytes]) -> None:
    tf = import_tensorflow()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def bad_record(kind: str, unique_id: str, rng: random.Random, size: tuple[int, int]) -> bytes:
    """A record that extraction must skip for reason `kind`."""
    clip = random_clip(rng)
    frames = clip_frames(clip, rng, size, 16)
    text = clip_text(clip, rng)
    if kind == "wrong_frame_count":
        frames = frames[:15]
    elif kind == "undecodable_frame":
        frames[7] = frames[7][: len(frames[7]) // 3]
    elif kind == "no_valid_qa":
        text = "<task:planning:freeform>\ncurrent goal is: nothing Q: immediate next step?\n"
    else:
        raise ValueError(f"unknown bad record kind {kind!r}; expected one of {BAD_KINDS}")
    return sequence_example(unique_id, frames, text)


def generate_demo_bucket(
    root: Path | str,
    clips: int,
    shards_per_split: int,
    frame_size: tuple[int, int],
    val_fraction: float = 0.2,
    bad_records: int = 0,
    seed: int = 0,
    frames_per_clip: int = 16,
) -> list[Path]:
    """Write `root/train/train-*` and `root/val/val-*` shards; returns their paths.

    `bad_records` of each kind in `BAD_KINDS` are mixed into the train shards.
    """
    rng = random.Random(seed)
    root = Path(root)
    n_val = round(clips * val_fraction)
    paths = []
    for split, count in (("train", clips - n_val), ("val", n_val)):
        records = []
        for i in range(count):
            clip = random_clip(rng)
            frames = clip_frames(clip, rng, tuple(frame_size), frames_per_clip)
            records.append(sequence_example(f"demo-{split}-{i:05d}", frames, clip_text(clip, rng)))
        if split == "train":
            for kind in BAD_KINDS:
                for j in range(bad_records):
                    records.insert(j, bad_record(kind, f"demo-bad-{kind}-{j}", rng, frame_size))
        for s in range(shards_per_split):
            path = root / split / f"{split}-{s:05d}-of-{shards_per_split:05d}.tfrecord"
            write_tfrecord(path, records[s::shards_per_split])
            paths.append(path)
    return paths
