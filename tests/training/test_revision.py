"""`model.revision` reaches every `from_pretrained`, and the commit a job resolves is in
the training fingerprint and the provenance of config.yaml and eval.json.

The tiny model is served as a hub id from a Hugging Face cache made here (offline, as on
a machine that downloaded it before): two commits, the default branch at the second,
which holds nothing but a config.json, so that any load that ignored the revision would
fail.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from training_helpers import run_settings

from robovqa_ft.core.provenance import provenance
from robovqa_ft.training.model import resolved_revision

REPO = "test-org/tiny-internvl"
OLD, NEW = "a" * 40, "b" * 40


def hub_cache(cache: Path, model: Path, main: str, complete: tuple[str, ...]) -> Path:
    """A cache holding `model` as REPO at OLD and NEW (only those in `complete` whole),
    its default branch at `main`."""
    folder = cache / f"models--{REPO.replace('/', '--')}"
    for commit in (OLD, NEW):
        snapshot = folder / "snapshots" / commit
        if commit in complete:
            shutil.copytree(model, snapshot)
        else:
            snapshot.mkdir(parents=True)
            shutil.copy(model / "config.json", snapshot / "config.json")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(main)
    return cache


SCRIPT = """
import json, sys
from pathlib import Path
from training_helpers import run_settings
from robovqa_ft.training.train import train_run
from robovqa_ft.evaluation.evaluate import evaluate_run
args = json.loads(sys.argv[1])
setup, out = args["setup"], Path(args["out"])
settings = run_settings(args["repo"], model_settings={"revision": args["revision"]}.items(),
                        max_steps=2, save_steps=1)
train_run(train_jsonl=setup["stage1_train"], val_jsonl=setup["stage1_val"],
          images_dir=setup["images"], adapter_dir=out / "adapter", run_dir=out,
          checkpoint_dir=out / "checkpoints", **settings)
if args["evaluate"]:
    evaluate_run(adapter_dir=out / "adapter", images_dir=setup["images"],
                 val_jsonl={"stage1": setup["stage1_val"], "stage2": setup["stage2_val"]},
                 outputs={"eval": out / "eval.json", "predictions": out / "predictions.jsonl",
                          "losses": out / "val_losses.jsonl"},
                 model=settings["model"], stages={"stage1": settings["stage"],
                                                  "stage2": settings["stage"]},
                 evaluation={"seed": 0, "batch_size": 4, "generation_batch_size": 4,
                             "dataloader_workers": 0, "loss_clips": 2,
                             "answers_per_family": 1, "max_new_tokens": 2},
                 run="stage1")
"""


def run(setup, out: Path, cache: Path, revision, evaluate=False) -> str:
    args = {"setup": {k: str(v) for k, v in setup.items()}, "out": str(out), "repo": REPO,
            "revision": revision, "evaluate": evaluate}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
        timeout=300, cwd=Path(__file__).parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
             "PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return (out / "training.log").read_text()


def test_a_pinned_revision_reaches_every_load_and_is_recorded(tiny_setup, tmp_path):
    cache = hub_cache(tmp_path / "hub", tiny_setup["model"], main=NEW, complete=(OLD,))
    out = tmp_path / "run"
    log = run(tiny_setup, out, cache, revision=OLD, evaluate=True)  # the branch's NEW would fail
    assert f"base model {REPO} at revision {OLD}" in log
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["model_revision"] == OLD and recorded["model"]["revision"] == OLD
    assert recorded["provenance"]["model_revision"] == OLD
    assert set(recorded["provenance"]) == {"git_commit", "packages", "gpus", "model_revision"}
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["provenance"]["model_revision"] == OLD


@pytest.mark.slow
def test_a_moved_default_branch_is_another_base_and_sets_old_checkpoints_aside(
    tiny_setup, tmp_path
):
    cache = hub_cache(tmp_path / "hub", tiny_setup["model"], main=OLD, complete=(OLD, NEW))
    out = tmp_path / "run"
    assert f"at revision {OLD}" in run(tiny_setup, out, cache, revision=None)
    assert yaml.safe_load((out / "config.yaml").read_text())["model_revision"] == OLD
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text(NEW)
    shutil.rmtree(out / "adapter")  # as if the run had died before its end
    log = run(tiny_setup, out, cache, revision=None)
    assert f"at revision {NEW}" in log
    assert "configuration or data changed since the checkpoints" in log
    assert "Starting from step 0" in log.split(f"at revision {NEW}")[1]
    assert list((out / "checkpoints").glob("stale-*/checkpoint-2"))


def test_a_folder_has_no_revision_and_an_unknown_hub_id_offline_is_a_clear_error(
    tiny_setup, tmp_path, monkeypatch
):
    assert resolved_revision(tiny_setup["model"], None) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        resolved_revision("test-org/not-downloaded", "v1")
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("an unknown model resolved to a revision")
    assert "test-org/not-downloaded at revision v1" in message
    assert "hf download test-org/not-downloaded --revision v1" in message


def test_provenance_names_the_commit_the_packages_and_the_machine():
    record = provenance(2, OLD)
    assert record["git_commit"] == "unknown" or len(record["git_commit"].split("-")[0]) == 40
    assert {"python", "torch", "transformers", "peft"} <= set(record["packages"])
    assert record["gpus"]["processes"] == 2 and record["model_revision"] == OLD


def test_run_settings_pass_the_revision_through():  # the helper the script above relies on
    assert run_settings(REPO, model_settings={"revision": OLD}.items())["model"]["revision"] == OLD
