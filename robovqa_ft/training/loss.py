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
from accelerate.utils import extract_model_from_parallel

from robovqa_ft.training.attention import model_inputs
from robovqa_ft.training.collate import PREDICTING, split_counters
from robovqa_ft.training.samples import IGNORE_INDEX


@dataclass(frozen=True)
class TokenLosses:
    """The cross-entropy of each labelled token (fp32), with where it sits in the batch:
    `rows[i]`, `positions[i]` index `labels` at the token that loss `i` predicts."""

    losses: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor


def labelled_token_losses(model: Any, batch: dict[str, Any]) -> TokenLosses:
    """Run `model` on a collated `batch` (padded or packed) with the head on the positions
    that predict a label only, and return their losses.

    Those positions are the collator's (`predicting_positions`: flat indices made on the
    CPU), so nothing here waits on the GPU, as counting a boolean mask's positions would.
    The full-vocabulary logits of the other positions are never made. The values equal
    the model's own loss terms: the same logits, upcast to fp32 before the softmax.
    """
    inputs = model_inputs(model, split_counters(batch)[0])
    labels = inputs.pop("labels")
    inputs.setdefault("use_cache", False)  # in eval mode a KV cache is made and thrown away
    flat = batch[PREDICTING]
    # transformers' `logits_to_keep` takes flat positions of several rows only as a boolean
    # mask, which would count them on the GPU: the head's input is gathered here instead,
    # inside the model's own forward (so DDP and peft see an ordinary call).
    head = extract_model_from_parallel(model).get_output_embeddings()
    gather = head.register_forward_pre_hook(
        lambda _, args: (args[0].flatten(0, -2).index_select(0, flat),)
    )
    try:
        logits = model(**inputs).logits  # (labelled tokens, vocab)
    finally:
        gather.remove()
    targets = labels.flatten().index_select(0, flat + 1)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    length = labels.shape[1]
    return TokenLosses(losses, flat // length, flat % length + 1)


def loss_sums(model: Any, batches: Iterable[dict], device: Any) -> dict[str, float]:
    """Over collated `batches`: the summed labelled-token loss, its token count, and the
    collators' counts of samples and of samples skipped (not even one answer fits)."""
    sums = {"loss": 0.0, "tokens": 0, "samples": 0, "skipped_samples": 0}
    for batch in batches:
        counters = split_counters(batch)[1]
        on_device = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}  # fmt: skip
        losses = labelled_token_losses(model, on_device)
        sums["loss"] += float(losses.losses.sum())
        sums["tokens"] += len(losses.losses)
        sums["samples"] += counters["samples"]
        sums["skipped_samples"] += counters["skipped_samples"]
    return sums


def turn_sums(
    losses: TokenLosses, labels: torch.Tensor, branch: torch.Tensor | None = None
) -> list[list[tuple[float, int]]]:
    """Per question, per answer (each unbroken run of labels is one answer and its
    end-of-turn token), in order: (summed loss, tokens). A padded row is one question;
    given the rows' `BRANCH` (trees), each branch of a row is one, in branch order (no
    answer spans two: a branch's first token is never a label)."""
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
    per_row = [[(total, int(count)) for total, count in row] for row in sums]
    if branch is None:
        return per_row
    questions = []
    for row, runs in enumerate(per_row):
        by_branch: dict[int, list] = {}
        for b, run in zip(branch[row].cpu()[starts[row]].tolist(), runs, strict=True):
            by_branch.setdefault(b, []).append(run)
        questions += [by_branch[b] for b in sorted(by_branch)]
    return questions
