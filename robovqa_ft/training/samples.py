"""Turn curriculum JSONL lines into model inputs: frames, chat prompt, labels.

One sample is built in `SampleBuilder.encode` (in DataLoader workers); the collator
(`collate.py`) only pads and stacks, or lays the micro-batch end to end in one row.
Loss falls on assistant tokens only; truncation drops whole trailing turns and never cuts
into image tokens, which all sit in the first human turn. A generation prompt
(`encode_prompt`) drops whole leading turns instead: the oldest history goes first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from robovqa_ft.training.families import Family

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


def prompt_row(row: dict, turn: int, history: int) -> dict:
    """`row` cut to a generation prompt: the `history` question/answer pairs just before its
    `turn`-th question (0-based), then that question, whose answer is left to generate."""
    if not 0 <= history <= turn < len(row["conversations"]) // 2:
        raise ValueError(
            f"row {row['id']}: no question {turn} with {history} pairs before it "
            f"in {len(row['conversations']) // 2} pairs"
        )
    return {**row, "conversations": row["conversations"][2 * (turn - history) : 2 * turn + 1]}


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
        frame_rate: float | None = None,
    ):
        """`frame_rate`: the stored frames' rate (frames a second), which a family that
        takes the frames as a video needs for their times (`Family.processor_inputs`)."""
        self.processor, self.family = processor, family
        self.images_dir = Path(images_dir)
        self.max_frames = max_frames
        self.max_seq_len = max_seq_len
        self.blank_frames = blank_frames
        self.frame_rate = frame_rate
        if family.video and frame_rate is None:
            raise ValueError(f"{family.name}: frames as a video need their rate (frame_rate)")
        tokenizer = processor.tokenizer
        self.header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end = tokenizer.convert_tokens_to_ids(TURN_END)
        # the tokens a row's frames add, by the row's stored frame count (`_visual_tokens`)
        self._added_tokens: dict[int, int] = {}

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

        `dropped_turns` counts the question/answer pairs cut to fit `max_seq_len`. A row
        whose tokens do not show one assistant header per answer is an error, not a
        sample trained with answers unlabelled.
        """
        inputs = self._inputs(row)
        ids = inputs["input_ids"][0].tolist()
        spans = assistant_spans(ids, self.header, self.end)
        answers = sum(turn["from"] != "human" for turn in row["conversations"])
        if len(spans) != answers:
            # e.g. an answer opening with a newline: BPE merges it with the header's own
            # "\n", the header is not found, and that answer would go without labels.
            raise ValueError(
                f"row {row['id']}: {answers} answers but {len(spans)} assistant headers "
                f"{ASSISTANT_HEADER!r} in its tokens; does an answer start with a newline?"
            )
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

    def encode_prompt(self, row: dict, turn: int = 0, budget: int | None = None) -> dict[str, Any]:
        """Model inputs that ask the row's `turn`-th question (0-based) after the pairs before
        it, with their reference answers, and leave its answer to generate.

        The oldest pairs are dropped, counted in `dropped_turns`, until the prompt fits
        `budget` tokens (default `max_seq_len`; see `history_that_fits`). The question is
        never cut: a budget too small for it alone gets it alone, over budget.
        """
        history = self.history_that_fits(row, turn, budget)
        inputs = self._inputs(prompt_row(row, turn, history))
        shape = inputs["input_ids"].shape
        return {k: v[0] if v.shape == shape else v for k, v in inputs.items()} | {
            "dropped_turns": turn - history
        }

    def history_that_fits(self, row: dict, turn: int, budget: int | None = None) -> int:
        """How many of the pairs before the `turn`-th question `encode_prompt` keeps: the
        most recent ones that fit `budget` tokens (default `max_seq_len`) with the question
        and the frames, which open the first kept turn. From the text alone, as
        `token_lengths`: no frame is decoded once `_visual_tokens` has learnt its count.
        """
        prompt_row(row, turn, 0)  # a question the row lacks is an error, not 0 pairs
        budget = self.max_seq_len if budget is None else budget
        frames = self._frame_count(row)
        for history in range(turn, 0, -1):
            text = self._text(prompt_row(row, turn, history), frames)
            ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) + self._visual_tokens(row) <= budget:
                return history
        return 0

    def token_lengths(self, rows: list[dict]) -> list[int]:
        """Each row's encoded length (as `encode` gives it, capped at `max_seq_len`), from
        its text alone: the frames of every row with as many stored frames add the same
        tokens to their placeholders, learnt once (`_visual_tokens`). No other frame is
        decoded.
        """
        return [self.length_of(ids, frames) for ids, frames in self.text_tokens(rows)]

    def text_tokens(self, rows: list[dict]) -> list[tuple[list[int], int]]:
        """Each row's chat-text token ids (the frames' placeholders unexpanded) and the
        tokens its frames add when the processor expands them (see `token_lengths`)."""
        texts = [self._text(row, self._frame_count(row)) for row in rows]
        token_ids = self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(ids, self._visual_tokens(row)) for ids, row in zip(token_ids, rows, strict=True)]

    def length_of(self, ids: list[int], frame_tokens: int) -> int:
        """The encoded length of a row of these `text_tokens`, cut as `encode` cuts."""
        through_last_answer = len(ids) - ids[::-1].index(self.end)
        return min(through_last_answer + frame_tokens, self.max_seq_len)

    def _frame_count(self, row: dict) -> int:
        return len(frame_indices(len(row["images"]), self.max_frames))

    def _visual_tokens(self, row: dict) -> int:
        """The tokens `row`'s frames add to their placeholders: the same for every row with
        as many stored frames (all frames are one size, the chosen ones and their times
        follow from the count), learnt once a count by encoding `row` with its frames."""
        stored = len(row["images"])
        if stored not in self._added_tokens:
            text = self.processor.tokenizer(
                self._text(row, self._frame_count(row)), add_special_tokens=False
            )
            full = self._inputs(row)["input_ids"].shape[1]
            self._added_tokens[stored] = full - len(text["input_ids"])
        return self._added_tokens[stored]

    def _text(self, row: dict, frames: int) -> str:
        """The chat text, one placeholder per frame (the processor expands each); a
        conversation that ends on a question (`prompt_row`) ends on the assistant header."""
        messages = chat_messages(row, self.family.content(frames))
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=messages[-1]["role"] == "user"
        )

    def _inputs(self, row: dict) -> dict[str, torch.Tensor]:
        """Processor output for the row's conversation, with its frames."""
        frames = self.frames(row)
        text = self._text(row, len(frames))
        stored = len(row["images"])
        indices = frame_indices(stored, self.max_frames)
        given = self.family.processor_inputs(frames, indices, stored, self.frame_rate)
        return self.processor(text=[text], return_tensors="pt", **given)


