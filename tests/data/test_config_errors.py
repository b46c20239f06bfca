"""Config mistakes stop `snakemake` before any job, each in one line (robovqa_ft.core.settings);
values written as strings (1e-4, nested --config) reach the jobs as the schema's types."""

import json
import subprocess
import sys

import pytest
import yaml
from snakemake.cli import parse_config
from snakemake.utils import update_config
from test_workflow import ROOT, snakemake

from robovqa_ft.core.settings import FAMILY_PACKS, FRAMES_AS, LAYOUTS, TINY_FAMILIES, check_config

DEMO = str(ROOT / "config" / "demo.yaml")
SCHEMA = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())

MISTAKES = {  # id: (--config overrides, what the one line must say)
    "scheduler_typo": (["stage1={scheduler: cosin}"], ["stage1.scheduler = 'cosin'", "cosine"]),
    "attention_typo": (
        ["model={attn_implementation: flash_attn_2}"],
        ["model.attn_implementation = 'flash_attn_2'", "flash_attention_2"],
    ),
    "packed_with_qwen": (
        ["model={name: ./qwen}", "training={padding: packed}"],
        ["training.padding = 'packed'", "model.name = './qwen'", "qwen2_5_vl"],
    ),
    # keys one family takes and another does not
    "images_for_internvl": (
        ["model={frames_as: images}"],
        ["model.frames_as = 'images'", "Qwen", "InternVL", "video"],
    ),
    "tile_for_a_tiny_qwen3_vl": (
        ["tiny_model={family: qwen3_vl, image_size: 112}"],
        ["tiny_model.image_size", "InternVL's tile", "frame_size"],
    ),
    "frames_as_typo": (["model={frames_as: movie}"], ["model.frames_as = 'movie'", "video"]),
    "tree_with_flash_attention": (
        ["model={attn_implementation: flash_attention_2}"],
        ["stage1.layout = 'tree'", "flash_attention_2", "sdpa"],
    ),
    "tree_in_stage2": (["stage2={layout: tree}"], ["stage2.layout = 'tree'", "stage1"]),
    "max_frames_above_frames_per_clip": (
        ["stage2={max_frames: 20}"],
        ["stage2.max_frames = 20", "frames_per_clip = 16"],
    ),
    "grad_accum_not_divisible_by_gpus": (
        ["stage1={grad_accum: 16}", "training={gpus: 3}"],
        ["stage1.grad_accum = 16", "training.gpus = 3"],
    ),
    "missing_model_folder": (
        ["model={name: ./no_such_model}"],
        ["model.name = './no_such_model'", "does not exist"],
    ),
    "unknown_key": (
        ["stage1={learning_rat: 1e-4}"],
        ["stage1.learning_rat = '1e-4'", "learning_rate"],
    ),
}


