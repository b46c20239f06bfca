"""The training loss, computed where it is defined: the head and the cross-entropy run on
the labelled positions alone (~1-2% of a RoboVQA sample's tokens), never on every one.

Training reduces the per-token losses by the step's labelled-token count; evaluation
sums and groups them. Both go through `labelled_token_losses`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from robovqa_ft.samples import IGNORE_INDEX, split_counters


@dataclass(frozen=True)
class TokenLosses:
    """The cross-entropy of each labelled token (fp32), with where it sits in the batch:
    `rows[i]`, `positions[i]` index `labels` at the token that loss `i` predicts."""

    losses: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits predict a labelled token: position t predicts t + 1."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def labelled_token_losses(model: Any, inputs: dict[str, Any]) -> TokenLosses:
    """Run `model` on `inputs` (a collated batch with `labels`, padded or packed) with the
    head on the positions that predict a label only, and return their losses.

    transformers gathers those positions itself (`logits_to_keep` as a boolean mask), so
    the full-vocabulary logits of the other positions are never made. The values equal
    the model's own loss terms: the same logits, upcast to fp32 before the softmax.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.setdefault("use_cache", False)  # in eval mode a KV cache is made and thrown away
    mask = predicting_positions(labels)
    logits = model(**inputs, logits_to_keep=mask).logits  # (labelled tokens, vocab)
    rows, positions = mask.nonzero(as_tuple=True)
    targets = labels[rows, positions + 1]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    return TokenLosses(losses, rows, positions + 1)


def loss_sums(model: Any, batches: Iterable[dict], device: Any) -> dict[str, float]:
    """Over collated `batches`: the summed labelled-token loss, its token count, and the
    collators' counts of samples and of samples skipped (not even one answer fits)."""
    sums = {"loss": 0.0, "tokens": 0, "samples": 0, "skipped_samples": 0}
    for batch in batches:
        inputs, counters = split_counters(batch)
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        losses = labelled_token_losses(model, on_device)  # a packed batch holds a flag too
        sums["loss"] += float(losses.losses.sum())
        sums["tokens"] += len(losses.losses)
        sums["samples"] += counters["samples"]
        sums["skipped_samples"] += counters["skipped_samples"]
    return sums


def turn_sums(losses: TokenLosses, labels: torch.Tensor) -> list[list[tuple[float, int]]]:
    """Per row of a padded batch, per answer (each unbroken run of labels is one answer
    and its end-of-turn token), in order: (summed loss, tokens)."""
    labels = labels.cpu()
    labelled = labels != IGNORE_INDEX
    starts = labelled.clone()
    starts[:, 1:] &= ~labelled[:, :-1]
    turn_of = starts.long().cumsum(dim=1) - 1  # the answer each position belongs to
    turns = [int(n) for n in starts.sum(dim=1)]
    sums: list[list[list[float]]] = [[[0.0, 0] for _ in range(n)] for n in turns]
    rows, positions = losses.rows.cpu(), losses.positions.cpu()
    turn = turn_of[rows, positions].tolist()
    for row, t, loss in zip(rows.tolist(), turn, losses.losses.tolist(), strict=True):
        sums[row][t][0] += loss
        sums[row][t][1] += 1
    return [[(total, int(count)) for total, count in row] for row in sums]
