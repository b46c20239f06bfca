"""Evaluate one run (or the untrained base model): per-sample val losses on both stages'
val sets (with each answer's family and kind), and answers to a fixed sample of val
questions, taken clip by clip and stratified by score group.

Each question is asked in both answer formats (stage 1's: its frames and the question;
stage 2's: its frames and the clip's earlier questions with their reference answers,
then the question), and every yes/no question also on blank frames and on another clip's
frames of its group: the controls a model that looks at the pixels must beat. Scores:
yes/no by accuracy after normalization (with the invalid rate); free form by sacrebleu's
sentence BLEU (prediction as hypothesis, reference as the one reference, default
settings) and exact match after normalization. Never trains and never touches a
checkpoint; finished batches go to a journal (`robovqa_ft.journal`), so a killed
evaluation resumes after its last one. The fields: docs/eval_json.md.
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
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from peft import PeftModel
from torch.utils.data import DataLoader, Dataset

from robovqa_ft.checkpoints import fingerprint
from robovqa_ft.files import atomic_open, write_json_atomic
from robovqa_ft.journal import Journal
from robovqa_ft.loss import labelled_token_losses, turn_sums
from robovqa_ft.model import (
    check_adapter,
    load_model,
    load_processor,
    model_family,
    resolved_revision,
)
from robovqa_ft.provenance import provenance
from robovqa_ft.samples import JsonlDataset, SampleBuilder, clip_order, pad_batch, split_counters

log = logging.getLogger(__name__)

# The answer formats, as each stage trains: stage 1's frames and one question; stage 2's
# frames and the clip's conversation, the earlier questions with their reference answers.
FORMATS = ("stage1", "stage2")
PROMPTS = {
    "stage1": "stage 1's training prompt: frames as `FrameN: <image>`, then the question",
    "stage2": "stage 2's training prompt: frames, then the clip's earlier questions with their "
              "reference answers, then the question (oldest pairs dropped to fit max_seq_len "
              "less max_new_tokens)",
}  # fmt: skip
TRAINED_FORMATS = {"base": [], "stage1": ["stage1"], "stage2": ["stage1", "stage2"],
                   "stage2_only": ["stage2"]}  # fmt: skip
# What a question is answered on: its clip's frames, blank ones, or another clip's.
CONDITIONS = ("frames", "blank_frames", "other_clip")
PROGRESS_FILE = "eval_progress.jsonl"
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


def score_answer(answer_type: str, prediction: str, reference: str) -> dict:
    """One answer's score: the yes/no said and whether it is right, or BLEU and exact match."""
    if answer_type == "yes_no":
        said = yes_no(prediction)
        return {"said": said, "correct": said == reference}
    return {"bleu": sentence_bleu(prediction, reference),
            "exact_match": normalize(prediction) == normalize(reference)}  # fmt: skip


def score_predictions(predictions: list[dict]) -> dict:
    """One format's predictions, per score group and macro-averaged: accuracy (yes/no, with
    both controls beside it) or BLEU and exact match."""
    by_condition: dict[str, dict[str, dict]] = defaultdict(dict)
    for p in predictions:
        by_condition[p["condition"]][p["id"]] = p
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in by_condition["frames"].values():
        groups[p["group"]].append(p)
    scores = {}
    for group, items in sorted(groups.items()):
        if items[0]["answer_type"] == "yes_no":
            control = {c: [by_condition[c][p["id"]]["score"]["correct"] for p in items
                           if p["id"] in by_condition[c]]
                       for c in ("blank_frames", "other_clip")}  # fmt: skip
            yes_share = _mean([p["reference"] == "yes" for p in items])
            scores[group] = {
                "n": len(items),
                # what always giving the commoner answer would score: the floor to beat
                "majority_rate": max(yes_share, 1 - yes_share),
                "accuracy": _mean([p["score"]["correct"] for p in items]),
                "invalid_rate": _mean([p["score"]["said"] is None for p in items]),
                "blank_frames_accuracy": _mean(control["blank_frames"]),
                # another clip's frames of the same family: no evidence of this clip's
                "other_clip_accuracy": _mean(control["other_clip"]),
                "other_clip_n": len(control["other_clip"]),
            }
        else:
            scores[group] = {
                "n": len(items),
                "bleu": _mean([p["score"]["bleu"] for p in items]),
                "exact_match": _mean([p["score"]["exact_match"] for p in items]),
            }
    yes_no_groups = [s for s in scores.values() if "accuracy" in s]
    free_groups = [s for s in scores.values() if "bleu" in s]
    macro = {
        "yes_no_accuracy": _group_mean(yes_no_groups, "accuracy"),
        "blank_frames_yes_no_accuracy": _group_mean(yes_no_groups, "blank_frames_accuracy"),
        "other_clip_yes_no_accuracy": _group_mean(yes_no_groups, "other_clip_accuracy"),
        "yes_no_majority_rate": _group_mean(yes_no_groups, "majority_rate"),
        "bleu": _group_mean(free_groups, "bleu"),
        "exact_match": _group_mean(free_groups, "exact_match"),
    }
    return {"groups": scores, "macro": macro}


