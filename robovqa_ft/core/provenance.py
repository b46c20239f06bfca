"""Where a result came from: the project's commit, the key packages' versions, the GPUs.

Recorded in each training's config.yaml, each eval.json and the merged model's card, so
that a figure can be traced to the code and machine that made it.
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers")
REPOSITORY = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The project's commit, with "-dirty" when tracked files differ from it; "unknown"
    outside a git checkout (an installed wheel)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, check=True,
        timeout=30,
    ).stdout.strip()  # fmt: skip


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def gpus(processes: int = 1) -> dict:
    """The GPU model and how many the job trained or evaluated on ("cpu" without CUDA)."""
    if not torch.cuda.is_available():
        return {"model": "cpu", "count": 0, "processes": processes}
    return {"model": torch.cuda.get_device_name(0), "count": processes, "processes": processes}


def provenance(processes: int = 1, model_revision: str | None = None) -> dict:
    """The record written beside a result. `model_revision`: the hub commit the base
    model was loaded at (None: a local folder)."""
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "gpus": gpus(processes),
        "model_revision": model_revision,
    }
