"""Bad inputs on the training side (torch, never TensorFlow): a JSONL line edited by hand,
a checkpoint folder of another configuration, an adapter of another model, an init adapter
of another LoRA rank. Each stops with its exact message, and nothing else is lost."""

import json
import logging
import shutil

import pytest
from training_helpers import csv_rows, run_settings, train_tiny

from robovqa_ft.evaluation import evaluate
from robovqa_ft.evaluation.evaluate import evaluate_run
from robovqa_ft.training import train
from robovqa_ft.training.checkpoints import (
    COMPLETE_MARKER,
    FINGERPRINT_FILE,
    prepare_checkpoint_dir,
)
from robovqa_ft.training.families import model_family
from robovqa_ft.training.model import attach_lora, check_adapter, load_model, load_processor
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder


def test_a_hand_edited_line_is_named_by_file_and_line(tiny_setup, tmp_path):
    lines = tiny_setup["stage1_train"].read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["images"]
    path = tmp_path / "edited.jsonl"
    path.write_text("\n".join([lines[0], lines[1], json.dumps(broken), "{not json"]) + "\n")
    builder = SampleBuilder(
        load_processor(tiny_setup["model"]), model_family(tiny_setup["model"]),
        tiny_setup["images"], 4, 512,
    )  # fmt: skip
    dataset = JsonlDataset(path, builder)
    assert dataset.row(0)["id"] == json.loads(lines[0])["id"]
    with pytest.raises(ValueError, match=f"{path} line 3: missing images"):
        dataset.row(2)
    with pytest.raises(ValueError, match=f"{path} line 4: not JSON"):
        dataset.row(3)
    with pytest.raises(ValueError, match="line 3: missing images"):
        JsonlDataset(path, builder, clips=["x"])  # the clip filter reads every line
    no_turns = {**json.loads(lines[0]), "conversations": [{"from": "human"}]}
    path.write_text(json.dumps(no_turns) + "\n")
    with pytest.raises(ValueError, match="line 1: missing conversations"):
        JsonlDataset(path, builder).row(0)


def test_changed_config_moves_old_checkpoints_aside_instead_of_resuming(
    tiny_setup, tmp_path, caplog
):
    train_tiny(tiny_setup, tmp_path, max_steps=2)
    shutil.rmtree(tmp_path / "adapter")
    with caplog.at_level(logging.WARNING, logger="robovqa_ft.training.checkpoints"):
        train_tiny(tiny_setup, tmp_path, max_steps=2, stage={"learning_rate": 1e-3})
    checkpoints = tmp_path / "checkpoints"
    (stale,) = checkpoints.glob("stale-*")
    assert (stale / "checkpoint-2" / COMPLETE_MARKER).exists()  # kept whole, not resumed
    assert (stale / FINGERPRINT_FILE).read_text() != (checkpoints / FINGERPRINT_FILE).read_text()
    moved = [r.getMessage() for r in caplog.records if r.name == "robovqa_ft.training.checkpoints"]
    assert moved == [
        f"configuration or data changed since the checkpoints in {checkpoints} were written: "
        f"moved 1 to {stale}, and this run starts from step 0. Delete that folder when you "
        "no longer need it. To resume them instead: stop this run, put back the settings and "
        "data they were written with, delete the checkpoints this run wrote, and move "
        f"everything in that folder back into {checkpoints}"
    ]
    assert [int(r["step"]) for r in csv_rows(tmp_path / "train_metrics.csv")] == [1, 2]


def test_stale_checkpoints_moved_back_with_their_settings_are_resumed(tmp_path):
    prepare_checkpoint_dir(tmp_path, "old")
    (tmp_path / "checkpoint-2").mkdir()
    prepare_checkpoint_dir(tmp_path, "new")
    (stale,) = tmp_path.glob("stale-*")
    for path in stale.iterdir():  # as the warning says: everything back
        path.replace(tmp_path / path.name)
    prepare_checkpoint_dir(tmp_path, "old")
    assert (tmp_path / "checkpoint-2").is_dir() and len(list(tmp_path.glob("stale-*"))) == 1


@pytest.fixture(scope="module")
def adapter(tiny_setup, tmp_path_factory):
    """A LoRA adapter (r 8, alpha 16, as `run_settings`) of the tiny model, untrained."""
    folder = tmp_path_factory.mktemp("adapter")
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    attach_lora(base, 8, 16, 0.0).save_pretrained(folder)
    return folder


def other_model(tiny_setup, folder, **text_config):
    """A model folder of the tiny model's configuration, changed by `text_config`."""
    config = json.loads((tiny_setup["model"] / "config.json").read_text())
    config["text_config"].update(text_config)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def nothing_loads(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train, "load_model", load_model)
    monkeypatch.setattr(evaluate, "load_model", load_model)


@pytest.mark.usefixtures("nothing_loads")
def test_an_adapter_of_another_model_is_refused_before_anything_loads(
    tiny_setup, adapter, tmp_path
):
    other = other_model(tiny_setup, tmp_path / "wider", hidden_size=128)
    refusal = (
        f"adapter {adapter} was trained on {tiny_setup['model']}, but model.name is {other}: "
        f"an adapter fits only its own model. Use one trained on {other}, or set model.name "
        f"to {tiny_setup['model']}; if that is this model in another place, set "
        f"base_model_name_or_path in {adapter / 'adapter_config.json'} to {other}"
    )
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # an earlier attempt's
    with pytest.raises(ValueError) as error:
        train_tiny(tiny_setup, run, init_adapter=adapter, model_settings={"name": str(other)})
    assert str(error.value) == refusal
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]

    outputs = {name: tmp_path / "eval" / f"{name}.json" for name in ("eval", "predictions",
                                                                      "losses")}  # fmt: skip
    with pytest.raises(ValueError) as error:
        evaluate_run(adapter, {"stage1": tiny_setup["stage1_val"]}, tiny_setup["images"],
                     outputs, run_settings(other)["model"], {}, {}, "stage1")  # fmt: skip
    assert str(error.value) == refusal
    assert not (tmp_path / "eval").exists()


def test_an_adapter_of_the_same_model_in_another_folder_is_taken(tiny_setup, adapter, tmp_path):
    check_adapter(adapter, str(tiny_setup["model"]), 8, 16)  # its own, by name
    copy = other_model(tiny_setup, tmp_path / "copy")  # the same configuration
    check_adapter(adapter, copy, 8, 16)
    with pytest.raises(ValueError, match="was trained on"):
        check_adapter(adapter, other_model(tiny_setup, tmp_path / "deeper", num_hidden_layers=3))


@pytest.mark.parametrize("lora", [{"r": 4, "alpha": 8}, {"alpha": 32}])
@pytest.mark.usefixtures("nothing_loads")
def test_an_init_adapter_of_another_lora_rank_is_refused_naming_both(
    tiny_setup, adapter, tmp_path, lora
):
    config = {"r": 8, "alpha": 16, **lora}
    with pytest.raises(ValueError) as error:
        train_tiny(tiny_setup, tmp_path, init_adapter=adapter, lora=lora)
    assert str(error.value) == (
        f"init adapter {adapter} has LoRA r=8, alpha=16, but the config's lora section has "
        f"r={config['r']}, alpha={config['alpha']}: set lora.r and lora.alpha to the "
        "adapter's, or use an adapter trained with the config's"
    )
    assert not list(tmp_path.iterdir())  # no run folder, no checkpoint folder