def _group_mean(groups: list[dict], key: str) -> float | None:
    """The macro average: each group that has the score counts once."""
    return _mean([g[key] for g in groups if g[key] is not None])


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


def clip_conversations(stage2_jsonl: Path | str, clips: set[str]) -> dict[str, dict]:
    """The stage-2 row (the whole conversation) of each of `clips`."""
    with open(stage2_jsonl, encoding="utf-8") as lines:
        rows = (json.loads(line) for line in lines if line.strip())
        return {row["video_id"]: row for row in rows if row["video_id"] in clips}


def question_turn(row: dict, conversation: dict) -> int:
    """Where a stage-1 question (`{clip}-{k:02d}`) sits in its clip's conversation: k,
    checked against the conversation's own k-th question."""
    turn = int(row["id"].rsplit("-", 1)[1])
    turns = conversation["conversations"]
    if 2 * turn >= len(turns) or turns[2 * turn]["value"] != row["conversations"][0]["value"]:
        raise ValueError(
            f"question {row['id']} is not question {turn} of clip {row['video_id']}'s "
            "stage-2 conversation: were the stage-1 and stage-2 val files built together?"
        )
    return turn


def questions_to_ask(rows: list[dict], conversations: dict[str, dict], seed: int) -> list[dict]:
    """Every (format, condition, question) to answer: each question in both formats with
    the clip's frames; yes/no questions also on blank frames and on another clip's."""
    yes_no_rows = [r for r in rows if r.get("answer_type") == "yes_no"]
    swapped = other_clip_rows(yes_no_rows, seed)
    shown = {"frames": rows, "blank_frames": yes_no_rows, "other_clip": list(swapped.values())}
    asks = []
    for form in FORMATS:
        for condition in CONDITIONS:
            for row in shown[condition]:
                frames_of = row.get("frames_of", row["video_id"])
                if form == "stage1":
                    asked, turn = row, 0
                else:
                    conversation = conversations[row["video_id"]]
                    asked = {**conversation, "images": row["images"]}
                    turn = question_turn(row, conversation)
                asks.append({"key": ["answer", form, condition, row["id"]], "row": asked,
                             "turn": turn, "question": row, "frames_of": frames_of})  # fmt: skip
    return asks


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
            batch = _on(split_counters(batch)[0], device)
            output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=stops)  # fmt: skip
            new = output[:, batch["input_ids"].shape[1] :]
            yield [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


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
                batch = _on(batch, device)
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
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()
    }


