"""Evaluate one run (or the untrained base model): val loss and perplexity on both stages'
val sets, and answers to a fixed, family-stratified sample of val questions.

Never trains and never touches a checkpoint. Scores: yes/no questions by accuracy after
normalization (with the invalid rate, and the same accuracy with blank frames, which a
model that looks at the pixels must beat); free-form answers by sacrebleu's sentence BLEU
(prediction as hypothesis, reference as the one reference, default settings) and exact
match after normalization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import string
import time
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from peft import PeftModel
from torch.utils.data import DataLoader, Dataset

from robovqa_ft.files import atomic_open, write_json_atomic
from robovqa_ft.loss import loss_sums
from robovqa_ft.model import load_model, load_processor, model_family
from robovqa_ft.samples import JsonlDataset, SampleBuilder, clip_order, pad_batch, split_counters

log = logging.getLogger(__name__)

LOSS_REDUCTION = (
    "token-level mean: the summed cross-entropy of every assistant token (the answers and "
    "their end-of-turn token, as in training) divided by their number, over all samples"
)
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


# --- scoring -------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def yes_no(text: str) -> str | None:
    """The first `yes` or `no` word of the normalized answer, or None (an invalid answer)."""
    return next((word for word in normalize(text).split() if word in ("yes", "no")), None)


def sentence_bleu(prediction: str, reference: str) -> float:
    return sacrebleu.sentence_bleu(prediction, [reference]).score


def score_group(row: dict) -> str:
    """What a question is scored as: its family, with affordance split by answer type."""
    if row["task"] == "affordance":
        discriminative = row.get("answer_type") == "yes_no"
        return "affordance_discriminative" if discriminative else "affordance_generative"
    return row["task"]


def score_predictions(predictions: list[dict]) -> dict:
    """Per score group and macro-averaged: accuracy (yes/no) or BLEU and exact match."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        groups[p["group"]].append(p)
    scores = {}
    for group, items in sorted(groups.items()):
        if items[0]["answer_type"] == "yes_no":
            said = [yes_no(p["prediction"]) for p in items]
            blank = [yes_no(p["blank_frames_prediction"]) for p in items]
            other = [(yes_no(p["other_clip_prediction"]), p["reference"]) for p in items
                     if p.get("other_clip_prediction") is not None]  # fmt: skip
            yes_share = _mean([p["reference"] == "yes" for p in items])
            scores[group] = {
                "n": len(items),
                # what always giving the commoner answer would score: the floor to beat
                "majority_rate": max(yes_share, 1 - yes_share),
                "accuracy": _mean([s == p["reference"] for s, p in zip(said, items, strict=True)]),
                "invalid_rate": _mean([s is None for s in said]),
                "blank_frames_accuracy": _mean(
                    [b == p["reference"] for b, p in zip(blank, items, strict=True)]
                ),
                # another clip's frames of the same family: no evidence of this clip's
                "other_clip_accuracy": _mean([said == ref for said, ref in other]),
                "other_clip_n": len(other),
            }
        else:
            scores[group] = {
                "n": len(items),
                "bleu": _mean([sentence_bleu(p["prediction"], p["reference"]) for p in items]),
                "exact_match": _mean(
                    [normalize(p["prediction"]) == normalize(p["reference"]) for p in items]
                ),
            }
    yes_no_groups = [s for s in scores.values() if "accuracy" in s]
    free_groups = [s for s in scores.values() if "bleu" in s]
    macro = {
        "yes_no_accuracy": _mean([s["accuracy"] for s in yes_no_groups]),
        "blank_frames_yes_no_accuracy": _mean([s["blank_frames_accuracy"] for s in yes_no_groups]),
        "other_clip_yes_no_accuracy": _mean(
            [
                s["other_clip_accuracy"]
                for s in yes_no_groups
                if s["other_clip_accuracy"] is not None
            ]
        ),
        "yes_no_majority_rate": _mean([s["majority_rate"] for s in yes_no_groups]),
        "bleu": _mean([s["bleu"] for s in free_groups]),
        "exact_match": _mean([s["exact_match"] for s in free_groups]),
    }
    return {"groups": scores, "macro": macro}


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


