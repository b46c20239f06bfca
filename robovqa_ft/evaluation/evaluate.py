"""Evaluate one run (or the untrained base model): per-sample val losses on both stages'
val sets (with each answer's family and kind), and answers to a fixed sample of val
questions, taken clip by clip and stratified by score group.

Each question is asked in both answer formats (stage 1's: its frames and the question;
stage 2's: its frames and the clip's earlier questions with their reference answers,
then the question), and every yes/no question also on blank frames and on another clip's
frames of its group: the controls a model that looks at the pixels must beat
(`questions.py`); scored as `scoring.py` says; losses as `val_losses.py` computes them;
answers as `generation.py` generates them. Never trains and never touches a checkpoint;
finished batches go to a journal (`journal.py`), so a killed evaluation resumes after its
last one. The fields: docs/eval_json.md.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel

from robovqa_ft.core.files import atomic_open, write_json_atomic
from robovqa_ft.core.provenance import provenance
from robovqa_ft.core.runs import FORMATS, PROGRESS_FILE, trained_formats
from robovqa_ft.evaluation.generation import answer_batches
from robovqa_ft.evaluation.journal import Journal, journal_fingerprint
from robovqa_ft.evaluation.questions import (
    CONDITIONS,
    answer_sample,
    clip_conversations,
    questions_to_ask,
)
from robovqa_ft.evaluation.scoring import mean_or_none, score_answer, score_group, score_predictions
from robovqa_ft.evaluation.val_losses import loss_summary, sample_losses
from robovqa_ft.training.families import model_family
from robovqa_ft.training.model import check_adapter, load_model, load_processor, resolved_revision
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder, clip_order

log = logging.getLogger(__name__)

PROMPTS = {
    "stage1": "stage 1's training prompt: frames as `FrameN: <image>`, then the question",
    "stage2": "stage 2's training prompt: frames, then the clip's earlier questions with their "
              "reference answers, then the question (oldest pairs dropped to fit max_seq_len "
              "less max_new_tokens)",
}  # fmt: skip


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU)"
    return f"CPU only ({platform.machine()}, {os.cpu_count()} cores)"


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
    family = model_family(model["name"], revision, model.get("frames_as", "video"))
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
                             stages[stage]["max_seq_len"], blank_frames=blank,
                             frame_rate=model.get("frame_rate"))  # fmt: skip

    # The same clips for both val sets, so that the two losses describe the same videos.
    clips = clip_order(val_jsonl["stage2"], evaluation["seed"])[: evaluation["loss_clips"]]
    loss_records, losses = [], {}
    for stage, path in val_jsonl.items():
        dataset = JsonlDataset(path, builder(stage), clips=clips)
        trees = stages[stage].get("layout") == "tree"
        records = sample_losses(net, dataset, f"{stage}_val", evaluation["batch_size"],
                                pad_id, workers, dtype, journal, trees)  # fmt: skip
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
        "trained_formats": trained_formats(run),
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
        "history_turns": mean_or_none([p["history_turns"] for p in asked]),
        "dropped_history_turns": sum(p["dropped_history_turns"] for p in asked),
        "questions_trimmed": sum(p["dropped_history_turns"] > 0 for p in asked),
        **score_predictions(mine),
    }