def _write_jsonl(path: Path | str, records: list[dict]) -> None:
    with atomic_open(path) as handle:
        for record in records:
            record = {k: v for k, v in record.items() if k != "key"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def evaluate_run(
    adapter_dir: Path | str | None,
    val_jsonl: dict[str, Path | str],
    images_dir: Path | str,
    outputs: dict[str, Path | str],
    model: dict,
    stages: dict[str, dict],
    evaluation: dict,
    run: str,
) -> dict:
    """Write eval.json, predictions.jsonl and val_losses.jsonl for one run (`outputs` keys
    "eval", "predictions", "losses"); `adapter_dir` None is the base model.

    `val_jsonl` maps "stage1"/"stage2" to their val files; `stages` holds the stage config
    sections (frames and sequence length, as in training); `evaluation` the eval section.
    Finished batches are kept in `eval_progress.jsonl` beside eval.json until it is
    written: a rerun after a kill continues after the last of them.
    """
    if adapter_dir is not None:  # before any model loads
        check_adapter(adapter_dir, model["name"])
    started = time.monotonic()
    outputs = {k: Path(v) for k, v in outputs.items()}
    torch.manual_seed(evaluation["seed"])
    inputs = [p for p in (adapter_dir, *val_jsonl.values()) if p is not None]
    revision = resolved_revision(model["name"], model.get("revision"))  # one commit throughout
    log.info("Base model %s at revision %s", model["name"], revision or "(a local folder)")
    journal = Journal(outputs["eval"].with_name(PROGRESS_FILE),
                      journal_fingerprint({**model, "revision": revision}, stages, evaluation,
                                          inputs))  # fmt: skip
    processor = load_processor(model["name"], revision)
    family = model_family(model["name"], revision)
    net = load_model(model["name"], model["quantization"], model["dtype"],
                     model["attn_implementation"], False, model.get("max_memory_gb"),
                     revision)  # fmt: skip
    if adapter_dir is not None:
        net = PeftModel.from_pretrained(net, str(adapter_dir))
    net.eval()
    workers, dtype = evaluation["dataloader_workers"], model["dtype"]
    pad_id = processor.tokenizer.pad_token_id

    def builder(stage: str, blank: bool = False) -> SampleBuilder:
        return SampleBuilder(processor, family, images_dir, stages[stage]["max_frames"],
                             stages[stage]["max_seq_len"], blank_frames=blank)  # fmt: skip

    # The same clips for both val sets, so that the two losses describe the same videos.
    clips = clip_order(val_jsonl["stage2"], evaluation["seed"])[: evaluation["loss_clips"]]
    loss_records, losses = [], {}
    for stage, path in val_jsonl.items():
        dataset = JsonlDataset(path, builder(stage), clips=clips)
        records = sample_losses(net, dataset, f"{stage}_val", evaluation["batch_size"],
                                pad_id, workers, dtype, journal)  # fmt: skip
        loss_records += records
        losses[f"{stage}_val"] = loss_summary(records) | {"clips": len(clips)}
        log.info("%s %s val loss %.4f", run, stage, losses[f"{stage}_val"]["loss"])

    rows = answer_sample(val_jsonl["stage1"], evaluation["answers_per_family"], evaluation["seed"])
    conversations = clip_conversations(val_jsonl["stage2"], {r["video_id"] for r in rows})
    asks = questions_to_ask(rows, conversations, evaluation["seed"])
    generate = partial(answer_batches, net, batch_size=evaluation["generation_batch_size"],
                       max_new_tokens=evaluation["max_new_tokens"], workers=workers,
                       dtype=dtype)  # fmt: skip
    for form in FORMATS:
        # the prompt leaves room for the longest answer within the stage's sequence length
        budget = stages[form]["max_seq_len"] - evaluation["max_new_tokens"]
        for condition in CONDITIONS:
            todo = [a for a in asks
                    if a["key"][1:3] == [form, condition] and a["key"] not in journal]  # fmt: skip
            if not todo:
                continue
            asker = builder(form, blank=condition == "blank_frames")
            log.info("%s: %d questions in %s format, %s", run, len(todo), form, condition)
            answers = generate(asker, [(a["row"], a["turn"]) for a in todo], budget)
            start = 0
            for said in answers:
                batch, start = todo[start : start + len(said)], start + len(said)
                journal.append([_prediction(a, p, asker, budget)
                                for a, p in zip(batch, said, strict=True)])  # fmt: skip
    predictions = [journal.records[tuple(a["key"])] for a in asks]
    _write_jsonl(outputs["predictions"], predictions)
    _write_jsonl(outputs["losses"], loss_records)
    result = {
        "run": run,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "model": model["name"],
        "trained_formats": TRAINED_FORMATS[run],
        "loss": losses,
        "answers": {
            "questions": len(rows),
            "from": "stage-1 val questions, taken clip by clip in the seeded clip order",
            "decoding": f"greedy, at most {evaluation['max_new_tokens']} new tokens",
            "formats": {
                form: _format_summary(form, stages[form], evaluation, predictions)
                for form in FORMATS
            },  # fmt: skip
        },
        "hardware": hardware(),
        "provenance": provenance(1, revision),
        "wall_seconds": round(time.monotonic() - started, 1),
        "resumed_records": journal.resumed,
    }
    write_json_atomic(outputs["eval"], result)
    journal.remove()
    return result


def journal_fingerprint(model: dict, stages: dict, evaluation: dict, inputs: list) -> str:
    """What a journal's records were computed with: every setting that could change a
    number (batch sizes and the attention kernel included: batches must come out as an
    uninterrupted run makes them), the adapter and val files, and this package's code."""
    code = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        code.update(source.read_bytes())
    exact = {
        "model": model,
        "stages": stages,
        "code": code.hexdigest(),
        "evaluation": {k: v for k, v in evaluation.items() if k != "dataloader_workers"},
    }
    # section names BOOKKEEPING does not know: fingerprint() keeps every key
    return fingerprint({"journal": exact}, inputs)


def _prediction(ask: dict, said: str, asker: SampleBuilder, budget: int) -> dict:
    row, (_, form, condition, _) = ask["question"], ask["key"]
    kept = asker.history_that_fits(ask["row"], ask["turn"], budget)
    kind = row.get("answer_type", "freeform")
    reference = row["conversations"][1]["value"]
    return {"key": ask["key"], "id": row["id"], "video_id": row["video_id"],
            "group": score_group(row), "family": row["task"], "answer_type": kind,
            "format": form, "condition": condition, "frames_of": ask["frames_of"],
            "history_turns": kept, "dropped_history_turns": ask["turn"] - kept,
            "question": row["conversations"][0]["value"], "reference": reference,
            "prediction": said, "score": score_answer(kind, said, reference)}  # fmt: skip


def _format_summary(form: str, stage: dict, evaluation: dict, predictions: list[dict]) -> dict:
    mine = [p for p in predictions if p["format"] == form]
    asked = [p for p in mine if p["condition"] == "frames"]
    return {
        "frames": stage["max_frames"],
        "max_seq_len": stage["max_seq_len"],
        "prompt": PROMPTS[form],
        "history_turns": _mean([p["history_turns"] for p in asked]),
        "dropped_history_turns": sum(p["dropped_history_turns"] for p in asked),
        "questions_trimmed": sum(p["dropped_history_turns"] > 0 for p in asked),
        **score_predictions(mine),
    }
