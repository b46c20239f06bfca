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
from robovqa_ft.training.collate import pad_batch
from robovqa_ft.training.loss import labelled_token_losses, turn_sums
from robovqa_ft.training.model import (
    on_device,
    training_precision,
)
from robovqa_ft.training.samples import JsonlDataset

LOSS_REDUCTION = (
    "token-level mean: the summed cross-entropy of every assistant token (the answers and "
    "their end-of-turn token, as in training) divided by their number, over all samples"
)


class _LossSamples(Dataset):
    """Val samples with what their turns are, for per-sample losses."""

    def __init__(self, dataset: JsonlDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[dict, dict | None]:
        row = self.dataset.row(self.indices[index])
        tasks = row.get("tasks", [row["task"]])
        kinds = row.get("answer_types", [row.get("answer_type", "freeform")])
        about = {"id": row["id"], "video_id": row["video_id"], "tasks": tasks, "kinds": kinds}
        return about, self.dataset.builder.encode(row)


def _loss_batch(items: list[tuple[dict, dict | None]], pad_id: int) -> tuple[list, list, Any]:
    """(the samples' descriptions, those skipped, the padded batch of the rest or None)."""
    present = [(about, s) for about, s in items if s is not None]
    skipped = [about for about, s in items if s is None]
    batch = pad_batch([s for _, s in present], pad_id) if present else None
    return [about for about, _ in present], skipped, batch


def sample_losses(
    model: Any,
    dataset: JsonlDataset,
    val_set: str,
    batch_size: int,
    pad_id: int,
    workers: int,
    dtype: str,
    journal: Journal,
) -> list[dict]:
    """Each sample's loss per answered turn (summed nats and tokens, with the turn's family
    and answer kind), with the training loss at training's precision; samples already in
    `journal` are taken from it, the others computed and added to it batch by batch."""
    keys = [["loss", val_set, row["id"]] for row in dataset.rows()]
    todo = [i for i, key in enumerate(keys) if key not in journal]
    loader = DataLoader(_LossSamples(dataset, todo), batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(_loss_batch, pad_id=pad_id))  # fmt: skip
    device = next(model.parameters()).device
    with torch.no_grad(), training_precision(dtype):
        for abouts, skipped, batch in loader:
            records = [_loss_record(val_set, about, []) | {"skipped": True} for about in skipped]
            if batch is not None:
                batch = on_device(batch, device)
                turns = turn_sums(labelled_token_losses(model, batch), batch["labels"])
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
