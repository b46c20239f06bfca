"""Collation: a micro-batch of built samples, or of stage 1's trees (`trees.py`), into
model inputs, padded to its longest (`longest`, `grouped`) or packed end to end in one
row (`packed`), with the counters the metrics read (questions, trees, real and computed
tokens, prefix tokens saved, dropped turns, skipped samples) and the flat positions whose
next token is predicted (the loss's). Rows of more than one causal sequence (trees,
packed rows) carry per token what the mask is made of (`SEGMENT`, `BRANCH`, `REAL`):
`attention.model_inputs` builds the 4-D mask from them on the model's device, the one
place that builds masks (an L×L mask made here would cross to the GPU at every step).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from robovqa_ft.training.attention import BRANCH, REAL, SEGMENT
from robovqa_ft.training.samples import IGNORE_INDEX

# Beside the model inputs, a collated batch holds what the training step reads of it, made
# here on the CPU: read back from the GPU, each would make the host wait for the step. The
# counts are Python ints, which the Trainer leaves on the host. `samples` counts questions
# (a tree holds several).
COUNTERS = ("samples", "dropped_turns", "skipped_samples", "real_tokens", "computed_tokens",
            "trees", "prefix_tokens_saved")  # fmt: skip
# What a built sample or tree counts of itself, summed into the counters.
SAMPLE_COUNTS = ("dropped_turns", "questions", "prefix_tokens_saved")


# `predicting_positions` of the labels, where the loss runs the head (`labelled_token_losses`).
PREDICTING = "predicting_positions"


def split_counters(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(the inputs, the counters) of a collated batch; its `PREDICTING` positions are in
    neither. The inputs keep the layout's keys (`SEGMENT`, `BRANCH`, `REAL`), which
    `attention.model_inputs` turns into the model's."""
    inputs = {k: v for k, v in batch.items() if k not in (*COUNTERS, PREDICTING)}
    return inputs, {k: batch[k] for k in COUNTERS}


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices (into rows × length) of the positions whose logits predict a
    labelled token: position t predicts t + 1."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts.flatten().nonzero().squeeze(1)


# How a micro-batch becomes one tensor per input (config: training.padding).
PADDING = ("longest", "grouped", "packed")


def collator(
    padding: str, pad_token_id: int, attention: str = "sdpa"
) -> Callable[[list], dict[str, Any]]:
    """The training collator: "longest" and "grouped" pad (grouping is the sampler's
    part), "packed" lays the samples end to end. Flash-attention takes no 4-D mask: its
    packed rows are kept apart by their position ids alone (its varlen kernel)."""
    if padding not in PADDING:
        raise ValueError(f"padding {padding!r} is not one of {PADDING}")
    if padding == "packed":
        return partial(pack_batch, pad_token_id=pad_token_id,
                       masked=not attention.startswith("flash"))  # fmt: skip
    return partial(pad_batch, pad_token_id=pad_token_id)


def _flattened(items: list) -> list[dict | None]:
    """A micro-batch's samples: a stage-1 clip's item (`trees.ClipTrees`) is a list of
    trees, laid out one by one."""
    flat: list[dict | None] = []
    for item in items:
        flat += item if isinstance(item, list) else [item]
    return flat


def _present(samples: list[dict | None], pad_token_id: int) -> list[dict]:
    """The samples that fit `max_seq_len`; when none does, one of a single pad token with
    nothing labelled. A micro-batch is never fatal: resume skips data by index, so a
    raising batch would come back after every retry, and under DDP every rank must still
    take part in the step (zero loss, zero tokens: the step counts it as skipped)."""
    present = [s for s in samples if s is not None]
    if present:
        return present
    nothing = {"input_ids": torch.tensor([pad_token_id]), "attention_mask": torch.tensor([1]),
               "labels": torch.tensor([IGNORE_INDEX]), "dropped_turns": 0}  # fmt: skip
    return [nothing]


