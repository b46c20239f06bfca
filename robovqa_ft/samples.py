"""Turn curriculum JSONL lines into model inputs: frames, chat prompt, labels, padding.

One sample is built in `SampleBuilder.encode` (in DataLoader workers); `pad_batch` only
pads and stacks. Loss falls on assistant tokens only; truncation drops whole trailing
turns and never cuts into image tokens, which all sit in the first human turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from robovqa_ft.model import Family

IGNORE_INDEX = -100
# Every supported family speaks ChatML.
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frames spread evenly over `total`, in order, always ending on the last one
    (the questions are about the final frame)."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [total - 1]
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


def chat_messages(row: dict, frame_content: list[dict]) -> list[dict]:
    """The row's conversation as chat messages; the frames open the first human turn."""
    messages = []
    for i, turn in enumerate(row["conversations"]):
        role = "user" if turn["from"] == "human" else "assistant"
        content = [{"type": "text", "text": turn["value"]}]
        if i == 0:
            content = frame_content + content
        messages.append({"role": role, "content": content})
    return messages


def assistant_spans(input_ids: list[int], header: list[int], end: int) -> list[tuple[int, int]]:
    """[start, stop) of each assistant answer: after its header, through its end token."""
    spans, i, n = [], 0, len(header)
    while i <= len(input_ids) - n:
        if input_ids[i : i + n] == header:
            start = i + n
            stop = start
            while stop < len(input_ids) and input_ids[stop] != end:
                stop += 1
            spans.append((start, min(stop + 1, len(input_ids))))
            i = stop
        else:
            i += 1
    return spans


class SampleBuilder:
    """Builds one training sample from one JSONL line."""

    def __init__(
        self,
        processor: Any,
        family: Family,
        images_dir: Path | str,
        max_frames: int,
        max_seq_len: int,
        blank_frames: bool = False,
    ):
        self.processor, self.family = processor, family
        self.images_dir = Path(images_dir)
        self.max_frames = max_frames
        self.max_seq_len = max_seq_len
        self.blank_frames = blank_frames
        tokenizer = processor.tokenizer
        self.header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end = tokenizer.convert_tokens_to_ids(TURN_END)

    def frames(self, row: dict) -> list[Image.Image]:
        images = []
        for i in frame_indices(len(row["images"]), self.max_frames):
            with Image.open(self.images_dir / row["images"][i]) as image:
                # a blank frame needs only the size, which needs no decoding
                blank = Image.new("RGB", image.size) if self.blank_frames else None
                images.append(blank or image.convert("RGB"))
        return images

    def encode(self, row: dict) -> dict[str, Any] | None:
        """Model inputs with labels, or None if not even the first answer fits.

        `dropped_turns` counts the question/answer pairs cut to fit `max_seq_len`.
        """
        inputs = self._inputs(row, turns=None)
        ids = inputs["input_ids"][0].tolist()
        spans = assistant_spans(ids, self.header, self.end)
        fitting = [span for span in spans if span[1] <= self.max_seq_len]
        if not fitting:
            return None
        stop = fitting[-1][1]
        labels = torch.full((len(ids),), IGNORE_INDEX)
        for start, end in fitting:
            labels[start:end] = inputs["input_ids"][0, start:end]
        # Per-token tensors (ids, mask, and any family extras) are cut; visual ones kept whole.
        shape = inputs["input_ids"].shape
        sample = {k: v[0, :stop] if v.shape == shape else v for k, v in inputs.items()}
        sample["labels"] = labels[:stop]
        sample["dropped_turns"] = len(spans) - len(fitting)
        return sample

    def encode_prompt(self, row: dict) -> dict[str, Any]:
        """Model inputs that ask the row's first question and leave the answer to generate."""
        inputs = self._inputs(row, turns=0)
        shape = inputs["input_ids"].shape
        return {k: v[0] if v.shape == shape else v for k, v in inputs.items()} | {
            "dropped_turns": 0
        }

    def _inputs(self, row: dict, turns: int | None) -> dict[str, torch.Tensor]:
        """Processor output for the whole conversation, or (turns=0) its first question
        followed by the assistant header."""
        frames = self.frames(row)
        messages = chat_messages(row, self.family.frame_content(len(frames)))
        if turns == 0:
            messages = messages[:1]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=turns == 0
        )
        return self.processor(
            text=[text], images=[frames], return_tensors="pt", **self.family.processor_kwargs
        )


class JsonlDataset(Dataset):
    """Lines of a JSONL file read on demand (by byte offset), encoded by a `SampleBuilder`."""

    def __init__(self, path: Path | str, builder: SampleBuilder, limit: int | None = None):
        self.path, self.builder = Path(path), builder
        self.offsets = []
        with self.path.open("rb") as handle:
            offset = 0
            for line in handle:
                if line.strip():
                    self.offsets.append(offset)
                offset += len(line)
        if limit is not None:
            self.offsets = self.offsets[:limit]

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, index: int) -> dict:
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[index])
            return json.loads(handle.readline())

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.builder.encode(self.row(index))


# What `pad_batch` counts beside the model inputs; the model must not see them.
COUNTERS = ("dropped_turns", "skipped_samples")


def split_counters(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(the model inputs, the counters) of a padded batch."""
    inputs = {k: v for k, v in batch.items() if k not in COUNTERS}
    return inputs, {k: int(batch[k]) for k in COUNTERS}


def pad_batch(samples: list[dict | None], pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """Pad token sequences (right for training, left for generation); concatenate the
    visual inputs (tiles in prompt order)."""
    given = len(samples)
    samples = [s for s in samples if s is not None]
    if not samples:
        raise ValueError("no sample in this batch fits max_seq_len; raise it")
    length = max(len(s["input_ids"]) for s in samples)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        if key == "dropped_turns":
            continue
        if first.dim() == 1:  # per token
            value = pad_values.get(key, 0)
            widths = [(0, length - len(s[key])) for s in samples]
            if side == "left":
                widths = [(w[1], 0) for w in widths]
            batch[key] = torch.stack(
                [
                    torch.nn.functional.pad(s[key], w, value=value)
                    for s, w in zip(samples, widths, strict=True)
                ]
            )
        else:
            batch[key] = torch.cat([s[key] for s in samples])
    batch["dropped_turns"] = torch.tensor(sum(s["dropped_turns"] for s in samples))
    batch["skipped_samples"] = torch.tensor(given - len(samples))  # not even one answer fit
    return batch