def clip_order(jsonl: Path | str, seed: int) -> list[str]:
    """Every clip (`video_id`) of a JSONL file in one seeded order, by a hash of its id: the
    same order for the stage-1 and stage-2 files of the same clips, and for every run."""
    with open(jsonl, encoding="utf-8") as lines:
        clips = {json.loads(line)["video_id"] for line in lines if line.strip()}
    return sorted(clips, key=lambda clip: hashlib.sha256(f"{seed}:clips:{clip}".encode()).digest())


# What every line of a curriculum JSONL file holds (jsonl.py writes them).
ROW_FIELDS = ("id", "video_id", "images", "conversations")


class JsonlDataset(Dataset):
    """Lines of a JSONL file read on demand (by byte offset), encoded by a `SampleBuilder`:
    all of them, the first `limit`, or those of the given `clips` (in file order)."""

    def __init__(
        self,
        path: Path | str,
        builder: SampleBuilder,
        limit: int | None = None,
        clips: list[str] | None = None,
    ):
        self.path, self.builder = Path(path), builder
        self.offsets, self.line_numbers = [], []  # line numbers for errors
        wanted = set(clips) if clips is not None else None
        with self.path.open("rb") as handle:
            offset = 0
            for number, line in enumerate(handle, start=1):
                if line.strip() and (
                    wanted is None or self._parsed(line, number)["video_id"] in wanted
                ):
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)
        if limit is not None:
            self.offsets, self.line_numbers = self.offsets[:limit], self.line_numbers[:limit]

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, index: int) -> dict:
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[index])
            return self._parsed(handle.readline(), self.line_numbers[index])

    def rows(self) -> Iterator[dict]:
        """Every row, in file order."""
        with self.path.open("rb") as handle:
            for offset, number in zip(self.offsets, self.line_numbers, strict=True):
                handle.seek(offset)
                yield self._parsed(handle.readline(), number)

    def _parsed(self, line: bytes, number: int) -> dict:
        """The row of one line, or an error naming the file and line: a line edited by hand
        fails here, before training, not as a KeyError deep in a DataLoader worker."""
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path} line {number}: not JSON ({error})") from None
        missing = [field for field in ROW_FIELDS if field not in row]
        turns = row.get("conversations")
        if not missing and not (
            isinstance(turns, list) and turns
            and all(isinstance(t, dict) and {"from", "value"} <= set(t) for t in turns)
        ):  # fmt: skip
            missing = ["conversations[*].from/value"]
        if missing:
            raise ValueError(f"{self.path} line {number}: missing {', '.join(missing)}")
        return row

    def token_lengths(self, chunk: int = 2048) -> list[int]:
        """Each sample's token count (see `SampleBuilder.token_lengths`), read in chunks."""
        lengths, rows = [], []
        for row in self.rows():
            rows.append(row)
            if len(rows) == chunk:
                lengths += self.builder.token_lengths(rows)
                rows = []
        return lengths + (self.builder.token_lengths(rows) if rows else [])

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.builder.encode(self.row(index))
