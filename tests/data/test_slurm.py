"""What profiles/slurm submits, through the SLURM executor plugin's own code: `sbatch`,
`srun` and the accounting commands are stand-ins (tests/data/slurm_standins/) that record
their arguments and run each job on this machine, in the background."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robovqa_ft.core.settings import BOOKKEEPING

pytestmark = pytest.mark.slow  # the DAG through sbatch and srun stand-ins

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
PROFILE = str(ROOT / "profiles" / "slurm")
STANDINS = Path(__file__).parent / "slurm_standins"
TRAIN = "results/stage1/adapter"
# config/demo.yaml, smaller: two optimizer steps of two processes (grad_accum 2 is
# divisible by the GPU count: each process accumulates one micro-batch).
TINY = {
    "demo": {"clips": 24, "shards_per_split": 1, "frame_size": [64, 48], "bad_records": 0},
    "frame_size": 32,
    "training": {"max_steps": 2, "eval_steps": 100, "save_steps": 100, "logging_steps": 1,
                 "dataloader_workers": 0, "gpus": 2},
    "stage1": {"batch_size": 4, "grad_accum": 2},  # a step holds a whole clip (tree layout)
    "stage2": {"grad_accum": 2},  # 2 GPUs must divide it, checked before any job
}  # fmt: skip


def snakemake(*args: str, workdir: Path, env: dict, timeout: float) -> str:
    """Run snakemake to the end and return its output; fails the test past `timeout`,
    after SIGTERM (which lets it cancel its SLURM jobs) and then SIGKILL."""
    command = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir)]
    process = subprocess.Popen(
        [*command, *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"snakemake ran past {timeout} s:\n{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    return output


class Cluster:
    """A login node's environment whose SLURM commands are the stand-ins, and their
    records: the jobs sbatch was given, the job steps srun ran."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env

    def jobs(self, comment: str) -> list[dict]:
        """Every submission of one job; the plugin comments each `rule_<rule>[_wildcards_..]`."""
        records = sorted((self.folder / "jobs").glob("*.json"))
        return [job for p in records if (job := json.loads(p.read_text()))["comment"] == comment]

    def steps(self, job: dict) -> list[list[str]]:
        """The argv of each `srun` inside `job`."""
        calls = map(json.loads, (self.folder / "calls.jsonl").read_text().splitlines())
        return [c["argv"] for c in calls if c["command"] == "srun" and c["job_id"] == job["id"]]

    def output(self, job: dict) -> str:
        """The job's --output file: the jobstep's log, where a failure shows."""
        return Path(job["output"]).read_text(errors="replace")[-6000:]

    def cancel_unfinished(self) -> None:
        running = [
            job["id"]
            for p in (self.folder / "jobs").glob("*.json")
            if (job := json.loads(p.read_text()))["state"] in ("PENDING", "RUNNING")
        ]
        if running:
            subprocess.run([STANDINS / "scancel", *running], env=self.env, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    env = {
        name: value
        for name, value in os.environ.items()
        # Nothing of a real job or scheduler around this test run, nor another profile.
        if not name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SNAKEMAKE_", "ACCELERATE_"))
        and name != "CUDA_VISIBLE_DEVICES"
    }
    env.update(
        # The stand-ins run under the first python3 on PATH: this one's, not a shim's.
        PATH=os.pathsep.join([str(STANDINS), str(Path(sys.executable).parent), env["PATH"]]),
        STANDIN_SLURM_DIR=str(folder / "slurm"),
        HF_HUB_OFFLINE="1",
        SBATCH_ACCOUNT="test",  # the stand-ins' account and partition; the profile reads them
        SBATCH_PARTITION="test",
        # The stand-in gives a job GPUs 0..N-1, which devices.py locks per node: a folder
        # of this test's own keeps parallel test runs apart.
        ROBOVQA_GPU_LOCK_DIR=str(folder / "gpu-locks"),
    )
    standins = Cluster(folder / "slurm", env)
    yield standins
    standins.cancel_unfinished()  # the jobs of a run that failed or timed out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cluster) -> dict:
    """Stage 1 trained through profiles/slurm, on 2 processes: the working directory,
    its config files and snakemake's output."""
    root = tmp_path_factory.mktemp("trained")
    work = root / "work"
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    configs = ("--configfile", str(ROOT / "config" / "demo.yaml"), str(config))
    # The frames and JSONL here, with the local executor: through the stand-ins they would
    # only add the plugin's status polling (its interval grows by 10 s a check).
    snakemake("--cores", "2", "results/data/metadata.json", *configs, workdir=work,
              env=cluster.env, timeout=240)  # fmt: skip
    # The GPU count comes from the config: `--set-resources train:gpu=2` on the command
    # line would replace the profile's whole set-resources (see the test below).
    output = snakemake(
        "--workflow-profile", PROFILE, TRAIN, *configs,
        "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks",
        "1", "--slurm-keep-successful-logs", workdir=work, env=cluster.env, timeout=360,
    )  # fmt: skip
    return {"work": work, "root": root, "configs": configs, "output": output}


def test_train_job_asks_sbatch_and_srun_for_its_gpus_and_gets_the_sigterm_warning(trained, cluster):
    work, output = trained["work"], trained["output"]
    jobs = cluster.jobs("rule_train_wildcards_stage1")
    assert len(jobs) == 1, f"submitted {len(jobs)} times:\n{output[-6000:]}"
    (train,) = jobs
    log = cluster.output(train)
    assert train["state"] == "COMPLETED", log
    sbatch = train["argv"]
    assert "--gpus=2" in sbatch, shlex.join(sbatch)
    assert "--signal=TERM@300" in sbatch and "--requeue" in sbatch, shlex.join(sbatch)
    assert sbatch[sbatch.index("-t") + 1] == "4320", shlex.join(sbatch)  # the profile's 3 days
    (step,) = cluster.steps(train)  # one attempt, the job step that ran the training
    assert "--gpus=2" in step, shlex.join(step)
    assert step[step.index("-m") + 1] == "snakemake", shlex.join(step)

    launcher = (work / "logs" / "train" / "stage1.log").read_text()
    assert "Launching 2 training processes with torchrun" in launcher, log
    assert "Training with 2 processes" in (work / "results/stage1/training.log").read_text()
    assert (work / TRAIN / "adapter_model.safetensors").is_file()

    # A CPU-only job holds no GPU, in its allocation or in its step.
    (tiny,) = cluster.jobs("rule_build_tiny_model")
    (tiny_step,) = cluster.steps(tiny)
    assert not [a for a in tiny["argv"] + tiny_step if a.startswith(("--gpus", "--gres"))]


def test_changing_bookkeeping_settings_after_a_run_plans_nothing(trained, cluster):
    # Every training and evaluation key of settings.BOOKKEEPING, the GPU count among
    # them: the run trained on 2 processes, and its evaluation, are done whatever count,
    # cadence, timeout, batch of prompts or number of workers comes next.
    evaluated = "results/stage1/eval.json"
    snakemake("--cores", "2", evaluated, *trained["configs"], workdir=trained["work"],
              env=cluster.env, timeout=300)  # fmt: skip
    changed = trained["root"] / "bookkeeping.yaml"
    changed.write_text(yaml.safe_dump({"training": {
        "gpus": 1, "hang_timeout_minutes": 7, "stop_grace_seconds": 60, "logging_steps": 3,
        "eval_steps": 7, "eval_clips": 5, "save_steps": 9, "save_every_minutes": 5,
        "save_total_limit": 4, "dataloader_workers": 1, "report_to": []},
        "evaluation": {"generation_batch_size": 3, "dataloader_workers": 2}}))  # fmt: skip
    for section in ("training", "evaluation"):
        assert set(yaml.safe_load(changed.read_text())[section]) == BOOKKEEPING[section]
    output = snakemake("-n", TRAIN, evaluated, *trained["configs"], str(changed),
                       workdir=trained["work"], env=cluster.env, timeout=120)  # fmt: skip
    assert "Nothing to be done" in output, output[-3000:]


def test_a_training_given_fewer_gpus_than_it_asks_stops_naming_the_flag(trained, cluster):
    # The default profile declares gpu=1, which Snakemake silently caps train's 2 at.
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory",
         str(trained["work"]), "--cores", "2", "--force", TRAIN,
         *trained["configs"]],
        cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "asks for 2 GPUs but Snakemake gave it 1" in output, output[-3000:]
    assert "pass --resources gpu=2" in output
    log = (trained["work"] / "logs" / "train" / "stage1.log").read_text()
    assert "asks for 2 GPUs" in log, output[-3000:]
    assert "Launching" not in log[log.rindex("asks for 2 GPUs") :]  # stopped before any launch