# --- what is evaluated ---------------------------------------------------------------------


def answer_sample(val_jsonl: Path | str, per_group: int, seed: int) -> list[dict]:
    """Up to `per_group` val questions of each score group, taken clip by clip in the
    seeded clip order (`clip_order`; within a clip, by a seeded hash of the question's id):
    the same questions for every run."""
    rank = {clip: i for i, clip in enumerate(clip_order(val_jsonl, seed))}
    by_group: dict[str, list[tuple[int, str, dict]]] = defaultdict(list)
    with open(val_jsonl, encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            key = hashlib.sha256(f"{seed}:answers:{row['id']}".encode()).hexdigest()
            by_group[score_group(row)].append((rank[row["video_id"]], key, row))
    return [row for group in sorted(by_group)
            for *_, row in sorted(by_group[group], key=lambda t: t[:2])[:per_group]]  # fmt: skip


def other_clip_rows(rows: list[dict], seed: int) -> dict[str, dict]:
    """Each row (by id) with another clip's frames of its own score group, so the question
    still fits: a seeded derangement of the group's clips (a cyclic shift of a seeded
    order, so no clip keeps its own frames). A group of one clip has none."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_group[score_group(row)].append(row)
    swapped = {}
    for items in by_group.values():
        frames = {row["video_id"]: row["images"] for row in items}
        clips = sorted(frames, key=lambda c: hashlib.sha256(f"{seed}:other:{c}".encode()).digest())
        if len(clips) < 2:
            continue
        shown = {clip: clips[(i + 1) % len(clips)] for i, clip in enumerate(clips)}
        for row in items:
            other = shown[row["video_id"]]
            swapped[row["id"]] = {**row, "images": frames[other], "frames_of": other}
    return swapped


def val_loss(
    model: Any, dataset: JsonlDataset, batch_size: int, pad_id: int, workers: int, dtype: str
) -> dict:
    """Loss and perplexity with the training loss (`labelled_token_losses`), summed per
    token, at training's precision; samples are built in `workers` DataLoader workers."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(pad_batch, pad_token_id=pad_id))  # fmt: skip
    with torch.no_grad(), training_precision(dtype):
        sums = loss_sums(model, loader, next(model.parameters()).device)
    loss = sums["loss"] / sums["tokens"]
    return {"loss": loss, "perplexity": math.exp(loss), "samples": sums["samples"],
            "tokens": sums["tokens"], "skipped_samples": sums["skipped_samples"],
            "reduction": LOSS_REDUCTION}  # fmt: skip


class _Prompts(Dataset):
    """Generation prompts, built in DataLoader workers like training samples."""

    def __init__(self, builder: SampleBuilder, rows: list[dict]):
        self.builder, self.rows = builder, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.builder.encode_prompt(self.rows[index])


def generate_answers(
    model: Any,
    builder: SampleBuilder,
    rows: list[dict],
    batch_size: int,
    max_new_tokens: int,
    workers: int,
    dtype: str,
) -> list[str]:
    """Greedy answers to each row's first question, in batches (left-padded prompts)."""
    tokenizer = builder.processor.tokenizer
    device = next(model.parameters()).device
    # the end of the assistant turn, and whatever else the model stops on
    stops = sorted({builder.end, tokenizer.eos_token_id} - {None})
    loader = DataLoader(_Prompts(builder, rows), batch_size=batch_size, num_workers=workers,
                        collate_fn=partial(pad_batch, pad_token_id=tokenizer.pad_token_id,
                                           side="left"))  # fmt: skip
    answers = []
    with torch.no_grad(), training_precision(dtype):
        for batch in loader:
            batch = _on(split_counters(batch)[0], device)
            output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=stops)  # fmt: skip
            new = output[:, batch["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def training_precision(dtype: str) -> AbstractContextManager:
    """Autocast to `dtype` on a GPU, as the Trainer trains (`bf16`/`fp16`); nothing on a CPU."""
    if torch.cuda.is_available() and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return nullcontext()


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU)"
    return f"CPU only ({platform.machine()}, {os.cpu_count()} cores)"


def _on(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def evaluate_run(
    adapter_dir: Path | str | None,
    val_jsonl: dict[str, Path | str],
    images_dir: Path | str,
    eval_path: Path | str,
    predictions_path: Path | str,
    model: dict,
    stages: dict[str, dict],
    evaluation: dict,
    run: str,
) -> dict:
    """Write `eval.json` and `predictions.jsonl` for one run; `adapter_dir` None is the base.

    `val_jsonl` maps "stage1"/"stage2" to their val files; `stages` holds the stage config
    sections (frames and sequence length, as in training); `evaluation` the eval section.
    """
    started = time.monotonic()
    torch.manual_seed(evaluation["seed"])
    processor = load_processor(model["name"])
    family = model_family(model["name"])
    net = load_model(model["name"], model["quantization"], model["dtype"],
                     model["attn_implementation"], False, model.get("max_memory_gb"))  # fmt: skip
    if adapter_dir is not None:
        net = PeftModel.from_pretrained(net, str(adapter_dir))
    net.eval()
    pad_id = processor.tokenizer.pad_token_id
    workers, dtype = evaluation["dataloader_workers"], model["dtype"]

    # The same clips for both val sets, so that the two losses describe the same videos.
    clips = clip_order(val_jsonl["stage2"], evaluation["seed"])[: evaluation["loss_clips"]]
    losses = {}
    for stage, path in val_jsonl.items():
        builder = SampleBuilder(processor, family, images_dir, stages[stage]["max_frames"],
                                stages[stage]["max_seq_len"])  # fmt: skip
        dataset = JsonlDataset(path, builder, clips=clips)
        losses[f"{stage}_val"] = val_loss(
            net, dataset, evaluation["batch_size"], pad_id, workers, dtype
        ) | {"clips": len(clips)}
        log.info("%s %s val loss %.4f", run, stage, losses[f"{stage}_val"]["loss"])

    rows = answer_sample(val_jsonl["stage1"], evaluation["answers_per_family"], evaluation["seed"])
    frames, max_len = stages["stage1"]["max_frames"], stages["stage1"]["max_seq_len"]
    seen = SampleBuilder(processor, family, images_dir, frames, max_len)
    blank = SampleBuilder(processor, family, images_dir, frames, max_len, blank_frames=True)
    generate = partial(generate_answers, net, batch_size=evaluation["generation_batch_size"],
                       max_new_tokens=evaluation["max_new_tokens"], workers=workers,
                       dtype=dtype)  # fmt: skip
    said = generate(seen, rows)
    yes_no_rows = [r for r in rows if r.get("answer_type") == "yes_no"]
    blank_said = dict(zip([r["id"] for r in yes_no_rows], generate(blank, yes_no_rows),
                          strict=True))  # fmt: skip
    swapped = other_clip_rows(yes_no_rows, evaluation["seed"])
    other_said = dict(zip(swapped, generate(seen, list(swapped.values())), strict=True))
    predictions = [
        {"id": r["id"], "group": score_group(r), "family": r["task"],
         "answer_type": r.get("answer_type", "freeform"),
         "question": r["conversations"][0]["value"], "reference": r["conversations"][1]["value"],
         "prediction": p, "blank_frames_prediction": blank_said.get(r["id"]),
         "other_clip_prediction": other_said.get(r["id"]),
         "other_clip_frames_of": swapped.get(r["id"], {}).get("frames_of")}
        for r, p in zip(rows, said, strict=True)
    ]  # fmt: skip
    with atomic_open(predictions_path) as handle:
        for p in predictions:
            handle.write(json.dumps(p, ensure_ascii=False) + "\n")
    result = {
        "run": run,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "model": model["name"],
        "loss": losses,
        "answers": {
            "questions": len(rows),
            "from": "stage-1 val questions, taken clip by clip in the seeded clip order",
            "frames": frames,
            "prompt": "the training prompt: frames as `FrameN: <image>`, then the question",
            "decoding": f"greedy, at most {evaluation['max_new_tokens']} new tokens",
            **score_predictions(predictions),
        },
        "hardware": hardware(),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    write_json_atomic(eval_path, result)
    return result
