"""The workflow's runs, written once: which are trained on which stages' data, the answer
formats, and the files a training leaves in `results/<run>/` that the tools read.

The rules (`rules/common.smk`), the training, the evaluation, the report, the merge and
`robovqa-status` all take them from here.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE = "base"  # evaluated, never trained
# Each trained run and the stages whose data it was trained on, in order: the curriculum
# (stage 1, then stage 2 from its adapter), stage 1 alone, and the stage-2-only ablation.
CURRICULUM = {"stage1": ("stage1",), "stage2": ("stage1", "stage2"), "stage2_only": ("stage2",)}
TRAINED = tuple(CURRICULUM)  # ("stage1", "stage2", "stage2_only")
RUNS = (BASE, *TRAINED)  # every run that is evaluated
# The answer formats, in stage order, each as its stage trains: stage 1's frames and one
# question; stage 2's frames and the clip's conversation (earlier questions, answered).
FORMATS = ("stage1", "stage2")

HEARTBEAT = "heartbeat.json"  # results/<run>/heartbeat.json, from rank 0 (training.curves)
EVENTS_DIR = "tensorboard"  # results/<run>/tensorboard/: the run's TensorBoard events
PROGRESS_FILE = "eval_progress.jsonl"  # results/<run>/: an unfinished evaluation's journal


def run_stage(run: str) -> str:
    """The stage whose data and hyperparameters `run` trains on: its last one."""
    return CURRICULUM[run][-1]


def trained_formats(run: str) -> list[str]:
    """The answer formats `run` was trained on (none for the base model)."""
    return list(CURRICULUM.get(run, ()))


def read_heartbeat(run_dir: Path | str) -> dict | None:
    """The run's heartbeat, or None if it has none (written atomically: never half)."""
    try:
        return json.loads((Path(run_dir) / HEARTBEAT).read_text())
    except (OSError, ValueError):
        return None
