"""The merged model (robovqa_ft/tools/merge.py, its card in model_card.py) on the tiny
model: its logits are the adapter model's, it loads without peft, and its card states
eval.json's figures."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from training_helpers import run_settings, train_tiny
from transformers import AutoModelForImageTextToText, AutoProcessor

from robovqa_ft.evaluation.evaluate import evaluate_run
from robovqa_ft.evaluation.report import format_value
from robovqa_ft.tools.merge import merge_run
from robovqa_ft.tools.model_card import base_license, model_card
from robovqa_ft.training.collate import pad_batch, split_counters
from robovqa_ft.training.families import model_family
from robovqa_ft.training.model import load_model, load_processor
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder

# metadata.json as build_jsonl writes it, for the tiny setup's data
METADATA = {
    "source": "demo",
    "split": {"method": "hash", "val_ratio": 0.2, "split_seed": 0, "subset_ratio": 1.0},
    "frames": {"per_clip": 16, "size": [64, 64], "jpeg_quality": 90},
    "splits": {"train": {"clips": 48, "stage1_samples": 96},
               "val": {"clips": 8, "stage1_samples": 16}},
}  # fmt: skip


def merge(setup: dict, adapter: Path, out: Path, evaluation: Path, **model) -> Path:
    settings = run_settings(setup["model"], model_settings=model)
    metadata = out.parent / "metadata.json"
    metadata.write_text(json.dumps(METADATA))
    return merge_run(
        adapter_dir=adapter, eval_json=evaluation, metadata_json=metadata, out_dir=out,
        model=settings["model"], stages={"stage1": settings["stage"]},
        training=settings["training"], run="stage1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def merged(tiny_setup, tmp_path_factory) -> dict:
    """A stage-1 run of the tiny model: its adapter, its real eval.json, and the merge."""
    root = tmp_path_factory.mktemp("merged")
    adapter = train_tiny(tiny_setup, root / "stage1", max_steps=4)
    stage = run_settings(tiny_setup["model"])["stage"]
    evaluation = {"seed": 0, "batch_size": 4, "generation_batch_size": 4,
                  "dataloader_workers": 0, "loss_clips": 4, "answers_per_family": 3,
                  "max_new_tokens": 4}  # fmt: skip
    out = root / "stage1"
    evaluate_run(
        adapter_dir=adapter, images_dir=tiny_setup["images"],
        val_jsonl={"stage1": tiny_setup["stage1_val"], "stage2": tiny_setup["stage2_val"]},
        outputs={"eval": out / "eval.json", "predictions": out / "predictions.jsonl",
                 "losses": out / "val_losses.jsonl"},
        model=run_settings(tiny_setup["model"])["model"],
        stages={"stage1": stage, "stage2": {**stage, "max_frames": 6}},
        evaluation=evaluation, run="stage1",
    )  # fmt: skip
    folder = merge(tiny_setup, adapter, out / "merged", out / "eval.json")
    return {"adapter": adapter, "eval": out / "eval.json", "folder": folder}


def sample_batch(setup: dict) -> dict:
    """Two stage-2 val samples (frames, the clip's conversation), padded as in training."""
    processor = load_processor(setup["model"])
    builder = SampleBuilder(processor, model_family(setup["model"]), setup["images"], 4, 512)
    dataset = JsonlDataset(setup["stage2_val"], builder, limit=2)
    batch = pad_batch([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    inputs, _ = split_counters(batch)
    inputs.pop("labels")
    return inputs


def test_merged_model_gives_the_adapter_models_logits(tiny_setup, merged):
    inputs = sample_batch(tiny_setup)
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    with torch.no_grad():
        plain = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, str(merged["adapter"])).eval()(**inputs).logits
        model = AutoModelForImageTextToText.from_pretrained(merged["folder"]).eval()
        logits = model(**inputs).logits
    assert (logits - adapted).abs().max() < 1e-4
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changed something to merge


def test_merged_folder_is_a_plain_model_with_its_processor(tiny_setup, merged):
    folder = merged["folder"]
    assert not (folder / "adapter_config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    processor = AutoProcessor.from_pretrained(folder)
    assert (
        processor.tokenizer.get_vocab() == load_processor(tiny_setup["model"]).tokenizer.get_vocab()
    )
    assert not list(folder.parent.glob(".merged.*.part"))  # written whole, then renamed


def expected_figures(evaluation: dict) -> dict[str, float]:
    """eval.json's figures by the card's metric names, read here without model_card.py."""
    names = {"frames": "own frames", "blank_frames": "blank frames",
             "other_clip": "another clip's frames (same group)"}  # fmt: skip
    keys = {"frames": "yes_no_accuracy", "blank_frames": "blank_frames_yes_no_accuracy",
            "other_clip": "other_clip_yes_no_accuracy"}  # fmt: skip
    figures = {f"val loss, {s}": v["loss"] for s, v in evaluation["loss"].items()}
    for form, scores in evaluation["answers"]["formats"].items():
        macro = scores["macro"]
        for condition, key in keys.items():
            figures[f"yes/no accuracy (macro), {form} format, {names[condition]}"] = macro[key]
        figures[f"BLEU (macro), {form} format, own frames"] = macro["bleu"]
        figures[f"exact match (macro), {form} format, own frames"] = macro["exact_match"]
    return figures


def test_card_states_eval_jsons_figures_in_its_yaml_and_its_text(merged):
    evaluation = json.loads(merged["eval"].read_text())
    card = ModelCard.load(merged["folder"] / "README.md")  # the YAML header parses
    stated = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert stated == expected_figures(evaluation)
    for result in card.data.eval_results:
        assert result.dataset_split == "val" and result.dataset_config in (
            "stage1_val",
            "stage2_val",
        )
    # the text's table: each figure rounded as the ablation report rounds it
    for name, value in stated.items():
        metric = "val_loss" if name.startswith("val loss") else (
            "bleu" if name.startswith("BLEU") else "yes_no_accuracy"
        )  # fmt: skip
        assert f"| {name} | {format_value(metric, value)} |" in card.text
    questions = evaluation["answers"]["questions"]
    assert f"{questions:,} stage-1 val questions" in card.text


def test_each_figure_of_the_card_is_its_own_number_of_eval_json(tiny_setup, merged, tmp_path):
    # every figure made distinct, so that no two can be mixed up unseen
    evaluation = json.loads(merged["eval"].read_text())
    numbers = iter(range(1, 100))
    for loss in evaluation["loss"].values():
        loss["loss"] = next(numbers) / 7
    for scores in evaluation["answers"]["formats"].values():
        for key in scores["macro"]:
            scores["macro"][key] = next(numbers) / 101
    settings = run_settings(tiny_setup["model"])
    adapter = json.loads((merged["adapter"] / "adapter_config.json").read_text())
    card = model_card("stage1", settings["model"], None, adapter,
                      {"stage1": settings["stage"]}, settings["training"], evaluation, METADATA,
                      {}, {"git_commit": "abc", "packages": {"torch": "2"}})  # fmt: skip
    card.save(tmp_path / "README.md")
    stated = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert {r.metric_name: r.metric_value for r in stated} == expected_figures(evaluation)


def test_card_header_names_base_task_library_and_license(tiny_setup, merged):
    data = ModelCard.load(merged["folder"] / "README.md").data
    assert data.base_model == str(tiny_setup["model"])
    assert (data.library_name, data.pipeline_tag) == ("transformers", "image-text-to-text")
    # the tiny base has no card: the license is the base's, said as such
    assert (data.license, data.license_name) == ("other", "base-model-license")
    assert "demo" in data.tags and data.datasets is None  # synthetic data, not RoboVQA


def test_card_states_the_recipe(merged):
    text = ModelCard.load(merged["folder"] / "README.md").text
    assert "LoRA r 8, alpha 16, dropout 0.1" in text
    assert (
        "| learning_rate | 0.002 |" in text
        and "| global batch (batch_size × grad_accum) | 8 |" in text
    )
    assert "Run `stage1`: stage 1 only, from the base model" in text


def test_base_license_is_copied_from_the_base_models_card(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: qwen\nlicense_link: https://example.org/LICENSE\n"
        "---\n# a base\n"
    )
    assert base_license(str(tmp_path), None) == {
        "license": "other", "license_name": "qwen", "license_link": "https://example.org/LICENSE"
    }  # fmt: skip
    (tmp_path / "README.md").unlink()
    assert base_license(str(tmp_path), None) == {}


def test_a_qlora_adapter_is_merged_into_the_base_reloaded_unquantized(tiny_setup, merged, tmp_path):
    nf4 = {"quantization": "nf4"}
    adapter = train_tiny(tiny_setup, tmp_path / "qlora", max_steps=2, model_settings=nf4)
    # the stage-1 eval.json of the fixture: this test is about the weights
    folder = merge(tiny_setup, adapter, tmp_path / "merged", merged["eval"], **nf4)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    inputs = sample_batch(tiny_setup)
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()(**inputs).logits
        logits = AutoModelForImageTextToText.from_pretrained(folder).eval()(**inputs).logits
    assert (logits - adapted).abs().max() < 1e-4
    card = ModelCard.load(folder / "README.md")
    assert "qlora" in card.data.tags and "reloaded unquantized in float32" in card.text


def test_an_eval_json_of_another_run_is_refused_before_any_model_loads(
    tiny_setup, merged, tmp_path, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("robovqa_ft.training.model.load_model", never)
    monkeypatch.setattr("robovqa_ft.training.model.load_processor", never)
    other = tmp_path / "eval.json"
    other.write_text(json.dumps({**json.loads(merged["eval"].read_text()), "run": "stage2"}))
    with pytest.raises(ValueError, match="evaluation of run 'stage2', not of 'stage1'"):
        merge(tiny_setup, merged["adapter"], tmp_path / "merged", other)
    assert not (tmp_path / "merged").exists()