def dry_run_train_resources(*args: str, workdir: Path) -> dict[str, str]:
    """The train job's resources as `snakemake -n` with profiles/slurm lists them."""
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
         "-n", "--workflow-profile", PROFILE, TRAIN, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("rule train:", 1)[1]
    line = next(x for x in job.splitlines() if x.strip().startswith("resources:"))
    pairs = (item.partition("=") for item in line.split(":", 1)[1].strip().split(", "))
    return {name: value for name, _, value in pairs}


def test_gpu_count_is_set_in_the_config_because_set_resources_replaces_the_profiles(
    tmp_path,
):
    config = tmp_path / "gpus.yaml"
    config.write_text(yaml.safe_dump({"training": {"gpus": 8}}))
    from_config = dry_run_train_resources("--configfile", str(config), workdir=tmp_path)
    assert from_config["gpu"] == "8"
    assert from_config["runtime"] == "4320" and "slurm_extra" in from_config

    # Snakemake's rule for profiles: a command-line option replaces the profile's whole
    # entry. The README tells users so; if this changes, so can the README.
    from_cli = dry_run_train_resources("--set-resources", "train:gpu=8", workdir=tmp_path)
    assert from_cli["gpu"] == "8"
    assert from_cli["runtime"] == "60" and "slurm_extra" not in from_cli
