"""SIGKILL the whole workflow at seeded events of every stage, restart it as the README
says (`snakemake --unlock`, then the same command), and end with the outputs of an
uninterrupted run.

The stages: the download (from a GCS emulator), frame extraction, JSONL writing, the
tiny model's build, each training while stepping and while saving (every training on
one process, stage 1 again on two), evaluation and the report. A kill point is the k-th
event of a stage (inject/sitecustomize.py: a file opened for writing, a rename into
place, a folder made, under results/); the seed draws them from an uninterrupted run's
event counts; one job runs at a time, so that a plan replays exactly, and a failure
prints the command that replays it (FAULT_PLAN=...).

`make faults` runs it at any size: FAULT_KILLS=100 FAULT_SEED=3 make faults. `make test`
runs FAULT_KILLS=20, FAULT_SEED=0.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # kills a running workflow, again and again

ROOT = Path(__file__).resolve().parents[3]
INJECT = Path(__file__).resolve().parent / "inject"
sys.path.insert(0, str(ROOT / "tests" / "data"))  # the GCS emulator of the download tests
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
CONFIGS = (
    "--configfile",
    str(ROOT / "config" / "demo.yaml"),
    str(ROOT / "tests" / "data" / "configs" / "small.yaml"),
    str(Path(__file__).resolve().parent / "faults.yaml"),
)
KILLS = int(os.environ.get("FAULT_KILLS", "20"))
SEED = int(os.environ.get("FAULT_SEED", "0"))
RUNS = ("stage1", "stage2", "stage2_only")
ONE_PROCESS = (
    "download",
    "frames",
    "jsonl",
    "model",
    *(f"{run} {doing}" for run in RUNS for doing in ("stepping", "saving")),
    "evaluation",
    "report",
)
TWO_PROCESSES = ("stage1 stepping", "stage1 saving")
# Resumed and uninterrupted trainings agree to ~1e-7 (tests/training/test_train.py; here
# they were equal).
TOLERANCE = 1e-6
LOOSE_FIELDS = {"wall_seconds", "resumed_records"}  # eval.json: how long, not what


def kill_plan(
    counts: dict[str, int], stages: tuple[str, ...], kills: int, rng: random.Random
) -> list[tuple[str, int]]:
    """`kills` kill points, every stage first, then at random; each stage's at distinct
    events among the `counts` an uninterrupted run made."""
    missing = [stage for stage in stages if not counts.get(stage)]
    assert not missing, f"stages with no event in the uninterrupted run: {missing}"
    wanted = dict.fromkeys(stages if kills >= len(stages) else rng.sample(stages, kills), 1)
    for _ in range(kills - sum(wanted.values())):
        wanted[rng.choice(stages)] += 1
    return [
        (stage, k)
        for stage, n in wanted.items()
        for k in sorted(rng.sample(range(1, counts[stage] + 1), min(n, counts[stage])))
    ]


def planned(counts: dict[str, int], stages: tuple[str, ...], kills: int, seed: int):
    """The seeded plan, or the one FAULT_PLAN replays."""
    if os.environ.get("FAULT_PLAN"):
        points = os.environ["FAULT_PLAN"].split(";")
        return [(stage, int(k)) for stage, k in (point.rsplit("=", 1) for point in points)]
    return kill_plan(counts, stages, kills, random.Random(seed))


def replay_line(plan: list[tuple[str, int]], test: str) -> str:
    points = ";".join(f"{stage}={k}" for stage, k in plan)
    return f"FAULT_PLAN={points!r} .venv/bin/python -m pytest -s {Path(__file__).parent} -k {test}"


class Workflow:
    """One working directory, run again and again with the same command."""

    def __init__(self, workdir: Path, events: Path, extra: tuple[str, ...], env: dict):
        self.workdir, self.events, self.extra = workdir, events, extra
        events.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            **env,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])
            ),
            "ROBOVQA_FAULTS": str(events),
            "ROBOVQA_FAULT_WORKDIR": str(workdir),
        }

    def command(self, *args: str) -> list[str]:
        return [
            SNAKEMAKE,
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(self.workdir),
            *args,
            *CONFIGS,
            *self.extra,
        ]

    def run(self, plan: list[tuple[str, int]], log: Path) -> int:
        """The workflow once, until it ends or a kill point kills it: its exit status.
        One job at a time (`--cores 1`), so that a stage's k-th event is always the same
        one and a plan replays exactly."""
        env = {**self.env, "ROBOVQA_FAULT_PLAN": ";".join(f"{s}={k}" for s, k in plan)}
        with log.open("w") as handle:
            process = subprocess.Popen(
                self.command("--cores", "1"),
                cwd=ROOT,
                env=env,
                start_new_session=True,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            (self.events / "pgid").write_text(str(process.pid))
            try:
                code = process.wait(timeout=600)
            finally:
                _kill_group(process.pid)
        self.wait_for_survivors()
        return code

    def wait_for_survivors(self) -> None:
        """Every process of this working directory gone (torchrun's workers die with their
        parent, a moment later), so that the restart is alone."""
        deadline = time.monotonic() + 30
        while pids := _processes_with(f"ROBOVQA_FAULTS={self.events}"):
            assert time.monotonic() < deadline, f"processes {pids} outlived the kill"
            time.sleep(0.05)

    def unlock(self) -> None:
        result = subprocess.run(
            self.command("--unlock"),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def counts(self) -> dict[str, int]:
        return json.loads((self.events / "counts.json").read_text())

    def fired(self) -> list[str]:
        path = self.events / "fired.log"
        return path.read_text().splitlines() if path.exists() else []


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended by itself
        os.killpg(pgid, signal.SIGKILL)


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                variables = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in variables:
                found.append(int(entry.name))
    return found


def survive(workflow: Workflow, plan: list[tuple[str, int]], logs: Path, test: str) -> list[str]:
    """Run `workflow` until it completes, restarting after every kill as the README says;
    the kills, in order."""
    logs.mkdir(parents=True, exist_ok=True)
    for attempt in range(len(plan) + 3):
        log = logs / f"attempt-{attempt:02d}.log"
        before = len(workflow.fired())
        code = workflow.run(plan, log)
        fired = workflow.fired()
        if code == 0:
            return fired
        assert code == -signal.SIGKILL and len(fired) == before + 1, (
            f"attempt {attempt} ended with exit status {code} after the kills {fired}; "
            f"replay: {replay_line(plan, test)}\n" + log.read_text()[-6000:]
        )
        workflow.unlock()  # a killed Snakemake leaves its lock (README: "When a run dies")
    raise AssertionError(f"not complete after {attempt + 1} attempts: {replay_line(plan, test)}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The small bucket (tests/data/configs/small.yaml's demo settings) in a GCS emulator."""
    from test_gcs_emulator import Emulator

    from robovqa_ft.data.demo_bucket import generate_demo_bucket

    settings = yaml.safe_load((ROOT / "tests" / "data" / "configs" / "small.yaml").read_text())
    demo = settings["demo"]
    bucket = tmp_path_factory.mktemp("bucket")
    generate_demo_bucket(
        bucket,
        clips=demo["clips"],
        shards_per_split=demo["shards_per_split"],
        frame_size=tuple(demo["frame_size"]),
        bad_records=demo["bad_records"],
    )
    emulator = Emulator("gdm-robovqa")
    for shard in sorted(bucket.glob("*/*")):
        emulator.bucket.blob(f"tfrecord/{shard.parent.name}/{shard.name}").upload_from_filename(
            str(shard)
        )
    yield {"STORAGE_EMULATOR_HOST": emulator.endpoint}
    emulator.stop()


