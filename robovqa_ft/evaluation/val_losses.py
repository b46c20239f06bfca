"""Per-sample val losses, computed as training computes its loss (labelled positions
only, summed per turn), and their token-level means by val set, family and kind."""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from robovqa_ft.evaluation.journal import Journal
from robovqa_ft.training.attention import BRANCH
from robovqa_ft.training.collate import pad_batch
from robovqa_ft.training.loss import labelled_token_losses, turn_sums
from robovqa_ft.training.model import (
    on_device,
    training_precision,
)
from robovqa_ft.training.samples import JsonlDataset
from robovqa_ft.training.trees import by_clip, clip_trees

LOSS_REDUCTION = (
    "token-level mean: the summed cross-entropy of every assistant token (the answers and "
    "their end-of-turn token, as in training) divided by their number, over all samples"
)


class _LossSamples(Dataset):
    """Val samples with what their turns are, for per-sample losses: one an item, or, as
    `trees`, one clip's an item (`trees.clip_trees`: their losses are the same)."""

    def __init__(self, dataset: JsonlDataset, indices: list[int], trees: bool = False):
        self.dataset, self.trees = dataset, trees
        self.groups = list(by_clip(dataset, indices).values()) if trees else [[i] for i in indices]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> tuple[list[dict], list[dict], list[dict]]:
        """(the descriptions of the item's samples that fit, of those skipped, and the
        built samples, or trees, of the first)."""
        present, skipped, samples = [], [], []
        for row in (self.dataset.row(i) for i in self.groups[index]):
            tasks = row.get("tasks", [row["task"]])
            kinds = row.get("answer_types", [row.get("answer_type", "freeform")])
            about = {"id": row["id"], "video_id": row["video_id"], "tasks": tasks, "kinds": kinds}
            sample = self.dataset.builder.encode(row)
            (skipped if sample is None else present).append(about)
            samples += [] if sample is None else [sample]
        if self.trees and samples:
            samples = clip_trees(samples, self.dataset.builder.max_seq_len)
        return present, skipped, samples


def _loss_batch(items: list[tuple], pad_id: int) -> tuple[list, list, Any]:
    """(the samples' descriptions, those skipped, the padded batch of the rest or None)."""
    present = [about for group, _, _ in items for about in group]
    skipped = [about for _, group, _ in items for about in group]
    samples = [sample for _, _, group in items for sample in group]
    return present, skipped, pad_batch(samples, pad_id) if samples else None


def sample_losses(
    model: Any,
    dataset: JsonlDataset,
    val_set: str,
    batch_size: int,
    pad_id: int,
    workers: int,
    dtype: str,
    journal: Journal,
    trees: bool = False,
) -> list[dict]:
    """Each sample's loss per answered turn (summed nats and tokens, with the turn's family
    and answer kind), with the training loss at training's precision; samples already in
    `journal` are taken from it, the others computed and added to it batch by batch. As
    `trees` (stage 1's tree layout) a clip's questions are computed in one pass, with the
    same per-question values; `batch_size` then counts clips."""
    keys = [["loss", val_set, row["id"]] for row in dataset.rows()]
    todo = [i for i, key in enumerate(keys) if key not in journal]
    loader = DataLoader(_LossSamples(dataset, todo, trees), batch_size=batch_size,
                        num_workers=workers,
                        collate_fn=partial(_loss_batch, pad_id=pad_id))  # fmt: skip
    device = next(model.parameters()).device
    with torch.no_grad(), training_precision(dtype):
        for abouts, skipped, batch in loader:
            records = [_loss_record(val_set, about, []) | {"skipped": True} for about in skipped]
            if batch is not None:
                batch = on_device(batch, device)
                losses = labelled_token_losses(model, batch)
                turns = turn_sums(losses, batch["labels"], batch.get(BRANCH))
                records += [_loss_record(val_set, about, sums)
                            for about, sums in zip(abouts, turns, strict=True)]  # fmt: skip
            journal.append(records)
    return [journal.records[tuple(key)] for key in keys]


def _loss_record(val_set: str, about: dict, sums: list[tuple[float, int]]) -> dict:
    """A sample's losses: truncation keeps its first answers, so turn j is answer j."""
    turns = [{"family": about["tasks"][j], "answer_type": about["kinds"][j], "tokens": tokens,
              "loss": loss} for j, (loss, tokens) in enumerate(sums)]  # fmt: skip
    return {"key": ["loss", val_set, about["id"]], "set": val_set, "id": about["id"],
            "video_id": about["video_id"], "skipped": False, "turns": turns}  # fmt: skip


def loss_summary(records: list[dict]) -> dict:
    """Token-level loss and perplexity over a val set's sample records, overall, by family
    and by answer kind (yes/no answers are a token or two; free-form ones dominate)."""
    turns = [t for r in records for t in r["turns"]]
    return {**_token_mean(turns), "perplexity": math.exp(_token_mean(turns)["loss"]),
            "samples": sum(not r["skipped"] for r in records),
            "skipped_samples": sum(r["skipped"] for r in records),
            "reduction": LOSS_REDUCTION,
            "by_family": _token_means(turns, "family"),
            "by_answer_type": _token_means(turns, "answer_type")}  # fmt: skip


def _token_mean(turns: list[dict]) -> dict:
    tokens = sum(t["tokens"] for t in turns)
    return {"loss": sum(t["loss"] for t in turns) / tokens if tokens else math.nan,
            "tokens": tokens}  # fmt: skip


def _token_means(turns: list[dict], by: str) -> dict:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for turn in turns:
        grouped[turn[by]].append(turn)
    return {name: _token_mean(items) for name, items in sorted(grouped.items())}
