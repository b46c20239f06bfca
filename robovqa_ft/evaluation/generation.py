"""Batched greedy generation of answers to prompts, for the evaluation and for
`robovqa-ask`: the training's precision, left padding, answers decoded without the
prompt."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from robovqa_ft.training.collate import pad_batch, split_counters
from robovqa_ft.training.model import (
    on_device,
    training_precision,
)
from robovqa_ft.training.samples import SampleBuilder


class _Prompts(Dataset):
    """Generation prompts, built in DataLoader workers like training samples."""

    def __init__(self, builder: SampleBuilder, asks: list[tuple[dict, int]], budget: int):
        self.builder, self.asks, self.budget = builder, asks, budget

    def __len__(self) -> int:
        return len(self.asks)

    def __getitem__(self, index: int) -> dict:
        row, turn = self.asks[index]
        return self.builder.encode_prompt(row, turn=turn, budget=self.budget)


def answer_batches(
    model: Any,
    builder: SampleBuilder,
    asks: list[tuple[dict, int]],
    budget: int,
    batch_size: int,
    max_new_tokens: int,
    workers: int,
    dtype: str,
) -> Iterator[list[str]]:
    """Greedy answers to each (row, turn)'s question, batch by batch (left-padded prompts
    of at most `budget` tokens)."""
    tokenizer = builder.processor.tokenizer
    device = next(model.parameters()).device
    # the end of the assistant turn, and whatever else the model stops on
    stops = sorted({builder.end, tokenizer.eos_token_id} - {None})
    collate = partial(pad_batch, pad_token_id=tokenizer.pad_token_id, side="left")
    prompts = _Prompts(builder, asks, budget)
    loader = DataLoader(prompts, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    with torch.no_grad(), training_precision(dtype):
        for batch in loader:
            batch = on_device(split_counters(batch)[0], device)
            output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=stops)  # fmt: skip
            new = output[:, batch["input_ids"].shape[1] :]
            yield [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
