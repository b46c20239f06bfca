"""Run the same command again: after a complete run nothing is planned, after a kill
only what did not finish runs, and a bookkeeping key changes no finished output.

The whole DAG (download, frames, JSONL, tiny model, three trainings, four evaluations,
the report) runs once on tests/data/configs/small.yaml, killed after its first training
and run again to its end (about a minute and a half): the kill test and the tests of a
complete run share it, and `make check` runs it as its end-to-end smoke.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from robovqa_ft.core.settings import BOOKKEEPING, READS, TOP_LEVEL

ROOT = Path(__file__).resolve().parents[2]
DATA = "results/data/metadata.json"  # the data half of the DAG
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
CONFIGS = ("--configfile", str(ROOT / "config" / "demo.yaml"),
           str(ROOT / "tests" / "data" / "configs" / "small.yaml"))  # fmt: skip
# A new value for every key of settings.BOOKKEEPING (the test checks it is every one).
CHANGED = {
    TOP_LEVEL: {"download_workers": 3},
    "training": {"logging_steps": 3, "eval_steps": 7, "eval_clips": 5, "save_steps": 9,
                 "save_every_minutes": 5, "save_total_limit": 4, "dataloader_workers": 1,
                 "gpus": 2, "hang_timeout_minutes": 7, "stop_grace_seconds": 60,
                 "report_to": []},
    "model": {"max_memory_gb": 20, "attn_implementation": "eager",
              "gradient_checkpointing": True},
    "evaluation": {"generation_batch_size": 3, "dataloader_workers": 1},
}  # fmt: skip


def snakemake(*args: str, workdir: Path, extra: tuple[str, ...] = (), env=None) -> str:
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
         *args, *CONFIGS, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def planned(output: str) -> dict[str, int]:
    """The dry run's job counts by rule, from its "Job stats" table."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    return {rule: int(count) for rule, count in (line.split() for line in table)}


@dataclass
class Interrupted:
    """A run of the whole DAG killed once a training finished, then run to its end."""

    work: Path
    trained: int  # trainings finished before the kill
    planned: dict[str, int]  # what a dry run then planned
    rerun: str  # the rerun's output


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Interrupted:
    """The end-to-end smoke of the DAG at its smallest (tests/data/configs/small.yaml),
    killed and rerun on the way: one whole run serves the kill test and every test of a
    complete run."""
    work = tmp_path_factory.mktemp("complete") / "work"
    log = work.parent / "snakemake.log"
    command = [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
               "--cores", "2", *CONFIGS]  # fmt: skip
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, cwd=ROOT, start_new_session=True, stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while "(Rule: train)" not in log.read_text():  # the data half and one training done
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # snakemake and every job it started
    process.wait()
    trained = log.read_text().count("(Rule: train)")
    # Killed, snakemake could not remove its lock: it says so, and --unlock removes it
    # (a SIGTERM or Ctrl-C removes it itself). The README says the same.
    snakemake("--unlock", workdir=work)
    jobs = planned(snakemake("-n", workdir=work))
    return Interrupted(work, trained, jobs, snakemake("--cores", "2", workdir=work))


@pytest.fixture(scope="module")
def complete(interrupted) -> Path:
    return interrupted.work


def test_a_complete_run_plans_nothing(complete):
    assert "Nothing to be done" in snakemake("-n", workdir=complete)


def test_changing_every_bookkeeping_key_after_a_complete_run_plans_nothing(complete, tmp_path):
    assert {s: set(keys) for s, keys in CHANGED.items()} == BOOKKEEPING
    changed = _as_config(CHANGED)
    path = tmp_path / "bookkeeping.yaml"
    path.write_text(yaml.safe_dump(changed))
    output = snakemake("-n", workdir=complete, extra=(str(path),))
    assert "Nothing to be done" in output, output[-3000:]


def _as_config(by_section: dict) -> dict:
    config = dict(by_section[TOP_LEVEL])
    config.update({section: keys for section, keys in by_section.items() if section})
    return config


