"""config/qwen3_vl.yaml, laid over config/config.yaml as `snakemake --configfile` lays it
(Snakemake's `update_config`), passes the config check before any job; it names the Qwen3-VL
8B and holds only keys whose values differ from config.yaml's. No torch, no network."""

from __future__ import annotations

import copy
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from snakemake.utils import update_config

from robovqa_ft.core.settings import check_config, model_type

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
QWEN3_VL = yaml.safe_load((ROOT / "config" / "qwen3_vl.yaml").read_text())
# The real Qwen3-VL-8B-Instruct's config.json (byte-identical to the hub's; its README)
QWEN3_VL_FOLDER = ROOT / "tests/training/fixtures/real_processors/Qwen3-VL-8B-Instruct"


def merged(over: dict) -> dict:
    config = copy.deepcopy(BASE)
    update_config(config, copy.deepcopy(over))
    return config


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache without the model, whatever this machine has downloaded."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_the_hub_id_not_downloaded_passes_the_check(empty_hub_cache):
    config = merged(QWEN3_VL)
    assert model_type(config["model"]["name"]) == (None, None)  # the job downloads it
    check_config(config, ROOT)
    assert config["model"]["name"] == "Qwen/Qwen3-VL-8B-Instruct"
    # the recipe's values reach the stages, and config.yaml's others stay
    assert config["lora"] == {"r": 64, "alpha": 128, "dropout": 0.05}
    assert (config["stage1"]["learning_rate"], config["stage2"]["learning_rate"]) == (1e-5, 5e-6)
    assert config["stage1"]["weight_decay"] == config["stage2"]["weight_decay"] == 0.0
    assert (config["stage1"]["max_frames"], config["stage2"]["max_frames"]) == (4, 10)
    assert config["stage1"]["layout"] == "tree" and config["stage1"]["scheduler"] == "cosine"


def test_its_settings_pass_the_checks_made_for_a_qwen3_vl_model():
    # Named by a folder holding the real config.json, the model is known to be qwen3_vl,
    # so the checks that depend on the family (packed padding, say) are made too.
    config = merged(QWEN3_VL)
    config["model"]["name"] = str(QWEN3_VL_FOLDER)
    assert model_type(config["model"]["name"]) == ("qwen3_vl", None)
    check_config(config, ROOT)


def leaves(mapping: dict, prefix: tuple = ()) -> dict[tuple, object]:
    found = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            found |= leaves(value, (*prefix, key))
        else:
            found[(*prefix, key)] = value
    return found


def test_it_holds_only_keys_whose_values_differ_from_config_yaml():
    base = leaves(BASE)
    same = [".".join(key) for key, value in leaves(QWEN3_VL).items() if base.get(key) == value]
    assert not same, f"config/qwen3_vl.yaml repeats config/config.yaml: {same}"
