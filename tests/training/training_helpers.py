"""Settings for fast CPU training runs in tests, and what the tests read of a run."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from robovqa_ft.training.train import train_run


def adapter_weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def csv_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"trainer ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def run_settings(model: Path, model_settings=(), stage=(), lora=(), **training) -> dict:
    """Keyword arguments of `train_run` for a few fast CPU steps; overrides per section."""
    return {
        "model": {"name": str(model), "quantization": "none", "dtype": "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": False,
                  **dict(model_settings)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, **dict(lora)},
        "stage": {"batch_size": 4, "grad_accum": 2, "learning_rate": 2e-3, "epochs": 1,
                  "warmup_ratio": 0.25, "scheduler": "cosine", "max_grad_norm": 1.0,
                  "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.01,
                  "max_frames": 4, "max_seq_len": 512, **dict(stage)},
        "training": {"max_steps": 10, "logging_steps": 1, "eval_steps": 5, "eval_clips": 2,
                     "save_steps": 2, "save_total_limit": 3, "seed": 0, "dataloader_workers": 0,
                     "save_every_minutes": 60, "padding": "longest", "gpus": 1,
                     "hang_timeout_minutes": 5, "stop_grace_seconds": 60, **training},
    }  # fmt: skip


def train_tiny(setup: dict, out: Path, data="stage1", init_adapter=None, **settings) -> Path:
    """Train the tiny model on `data` ("stage1" or "stage2") into `out`; returns the adapter."""
    return train_run(
        train_jsonl=setup[f"{data}_train"],
        val_jsonl=setup[f"{data}_val"],
        images_dir=setup["images"],
        adapter_dir=out / "adapter",
        run_dir=out,
        checkpoint_dir=out / "checkpoints",
        init_adapter=init_adapter,
        **run_settings(setup["model"], **settings),
    )


def with_unfit_rows(source: Path, out: Path, every: int) -> Path:
    """`source` with the question of every `every`-th row made far longer than any
    `max_seq_len` a test uses, so that no answer of it fits."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % every == 0:
            row["conversations"][0]["value"] += " and the cup" * 400
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out
