"""The merged model's card (README.md): what it is, the recipe, the data, the run's
eval.json figures with their conditions and intervals, how to load it, the license and
where it came from, with the Hub's metadata (model-index) for the figures."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
    hf_hub_download,
)

from robovqa_ft.core.runs import CURRICULUM
from robovqa_ft.core.text import markdown_table

log = logging.getLogger(__name__)


# RoboVQA is published on GitHub and as a GCS bucket, not as a Hub dataset: the card's
# `datasets` entry names the GitHub repository, and the card says so.
ROBOVQA = "google-deepmind/robovqa"


ROBOVQA_URL = "https://github.com/google-deepmind/robovqa"


DEMO_DATASET = "robovqa-format-synthetic-demo"


TASK = "image-text-to-text"


CONDITION_NAMES = {"frames": "own frames", "blank_frames": "blank frames",
              "other_clip": "another clip's frames (same group)"}  # fmt: skip


# eval.json's macro key of a yes/no accuracy under each condition
YES_NO_KEYS = {"frames": "yes_no_accuracy", "blank_frames": "blank_frames_yes_no_accuracy",
               "other_clip": "other_clip_yes_no_accuracy"}  # fmt: skip


METRIC_NAMES = {"val_loss": "val loss", "yes_no_accuracy": "yes/no accuracy (macro)",
                "bleu": "BLEU (macro)", "exact_match": "exact match (macro)"}  # fmt: skip


METRIC_TYPES = {"val_loss": "loss", "yes_no_accuracy": "accuracy", "bleu": "bleu",
                "exact_match": "exact_match"}  # fmt: skip


@dataclass(frozen=True)
class Figure:
    """One number of eval.json that the card states, with what it was measured on."""

    metric: str  # val_loss, yes_no_accuracy, bleu or exact_match
    value: float | None  # None: not in eval.json (left out of the card)
    val_set: str  # stage1_val or stage2_val: the questions' val file
    answer_format: str | None  # stage1 or stage2 (answers only)
    condition: str | None  # frames, blank_frames or other_clip (answers only)
    count: int  # labelled tokens of a loss, questions of a score
    counted: str  # "tokens" or "questions"

    @property
    def name(self) -> str:
        where = self.val_set if self.answer_format is None else (
            f"{self.answer_format} format, {CONDITION_NAMES[self.condition]}"
        )  # fmt: skip
        return f"{METRIC_NAMES[self.metric]}, {where}"


def card_figures(evaluation: dict) -> list[Figure]:
    """The figures of an eval.json the card states: the val loss of each val set, and in
    each answer format the macro yes/no accuracy on the clip's own frames and under both
    controls, BLEU and exact match. Absent (a format without yes/no or free-form groups)
    or undefined (no tokens) figures are left out, never written as 0."""
    figures = []
    for val_set, loss in evaluation["loss"].items():
        figures.append(Figure("val_loss", loss["loss"], val_set, None, None,
                              loss["tokens"], "tokens"))  # fmt: skip
    for form, scores in evaluation["answers"]["formats"].items():
        groups, macro = scores["groups"].values(), scores["macro"]
        yes_no = [g for g in groups if "accuracy" in g]
        free = [g for g in groups if "bleu" in g]
        counts = {"frames": sum(g["n"] for g in yes_no),
                  "blank_frames": sum(g["n"] for g in yes_no),
                  "other_clip": sum(g["other_clip_n"] for g in yes_no)}  # fmt: skip
        for condition, key in YES_NO_KEYS.items():
            figures.append(Figure("yes_no_accuracy", macro.get(key), "stage1_val", form,
                                  condition, counts[condition], "questions"))  # fmt: skip
        for metric in ("bleu", "exact_match"):
            figures.append(Figure(metric, macro.get(metric), "stage1_val", form, "frames",
                                  sum(g["n"] for g in free), "questions"))  # fmt: skip
    return [f for f in figures if f.value is not None and math.isfinite(f.value)]


def eval_results(figures: list[Figure], dataset: str, dataset_name: str) -> list[EvalResult]:
    """The figures as the Hub's model-index entries (the card's YAML `model-index`)."""
    return [
        EvalResult(
            task_type=TASK, task_name="RoboVQA video question answering",
            dataset_type=dataset, dataset_name=dataset_name, dataset_split="val",
            dataset_config=f.val_set, metric_type=METRIC_TYPES[f.metric], metric_name=f.name,
            metric_value=f.value,
            metric_config=None if f.answer_format is None else f"{f.answer_format}-format",
            metric_args={f.counted: f.count, **({"condition": f.condition} if f.condition else {})},
        )
        for f in figures
    ]  # fmt: skip


def base_license(name: str, revision: str | None) -> dict:
    """The base's license as its own model card states it (`license`, and for "other" its
    `license_name` and `license_link`): the README.md of a base folder, or of a Hub model
    at `revision` (the local cache when offline). {} when there is none to read."""
    folder = Path(name).expanduser()
    try:
        if folder.is_dir():
            card = folder / "README.md"
        else:
            card = Path(hf_hub_download(name, "README.md", revision=revision))
        data = ModelCard.load(card).data if card.is_file() else {}
    except Exception as error:  # offline and not cached, no card, or no such model
        log.warning(
            "the base model's card could not be read (%s: %s): the merged model's card "
            "points to the base for its license", type(error).__name__, error,
        )  # fmt: skip
        return {}
    keys = ("license", "license_name", "license_link")
    return {key: data.get(key) for key in keys if data.get(key)}


def _license_metadata(name: str, found: dict) -> dict:
    if found:
        return found
    # "other" is the Hub's value for a license given elsewhere; this one is the base's
    hub = not Path(name).expanduser().is_dir()
    return {"license": "other", "license_name": "base-model-license",
            **({"license_link": f"https://huggingface.co/{name}"} if hub else {})}  # fmt: skip


def model_card(
    run: str,
    model: dict,
    revision: str | None,
    adapter: dict,
    stages: dict[str, dict],
    training: dict,
    evaluation: dict,
    metadata: dict,
    license_found: dict,
    made_by: dict,
) -> ModelCard:
    """The merged model's card: YAML header (base model, dataset, license, library, task,
    tags, and every figure as a model-index entry) and a body stating how it was made,
    what it was evaluated on and how to load it. `adapter` is the adapter's
    adapter_config.json (its LoRA settings as peft saved them)."""
    demo = metadata.get("source") == "demo"
    dataset = DEMO_DATASET if demo else ROBOVQA
    dataset_name = ("synthetic demo bucket in the RoboVQA format" if demo
                    else "RoboVQA, this workflow's val split")  # fmt: skip
    figures = card_figures(evaluation)
    model_name = f"{Path(model['name']).name}-robovqa-{run}"
    tags = ["robovqa", "robotics", "video", "visual-question-answering", "lora", "merged",
            *(["qlora"] if model["quantization"] == "nf4" else []),
            *(["demo", "random-weights"] if demo else [])]  # fmt: skip
    data = ModelCardData(
        base_model=model["name"], datasets=None if demo else [dataset],
        library_name="transformers", pipeline_tag=TASK, tags=tags, model_name=model_name,
        eval_results=eval_results(figures, dataset, dataset_name),
        **_license_metadata(model["name"], license_found),
    )  # fmt: skip
    body = "\n\n".join([
        f"# {model_name}",
        _what_it_is(run, model, revision, demo),
        _recipe(run, model, adapter, stages, training),
        _data(metadata, demo),
        _evaluation(evaluation, figures),
        _how_to_load(model),
        _license_text(model["name"], license_found),
        _provenance(revision, made_by, evaluation),
    ])  # fmt: skip
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _what_it_is(run: str, model: dict, revision: str | None, demo: bool) -> str:
    at = f" at revision `{revision}`" if revision else ""
    text = (
        f"`{model['name']}`{at} with the LoRA adapter of the `{run}` run of the robovqa_ft "
        "workflow merged into its weights, in "
        f"{model['dtype']}, saved in Hugging Face format with its processor: "
        "`AutoModelForImageTextToText.from_pretrained` loads it without peft."
    )
    if model["quantization"] == "nf4":
        text += (
            " The adapter was trained on the 4-bit NF4 base (QLoRA); it is merged into the base "
            f"reloaded unquantized in {model['dtype']}, as peft documents, so this model's "
            "outputs differ from the QLoRA model's by the base's quantization error."
        )
    if demo:
        text += (
            "\n\n**Demo**: a tiny randomly initialised model trained on synthetic data; it shows "
            "that the pipeline works, not how a real model does."
        )
    return text


def _recipe(run: str, model: dict, adapter: dict, stages: dict[str, dict], training: dict) -> str:
    how = {
        "stage1": "stage 1 only, from the base model (one question/answer pair a sample).",
        "stage2": "the curriculum: stage 1 from the base model (one question/answer pair a "
                  "sample), then stage 2 from the stage-1 adapter (each clip's questions as "
                  "one multi-turn conversation), with a fresh optimizer and schedule.",
        "stage2_only": "the ablation: stage 2 only, from the base model (each clip's "
                       "questions as one multi-turn conversation).",
    }[run]  # fmt: skip
    keys = ("learning_rate", "scheduler", "warmup_ratio", "epochs", "batch_size", "grad_accum",
            "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "max_frames",
            "max_seq_len")  # fmt: skip
    trained = CURRICULUM[run]
    rows = [[key, *(stages[s][key] for s in trained)] for key in keys]
    batches = [stages[s]["batch_size"] * stages[s]["grad_accum"] for s in trained]
    rows.insert(6, ["global batch (batch_size × grad_accum)", *batches])
    # stage 1's layout (stage 2 has one sample a clip): the same losses, fewer FLOPs
    rows.append(["layout", *(stages[s].get("layout", "separate") for s in trained)])
    if model["quantization"] == "nf4":
        weights = "4-bit NF4 with double quantization (QLoRA)"
    else:
        weights = f"{model['dtype']} (LoRA)"
    if training["max_steps"] == -1:
        steps = "the epochs decide the steps (max_steps -1)"
    else:
        steps = f"at most {training['max_steps']} optimizer steps a stage (max_steps)"
    return "\n".join([
        "## Training recipe",
        "",
        f"Run `{run}`: {how}",
        "",
        f"- LoRA r {adapter['r']}, alpha {adapter['lora_alpha']}, dropout "
        f"{adapter['lora_dropout']}, on the language model's q, k, v, o, gate, up and down "
        f"projections only (modules `{adapter['target_modules']}`); vision tower and "
        "projector frozen.",
        f"- Base weights during training: {weights}; compute dtype {model['dtype']}.",
        f"- Seed {training['seed']}; {steps}; the loss falls on the answers only.",
        "",
        markdown_table(["setting", *trained], rows),
    ])  # fmt: skip


def _data(metadata: dict, demo: bool) -> str:
    split, frames = metadata["split"], metadata["frames"]
    source = ("A synthetic bucket in the RoboVQA format (`source: demo`)" if demo else
              f"RoboVQA ({ROBOVQA_URL}; the data is the public bucket `gs://gdm-robovqa`, not a "
              f"Hub dataset: the `datasets` entry above names its GitHub repository), read "
              f"from `{metadata['source']}`")  # fmt: skip
    how = (f"a seeded hash of each video id (val_ratio {split['val_ratio']}, split_seed "
           f"{split['split_seed']}), both bucket splits pooled" if split["method"] == "hash"
           else "the bucket's own train/val split")  # fmt: skip
    rows = [[name, stats["clips"], stats["stage1_samples"]]
            for name, stats in metadata["splits"].items()]  # fmt: skip
    return "\n".join([
        "## Data",
        "",
        f"{source}. Split by video with {how}; subset_ratio {split['subset_ratio']}. "
        f"{frames['per_clip']} frames a clip, stored at {frames['size'][0]}×{frames['size'][1]} "
        "px; a sample takes the stage's `max_frames` of them, spread evenly and ending on the "
        "last.",
        "",
        markdown_table(["split", "clips", "questions"], rows),
    ])  # fmt: skip


def _evaluation(evaluation: dict, figures: list[Figure]) -> str:
    from robovqa_ft.evaluation.report import format_value  # matplotlib and pandas: not at import

    answers = evaluation["answers"]
    formats = answers["formats"]
    trained = ", ".join(evaluation["trained_formats"]) or "none"
    rows = [[f.name, format_value(f.metric, f.value), f"{f.count:,} {f.counted}"]
            for f in figures]  # fmt: skip
    floors = [[form, format_value("yes_no_accuracy", formats[form]["macro"].get(
        "yes_no_majority_rate"))] for form in formats]  # fmt: skip
    losses = [[s, format_value("val_loss", v["loss"]), f"{v['perplexity']:.2f}", v["tokens"],
               v["samples"], v["clips"]] for s, v in evaluation["loss"].items()]  # fmt: skip
    shown = [[form, f["frames"], f["max_seq_len"], f"{f['history_turns'] or 0:.2f}", f["prompt"]]
             for form, f in formats.items()]  # fmt: skip
    return "\n".join([
        "## Evaluation (this run's eval.json)",
        "",
        "On this workflow's val split (clips never trained on), measured with the adapter "
        "on the base as trained, before the merge: the merged model gives the same outputs "
        "up to the rounding of the merged weights, except after QLoRA, whose figures are the "
        "4-bit base's. "
        f"Answers: {answers['questions']:,} {answers['from']}, each asked in both "
        f"answer formats; {answers['decoding']}. Trained on format(s): {trained}. Yes/no "
        "answers are scored by their first yes/no word, free-form ones by sacrebleu's "
        "sentence BLEU (default settings) and exact match after normalization: RoboVQA BLEU "
        "figures from other toolkits are not comparable. The controls ask the same yes/no "
        "questions on blank frames and on another clip's frames (a model that learned from "
        "the pixels beats both); the majority answer's share is the floor.",
        "",
        markdown_table(["figure", "value", "rests on"], rows),
        "",
        markdown_table(["val set", "loss (nats/token)", "perplexity", "tokens", "samples", "clips"],
               losses),
        "",
        markdown_table(["answer format", "majority floor"], floors),
        "",
        markdown_table(["answer format", "frames", "max_seq_len", "history pairs (mean)", "prompt"],
               shown),
    ])  # fmt: skip


def _how_to_load(model: dict) -> str:
    if model.get("frames_as", "video") == "video":
        frames = (
            "as the family's video: for Qwen-VL one video (`videos=[frames]`, with "
            "`video_metadata` giving the chosen frames' indices among the clip's stored "
            f"frames and fps {model.get('frame_rate')}, a nominal rate; "
            "`do_sample_frames=False`; an odd count's last frame twice), for InternVL its "
            "video prompt (`Frame1: <image>` …, one tile a frame, `crop_to_patches=False`)"
        )
    else:
        frames = "one image each, no times"

    return "\n".join([
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("<this folder or repo>")',
        'processor = AutoProcessor.from_pretrained("<this folder or repo>")',
        "```",
        "",
        f"Prompt as in training: the frames open the first user turn, {frames}; then the "
        "question; the answer is the assistant turn.",
    ])  # fmt: skip


def _license_text(name: str, found: dict) -> str:
    if found:
        stated = found.get("license_name") or found["license"]
        text = f"The base model's: `{stated}`, as its card states" + (
            f" ({found['license_link']})." if found.get("license_link") else "."
        )  # fmt: skip
    else:
        text = (f"The base model's license applies; its card could not be read when this "
                f"model was merged: see `{name}`.")  # fmt: skip
    return f"## License\n\n{text} RoboVQA's own terms: {ROBOVQA_URL}."


def _provenance(revision: str | None, made_by: dict, evaluation: dict) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in made_by["packages"].items())
    evaluated = evaluation.get("provenance", {})
    lines = [
        "## Provenance",
        "",
        f"- Base revision: {revision or 'a local folder'}.",
        f"- Merged by robovqa_ft at commit {made_by['git_commit']}, with {packages}.",
        f"- Evaluated on {evaluation['hardware']}"
        + (f", at commit {evaluated['git_commit']}." if evaluated else "."),
    ]
    return "\n".join(lines)
