"""The merge rule in the DAG (rules/merge.smk), by dry runs: planned only when asked for, a
CPU job, and its memory counted from the base's weights. Neither torch nor TensorFlow."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
PARAMETERS = 1000 * 1500  # of the stand-in base below
RUNTIME_MB = 1500  # rules/merge.smk's MERGE_RUNTIME_MB


def dry_run(*args: str, workdir: Path, env: dict | None = None, check: bool = True):
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
         "-n", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip
    if check:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def planned(output: str) -> dict[str, int]:
    """The dry run's job counts by rule, from its "Job stats" table."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    return {rule: int(count) for rule, count in (line.split() for line in table)}


def merge_resources(output: str) -> str:
    """The `resources:` line of the dry run's merge job."""
    job = output.split("rule merge:", 1)[1].split("\n\n", 1)[0]
    return next(line for line in job.splitlines() if line.strip().startswith("resources:"))


def write_base(folder: Path) -> Path:
    """A stand-in base: an InternVL config.json and one float32 safetensors weight file of
    PARAMETERS values (only its header is read)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1500],
                               "data_offsets": [0, 4 * PARAMETERS]}}).encode()  # fmt: skip
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 4 * PARAMETERS)
    return folder


def test_a_merge_is_planned_when_asked_for_and_never_by_the_default_target(tmp_path):
    asked = dry_run("results/stage2/merged", workdir=tmp_path).stdout
    # the curriculum's two trainings, its evaluation (the card's figures), then the merge
    assert {k: planned(asked)[k] for k in ("train", "evaluate", "merge")} == {
        "train": 2, "evaluate": 1, "merge": 1
    }  # fmt: skip
    assert "wildcards: run=stage2" in asked.split("rule merge:", 1)[1]
    resources = merge_resources(asked)
    assert "gpu" not in resources  # a CPU job
    assert "mem_mb=<TBD>" in resources  # counted once the adapter, and so the base, exist
    assert "merge" not in planned(dry_run(workdir=tmp_path).stdout)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("dtype, weight_bytes", [("float32", 4), ("bfloat16", 2)])
def test_merge_memory_is_twice_the_weights_in_the_model_dtype_plus_the_runtime(
    tmp_path, dtype, weight_bytes
):
    base = write_base(tmp_path / "base")
    work = tmp_path / "work"
    (work / "results" / "stage1" / "adapter").mkdir(parents=True)  # trained: the base is here
    model = f"model={{name: {base}, dtype: {dtype}, quantization: none}}"
    output = dry_run("results/stage1/merged", "--config", model, workdir=work).stdout
    expected = 2 * PARAMETERS * weight_bytes // 10**6 + RUNTIME_MB
    assert f"mem_mb={expected}," in merge_resources(output)


def test_merge_memory_of_a_hub_model_is_read_from_the_local_cache(tmp_path):
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-vl"
    write_base(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    work = tmp_path / "work"
    (work / "results" / "stage1" / "adapter").mkdir(parents=True)
    env = {"HF_HUB_CACHE": str(cache)}
    model = "model={name: acme/tiny-vl, dtype: bfloat16}"
    output = dry_run("results/stage1/merged", "--config", model, workdir=work, env=env).stdout
    assert f"mem_mb={2 * PARAMETERS * 2 // 10**6 + RUNTIME_MB}," in merge_resources(output)

    # not in the cache: the plan stops, saying what to download or set
    gone = dry_run("results/stage1/merged", "--config", "model={name: acme/other-vl}",
                   workdir=work, env=env, check=False)  # fmt: skip
    assert gone.returncode != 0
    assert "hf download acme/other-vl --revision main" in gone.stdout + gone.stderr
    assert "--set-resources merge:mem_mb=" in gone.stdout + gone.stderr


def test_the_workflow_plans_the_merge_without_loading_torch():
    # rules/merge.smk imports robovqa_ft.tools.merge into every snakemake process
    heavy = ("torch", "transformers", "peft", "matplotlib")
    code = f"import sys, robovqa_ft.tools.merge; print([m for m in {heavy} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)  # fmt: skip
    assert result.stdout.strip() == "[]"