def _counters(batch: dict[str, Any], samples: list[dict], real: int, given: int) -> dict[str, Any]:
    trees = [s for s in samples[:real] if BRANCH in s]  # the stand-in is neither
    batch["samples"] = sum(s.get("questions", 1) for s in samples[:real])
    batch["trees"] = len(trees)
    batch["prefix_tokens_saved"] = sum(s["prefix_tokens_saved"] for s in trees)
    batch["dropped_turns"] = sum(s["dropped_turns"] for s in samples)
    batch["skipped_samples"] = given - real  # not even one answer fit
    batch["real_tokens"] = sum(len(s["input_ids"]) for s in samples)
    batch["computed_tokens"] = batch["input_ids"].numel()
    if "labels" in batch:  # a generation prompt has none
        batch[PREDICTING] = predicting_positions(batch["labels"])
    return batch


def pack_batch(samples: list, pad_token_id: int = 0, masked: bool = True) -> dict[str, Any]:
    """Padding-free: the micro-batch as one row with no padding at all.

    Each sample or tree keeps its own positions (restarting at 0) and, `masked`, sees only
    itself through the 4-D visibility mask (a packed row of trees is trees end to end:
    each its own `SEGMENT`);
    unmasked (flash-attention), transformers keeps the samples apart from the restarting
    positions. Each sample's first label is ignored, so no sample learns to predict the
    next one's start. Only for 1-D rotary positions (InternVL).
    """
    samples = _flattened(samples)
    given, real = len(samples), sum(s is not None for s in samples)
    samples = _present(samples, pad_token_id)
    if not masked and any(BRANCH in s for s in samples):
        raise ValueError("a tree needs a 4-D attention mask, which flash-attention cannot take")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        if key in (*SAMPLE_COUNTS, "attention_mask", "position_ids", BRANCH):
            continue
        batch[key] = torch.cat([s[key] for s in samples])
        if _per_token(samples[0], key):  # one row
            batch[key] = batch[key][None]
    labels = [s["labels"].clone() for s in samples]
    for row in labels:
        row[0] = IGNORE_INDEX
    batch["labels"] = torch.cat(labels)[None]
    batch["position_ids"] = torch.cat([s.get("position_ids", torch.arange(len(s["input_ids"])))
                                       for s in samples])[None]  # fmt: skip
    if masked:
        segment = torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(samples)])
        branch = torch.cat([s.get(BRANCH, torch.zeros(len(s["input_ids"]), dtype=torch.long))
                            for s in samples])[None]  # fmt: skip
        batch[SEGMENT], batch[BRANCH] = segment[None], branch
        batch[REAL] = torch.ones_like(branch, dtype=torch.bool)
    # With a KV cache (on by default in eval mode), transformers does not look for packed
    # samples and lets them attend to each other: silently wrong logits.
    batch["use_cache"] = False
    return _counters(batch, samples, real, given)


def _per_token(sample: dict, key: str) -> bool:
    """Whether `sample[key]` has a value a token (ids, labels, ...), not one a frame, an
    image or a video (Qwen2.5-VL's `second_per_grid_ts` is 1-D too)."""
    value = sample[key]
    return value.dim() == 1 and len(value) == len(sample["input_ids"])


def pad_batch(samples: list, pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """Pad token sequences (right for training, left for generation); concatenate the
    visual inputs (tiles in prompt order). Trees (one a row) keep their own positions and
    what their 4-D visibility mask is made of; plain samples get the usual 2-D padding
    mask."""
    samples = _flattened(samples)
    given, real = len(samples), sum(s is not None for s in samples)
    samples = _present(samples, pad_token_id)
    length = max(len(s["input_ids"]) for s in samples)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch: dict[str, Any] = {}
    for key in samples[0]:
        if key in SAMPLE_COUNTS:
            continue
        if _per_token(samples[0], key):
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
    if BRANCH in batch:
        if side != "right":
            raise ValueError("trees are for training: right padding only")
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        real_mask = torch.arange(length)[None] < lengths[:, None]
        del batch["attention_mask"]  # made on the device from these
        batch[SEGMENT], batch[REAL] = torch.zeros_like(batch[BRANCH]), real_mask
        batch["use_cache"] = False
    return _counters(batch, samples, real, given)
