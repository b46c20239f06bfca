"""The Qwen3-VL demo (config/demo_qwen3_vl.yaml over config/demo.yaml) runs the whole DAG,
at its smallest (tests/data/configs/small.yaml): a tiny Qwen3-VL built and loaded through
`from_pretrained`, its frames as one video with their times, three trainings, four
evaluations, the report, the merged model with its card, and `robovqa-ask` on a clip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config
from test_workflow import ROOT, snakemake

ASK = str(Path(sys.executable).parent / "robovqa-ask")

CONFIGS = [str(ROOT / "config" / "demo.yaml"), str(ROOT / "tests/data/configs/small.yaml"),
           str(ROOT / "config" / "demo_qwen3_vl.yaml")]  # fmt: skip


@pytest.mark.slow
def test_the_qwen3_vl_demo_runs_the_whole_dag_with_its_frames_as_a_video(tmp_path):
    snakemake("--cores", "2", "ablation_report", "results/stage2/merged", "--configfile", *CONFIGS,
              workdir=tmp_path)  # fmt: skip
    results = tmp_path / "results"
    model = json.loads((results / "models" / "tiny" / "config.json").read_text())
    assert model["model_type"] == "qwen3_vl" and model["architectures"] == [
        "Qwen3VLForConditionalGeneration"
    ]
    metadata = json.loads((results / "data" / "metadata.json").read_text())
    assert metadata["frames"]["rate"] == 2.0 and metadata["frames"]["size"] == [128, 128]
    for run in ("stage1", "stage2", "stage2_only"):
        settings = yaml.safe_load((results / run / "config.yaml").read_text())
        assert settings["model"]["frames_as"] == "video", run
        assert settings["model"]["frame_rate"] == 2.0, run
    for run in ("base", "stage1", "stage2", "stage2_only"):
        evaluation = json.loads((results / run / "eval.json").read_text())
        assert evaluation["loss"]["stage1_val"]["loss"] > 0, run
    report = (results / "ablation" / "report.md").read_text()
    assert "model: tiny (qwen3_vl)" in report and "frames as video" in report
    merged = results / "stage2" / "merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen3_vl"
    card = (merged / "README.md").read_text()
    assert "for Qwen-VL one video" in card and "fps 2.0" in card
    # robovqa-ask gives a run's frames as its training did (its config.yaml: a video)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for path in CONFIGS:
        update_config(config, yaml.safe_load(Path(path).read_text()))
    (tmp_path / "ask.yaml").write_text(yaml.safe_dump(config))
    clip = sorted((results / "data" / "images").iterdir())[0]
    asked = subprocess.run(
        [ASK, "--frames", str(clip), "--question", "put the cup Q: satisfied?",
         "--configfile", str(tmp_path / "ask.yaml"), str(results / "stage2")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    # a model two steps trained may well answer with nothing: that it answered is the test
    assert asked.returncode == 0 and "1 questions about 1 clips" in asked.stderr, asked.stderr
    assert "1/1" in asked.stderr.splitlines()[-1], asked.stderr
