"""Collation: a micro-batch of built samples into model inputs, padded to its longest
(`longest`, `grouped`) or packed end to end in one row (`packed`), with the counters the
metrics read (samples, real and computed tokens, dropped turns, skipped samples) and the
flat positions whose next token is predicted (the loss's)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from robovqa_ft.training.samples import IGNORE_INDEX

# Beside the model inputs, a collated batch holds what the training step reads of it, made
# here on the CPU: read back from the GPU, each would make the host wait for the step. The
# counts are Python ints, which the Trainer leaves on the host.
COUNTERS = ("samples", "dropped_turns", "skipped_samples", "real_tokens", "computed_tokens")


# `predicting_positions` of the labels, where the loss runs the head (`labelled_token_losses`).
PREDICTING = "predicting_positions"


def split_counters(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(the model inputs, the counters) of a collated batch; its `PREDICTING` positions
    are in neither."""
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


def collator(padding: str, pad_token_id: int) -> Callable[[list[dict | None]], dict[str, Any]]:
    """The training collator: "longest" and "grouped" pad (grouping is the sampler's
    part), "packed" lays the samples end to end."""
    if padding not in PADDING:
        raise ValueError(f"padding {padding!r} is not one of {PADDING}")
    layout = pack_batch if padding == "packed" else pad_batch
    return partial(layout, pad_token_id=pad_token_id)


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
    batch["samples"] = real  # a packed row holds several; the stand-in none
    batch["dropped_turns"] = sum(s["dropped_turns"] for s in samples)
    batch["skipped_samples"] = given - real  # not even one answer fit
    computed = batch["input_ids"].numel()
    mask = batch.get("attention_mask")  # a packed row has none: every token is a sample's
    batch["real_tokens"] = int(mask.sum()) if mask is not None else computed
    batch["computed_tokens"] = computed
    if "labels" in batch:  # a generation prompt has none
        batch[PREDICTING] = predicting_positions(batch["labels"])
    return batch


def pack_batch(samples: list[dict | None], pad_token_id: int = 0) -> dict[str, Any]:
    """Padding-free: the micro-batch as one row with no padding at all.

    Position ids restart at 0 for each sample and there is no attention mask: from that,
    transformers keeps the samples apart (flash-attention's varlen kernel, or a block
    mask for SDPA and eager), so each sample's logits are those it has alone. Each
    sample's first label is ignored, so no sample learns to predict the next one's start.
    Only for 1-D rotary positions (InternVL; Qwen-VL's 3-D positions are not rebuilt here).
    """
    given, real = len(samples), sum(s is not None for s in samples)
    samples = _present(samples, pad_token_id)
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        if key in ("dropped_turns", "attention_mask"):
            continue
        batch[key] = torch.cat([s[key] for s in samples])
        if first.dim() == 1:  # per token: one row
            batch[key] = batch[key][None]
    labels = [s["labels"].clone() for s in samples]
    for row in labels:
        row[0] = IGNORE_INDEX
    batch["labels"] = torch.cat(labels)[None]
    batch["position_ids"] = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None]
    # With a KV cache (on by default in eval mode), transformers does not look for packed
    # samples and lets them attend to each other: silently wrong logits.
    batch["use_cache"] = False
    return _counters(batch, samples, real, given)


def pad_batch(samples: list[dict | None], pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """Pad token sequences (right for training, left for generation); concatenate the
    visual inputs (tiles in prompt order)."""
    given, real = len(samples), sum(s is not None for s in samples)
    samples = _present(samples, pad_token_id)
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
    return _counters(batch, samples, real, given)