@pytest.mark.parametrize("overrides, said", MISTAKES.values(), ids=MISTAKES.keys())
def test_config_mistake_stops_the_run_before_any_job_in_one_line(tmp_path, overrides, said):
    qwen = tmp_path / "qwen"  # a model folder, found from the working directory
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    result = snakemake(
        "-n", "--configfile", DEMO, "--config", *overrides, workdir=tmp_path, check=False
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and all(part in errors[0] for part in said), result.stderr
    assert len(result.stderr.splitlines()) < 5, result.stderr  # no schema, no config dump
    assert "Building DAG" not in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


# Reads the train rule's params through Snakemake's API, in a process of its own (the API
# changes the working directory): the dict the training job gets.
TRAIN_PARAMS = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from snakemake.api import SnakemakeApi
from snakemake.cli import parse_config
from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

snakefile, workdir, overrides, *configfiles = sys.argv[1:]
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    workflow = api.workflow(
        resource_settings=ResourceSettings(),
        config_settings=ConfigSettings(
            configfiles=[Path(f) for f in configfiles], config=parse_config(json.loads(overrides))
        ),
        snakefile=Path(snakefile),
        workdir=Path(workdir),
    )
    stage = workflow._workflow.get_rule("train").params.stage
    print(json.dumps({run: stage(SimpleNamespace(run=run)) for run in ("stage1", "stage2")}))
"""


def test_learning_rate_1e_4_from_yaml_or_nested_config_reaches_training_as_a_float(tmp_path):
    overrides = ["stage1={learning_rate: 1e-4}"]  # a nested --config value: a string
    yaml_file = tmp_path / "stage2.yaml"
    yaml_file.write_text("stage2:\n  learning_rate: 1e-4\n")  # a string to PyYAML
    assert yaml.safe_load(yaml_file.read_text())["stage2"]["learning_rate"] == "1e-4"
    work = tmp_path / "work"

    planned = snakemake(
        "-n", "--configfile", DEMO, str(yaml_file), "--config", *overrides, workdir=work
    )
    assert "train" in planned.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN_PARAMS,
            str(ROOT / "Snakefile"),
            str(work),
            json.dumps(overrides),
            DEMO,
            str(yaml_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout.splitlines()[-1])
    for run in ("stage1", "stage2"):
        assert type(stages[run]["learning_rate"]) is float and stages[run]["learning_rate"] == 1e-4
        assert stages[run]["grad_accum"] == 1 and stages[run]["scheduler"] == "cosine"


def test_strings_become_the_schema_types_and_defaults_are_filled():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    del config["evaluation"]
    written = [
        "stage1={learning_rate: 4.0e-5, batch_size: 16, epochs: 2, max_seq_len: 1e3}",
        "model={gradient_checkpointing: true, max_memory_gb: null}",
        "demo={frame_size: [64, 48]}",
    ]
    update_config(config, parse_config(written))
    check_config(config, ROOT)
    stage1, model = config["stage1"], config["model"]
    assert stage1["learning_rate"] == 4.0e-5 and isinstance(stage1["learning_rate"], float)
    assert stage1["batch_size"] == 16 and stage1["epochs"] == 2 and stage1["max_seq_len"] == 1000
    assert all(type(stage1[key]) is int for key in ("batch_size", "epochs", "max_seq_len"))
    assert model["gradient_checkpointing"] is True and model["max_memory_gb"] is None
    assert config["demo"]["frame_size"] == [64, 48]
    assert config["evaluation"]["max_new_tokens"] == 64  # a default, filled in
    assert config["evaluation"]["loss_clips"] == 500


# What the code accepts, from the torch side, in a process of its own: tests/data never
# imports torch (TensorFlow and torch have crashed together in one process).
CODE_NAMES = """
import json
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.trainer_utils import SchedulerType
from robovqa_ft.training.families import FAMILIES
from robovqa_ft.training.collate import PADDING

print(json.dumps({
    "scheduler": [s.value for s in SchedulerType],
    "attn_implementation": ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()],
    "padding": list(PADDING),
    "dtype": [n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)],
    "packs": {name: family.packs for name, family in FAMILIES.items()},
    "video": {name: family.takes_video for name, family in FAMILIES.items()},
}))
"""


@pytest.fixture(scope="module")
def code_names() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CODE_NAMES], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    if "ModuleNotFoundError" in result.stderr:
        pytest.skip(f"the training side is not installed: {result.stderr.splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


# The schema's enums of names that the code, not the schema, decides.
SCHEMA_ENUMS = {
    "scheduler": SCHEMA["$defs"]["stage"]["properties"]["scheduler"]["enum"],
    **{
        key: SCHEMA["properties"][section]["properties"][key]["enum"]
        for section, key in [
            ("model", "attn_implementation"),
            ("model", "dtype"),
            ("training", "padding"),
        ]
    },
}


@pytest.mark.parametrize("name", SCHEMA_ENUMS)
def test_schema_offers_only_what_the_code_accepts(code_names, name):
    enum = SCHEMA_ENUMS[name]
    assert set(enum) <= set(code_names[name]), set(enum) - set(code_names[name])
    if name == "padding":
        assert enum == code_names[name]


def test_settings_know_which_model_families_pack(code_names):
    assert code_names["packs"] == FAMILY_PACKS


def test_schema_offers_the_frame_inputs_and_tiny_families_the_code_takes(code_names):
    model, tiny = SCHEMA["properties"]["model"], SCHEMA["properties"]["tiny_model"]
    assert model["properties"]["frames_as"]["enum"] == list(FRAMES_AS)
    assert tiny["properties"]["family"]["enum"] == list(TINY_FAMILIES)
    assert set(TINY_FAMILIES) <= set(code_names["packs"])
    # only InternVL has no video input of the processor's: its video is its own prompt
    assert [name for name, video in code_names["video"].items() if not video] == ["internvl"]


def test_schema_offers_the_stage1_layouts_the_code_takes():
    assert SCHEMA["$defs"]["stage"]["properties"]["layout"]["enum"] == list(LAYOUTS)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert config["stage1"]["layout"] == "tree" and "layout" not in config["stage2"]