@pytest.mark.parametrize(
    "change, redone",
    [
        # frames made otherwise: every job after the download
        ({"jpeg_quality": 80}, {"extract_frames", "build_jsonl", "train", "evaluate"}),
        # a stage-2 hyperparameter: the two stage-2 runs, their evaluations, the report
        ({"stage2": {"learning_rate": 5.0e-4}}, {"train", "evaluate", "ablation_report"}),
        ({"evaluation": {"answers_per_family": 3}}, {"evaluate", "ablation_report"}),
    ],
)
def test_a_shaping_key_replans_what_it_shapes(complete, tmp_path, change, redone):
    path = tmp_path / "shaping.yaml"
    path.write_text(yaml.safe_dump(change))
    jobs = planned(snakemake("-n", workdir=complete, extra=(str(path),)))
    assert redone <= set(jobs), jobs
    if "jpeg_quality" not in change:
        assert not {"download", "extract_frames", "build_jsonl"} & set(jobs), jobs
    if "stage2" in change:
        assert jobs["train"] == 2 and jobs["evaluate"] == 2, jobs  # stage1 and base kept


def test_every_config_key_is_bookkeeping_or_read_by_a_job():
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    read = {name for names in READS.values() for name in names}
    for key in schema["properties"]:
        if key in read:
            continue  # a whole section, or a top-level key, that a job reads
        assert key in BOOKKEEPING[TOP_LEVEL], f"{key} is read by no job: classify it"
    for section, keys in BOOKKEEPING.items():
        names = keys if section == TOP_LEVEL else [section]
        assert set(names) <= read, f"bookkeeping {section} {keys} is read by no job"


def test_after_a_kill_only_what_did_not_finish_runs_again(interrupted):
    jobs = interrupted.planned
    finished = {"download", "extract_frames", "build_jsonl", "build_tiny_model"}
    assert jobs and not finished & set(jobs), jobs
    assert jobs.get("train", 0) == 3 - interrupted.trained, jobs  # not trained again
    assert "rule build_jsonl:" not in interrupted.rerun
    assert "rule extract_frames:" not in interrupted.rerun
    assert "rule train:" in interrupted.rerun  # the rerun did finish the rest


@pytest.mark.slow
def test_a_gcs_source_run_through_an_emulator_plans_nothing_after_it_completes(tmp_path):
    from test_gcs_emulator import Emulator

    from robovqa_ft.data.demo_bucket import generate_demo_bucket

    bucket = tmp_path / "bucket"
    generate_demo_bucket(bucket, clips=12, shards_per_split=2, frame_size=(64, 48), bad_records=0)
    gcs = Emulator("gdm-robovqa")
    try:
        for shard in sorted(bucket.glob("*/*")):
            gcs.bucket.blob(f"tfrecord/{shard.parent.name}/{shard.name}").upload_from_filename(
                str(shard)
            )
        work = tmp_path / "work"
        source = ("--config", "source=gs://gdm-robovqa/tfrecord")
        env = {"STORAGE_EMULATOR_HOST": gcs.endpoint}
        first = snakemake("--cores", "2", DATA, *source, workdir=work, env=env)
        assert "Finished jobid" in first and (work / "results" / "bucket").is_dir()
        requests = len(gcs.relay.requests)
        # planned offline: no listing, nothing to do, no request made
        assert "Nothing to be done" in snakemake("-n", DATA, *source, workdir=work, env=env)
        assert "Nothing to be done" in snakemake("--cores", "2", DATA, *source, workdir=work,
                                                 env=env)  # fmt: skip
        assert len(gcs.relay.requests) == requests
        # asked for, the listing is redone and fetches nothing already complete
        again = snakemake("--cores", "2", DATA, *source, "--forcerun", "download", workdir=work,
                          env=env)  # fmt: skip
        assert "rule extract_frames:" not in again
        assert not [r for r in gcs.relay.requests[requests:] if "alt=media" in r.line]
    finally:
        gcs.stop()