@pytest.fixture(scope="module")
def reference(gcs, tmp_path_factory) -> Workflow:
    """An uninterrupted run, counting its events."""
    root = tmp_path_factory.mktemp("reference")
    workflow = Workflow(root / "work", root / "events", (), gcs)
    assert survive(workflow, [], root / "logs", "uninterrupted") == []
    return workflow


def test_killed_at_every_stage_the_workflow_ends_with_an_uninterrupted_runs_outputs(
    reference, gcs, tmp_path, capsys, request
):
    kills = KILLS - max(len(TWO_PROCESSES), KILLS // 5)
    plan = planned(reference.counts(), ONE_PROCESS, kills, SEED)
    test = request.node.name
    workflow = Workflow(tmp_path / "work", tmp_path / "events", (), gcs)
    fired = survive(workflow, plan, tmp_path / "logs", test)
    with capsys.disabled():
        _print_kills("one process", plan, fired, reference.counts(), test)
    assert sorted(line.split("\t")[0] for line in fired) == sorted(f"{s}={k}" for s, k in plan)
    if kills >= len(ONE_PROCESS):
        assert {s for s, _ in plan} == set(ONE_PROCESS), "a stage was not killed"
    assert_same_outputs(reference.workdir, workflow.workdir, RUNS, TOLERANCE)


def test_killed_while_stepping_and_saving_on_two_processes_stage1_ends_as_uninterrupted(
    reference, gcs, tmp_path, capsys, request
):
    """Stage 1 trained again on two processes, in copies of the reference's working
    directory without its stage-1 training: once uninterrupted, once killed. (One and
    two processes differ by more than float noise: LoRA dropout draws per rank.)"""
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({"training": {"gpus": 2}}))
    extra = (str(two), "--resources", "gpu=2")
    uninterrupted, killed = (
        _without_stage1(reference, tmp_path / name, extra, gcs) for name in ("clean", "killed")
    )
    assert survive(uninterrupted, [], tmp_path / "clean" / "logs", "uninterrupted") == []
    kills = max(len(TWO_PROCESSES), KILLS // 5)
    plan = planned(uninterrupted.counts(), TWO_PROCESSES, kills, SEED + 1)
    test = request.node.name
    fired = survive(killed, plan, tmp_path / "killed" / "logs", test)
    with capsys.disabled():
        _print_kills("two processes", plan, fired, uninterrupted.counts(), test)
    assert sorted(line.split("\t")[0] for line in fired) == sorted(f"{s}={k}" for s, k in plan)
    log = (killed.workdir / "logs" / "train" / "stage1.log").read_text()
    assert "Launching 2 training processes" in log and "Resumed from checkpoint" in log
    assert_no_leftovers(killed.workdir)
    assert_same_training(
        uninterrupted.workdir / "results/stage1", killed.workdir / "results/stage1", TOLERANCE
    )


def _without_stage1(reference: Workflow, root: Path, extra: tuple, gcs: dict) -> Workflow:
    work = root / "work"
    shutil.copytree(reference.workdir, work, symlinks=True)
    for done in ("results/stage1/adapter", "results/checkpoints/stage1"):
        shutil.rmtree(work / done)
    (work / "results" / "stage1" / "train_metrics.csv").unlink()
    workflow = Workflow(work, root / "events", extra, gcs)
    workflow.command = _with_target(workflow.command, "results/stage1/adapter")
    return workflow


def _with_target(command, target):
    def with_target(*args):
        return command(*args, target) if args[:1] != ("--unlock",) else command(*args)

    return with_target


def _print_kills(title, plan, fired, counts, test):
    print(f"\nkills ({title}, seed {SEED}): {len(fired)} tried, {len(fired)} survived")
    for line in fired:
        point, kind, path, _pid = line.split("\t")
        stage = point.rsplit("=", 1)[0]
        print(f"  {point:<26} of {counts[stage]:>4}  {kind:<6} {path}")
    print(f"  replay: {replay_line(plan, test)}")


def assert_same_outputs(reference: Path, run: Path, runs, tolerance: float) -> None:
    assert_no_leftovers(run)
    data, other = reference / "results" / "data", run / "results" / "data"
    files = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for name in files:  # frames, indexes, JSONL, metadata: byte for byte
        expected, got = (data / name).read_bytes(), (other / name).read_bytes()
        if name.name == "shards.tsv":  # the manifest names the shards' absolute paths
            expected, got = expected.replace(bytes(reference), b""), got.replace(bytes(run), b"")
        assert expected == got, name
    for name in runs:
        assert_same_training(reference / "results" / name, run / "results" / name, tolerance)
    for name in ("base", *runs):
        for output in ("predictions.jsonl",):
            assert (reference / "results" / name / output).read_text() == (
                run / "results" / name / output
            ).read_text(), f"{name}/{output}"
        expected, got = (
            json.loads((w / "results" / name / "eval.json").read_text()) for w in (reference, run)
        )
        assert_close(expected, got, f"{name}/eval.json")
        expected, got = (
            _jsonl(w / "results" / name / "val_losses.jsonl") for w in (reference, run)
        )
        assert_close(expected, got, f"{name}/val_losses.jsonl")
        assert not (run / "results" / name / "eval_progress.jsonl").exists()
    report, expected_report = run / "results" / "ablation", reference / "results" / "ablation"
    assert (report / "table.csv").read_text() == (expected_report / "table.csv").read_text()
    for output in ("report.md", "loss_curves.png", "scores.png"):  # these show timings too
        assert (report / output).stat().st_size > 0, output


def assert_no_leftovers(run: Path) -> None:
    leftovers = sorted(str(p.relative_to(run)) for p in (run / "results").rglob(".*.part"))
    assert not leftovers, f"half-written files left behind: {leftovers}"


# What a metrics row says of the training; not how fast it went.
METRICS = {
    "train_metrics.csv": (
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "samples",
        "real_token_share",
        "dropped_turns",
        "skipped_samples",
    ),
    "eval_metrics.csv": ("step", "epoch", "eval_loss", "eval_samples", "eval_tokens"),
}


def assert_same_training(expected: Path, got: Path, tolerance: float) -> None:
    """The adapter within `tolerance`, and each metrics row once, as an uninterrupted
    run logged it (a resume must neither repeat nor lose a row)."""
    assert_same_adapter(expected / "adapter", got / "adapter", tolerance)
    for name, columns in METRICS.items():
        rows = [
            [{c: _number(row[c]) for c in columns} for row in _csv(folder / name)]
            for folder in (expected, got)
        ]
        assert_close(rows[0], rows[1], f"{got / name}")


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _number(text: str):
    return float(text) if text not in ("", "None") else text


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_adapter(expected: Path, got: Path, tolerance: float) -> None:
    a, b = (
        load_file(str(expected / "adapter_model.safetensors")),
        load_file(str(got / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= tolerance, f"{got}: LoRA weights differ by up to {worst:.2e}"


def assert_close(expected, got, where: str) -> None:
    """Equal, numbers within float noise (1e-6 relative), eval.json's timings aside."""
    if isinstance(expected, dict):
        keys, other = set(expected) - LOOSE_FIELDS, set(got) - LOOSE_FIELDS
        assert keys == other, f"{where}: {sorted(keys ^ other)}"
        for key in keys:
            assert_close(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) and isinstance(got, (int, float)):
        close = math.isclose(expected, got, rel_tol=1e-6, abs_tol=1e-9)
        assert close, f"{where}: {expected} != {got}"
    else:
        assert expected == got, f"{where}: {expected!r} != {got!r}"
