"""The Snakemake DAG itself: dry runs offline, lint, config validation, and a real run."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robovqa_ft.data.demo_bucket import generate_demo_bucket

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
DATA = "results/data/metadata.json"  # the data half of the DAG: what these tests run


def snakemake(*args, workdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_dry_run_of_the_default_gcs_config_works_offline(tmp_path):
    result = snakemake("-n", workdir=tmp_path)
    assert "download" in result.stdout
    assert not (tmp_path / "results").exists()


def test_rulegraph_works_offline(tmp_path):
    graph = snakemake("--rulegraph", workdir=tmp_path).stdout
    assert graph.startswith("digraph")
    # extract_frames fans out over shards that only the download checkpoint knows.
    for rule in ("download", "build_jsonl", "all"):
        assert f'label = "{rule}"' in graph


def test_lint_reports_nothing(tmp_path):
    result = snakemake("--lint", workdir=tmp_path)
    output = result.stdout + result.stderr
    assert "Lints for rule" not in output and "Lints for snakefile" not in output, output


@pytest.mark.parametrize(
    "override, named",
    [("val_ratio=2", "val_ratio"), ("sourcee=x", "sourcee"), ("split=random", "split")],
)
def test_bad_config_stops_before_any_work_naming_the_key(tmp_path, override, named):
    result = snakemake("-n", "--config", override, workdir=tmp_path, check=False)
    assert result.returncode != 0
    assert named in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_dag_runs_on_a_local_bucket_given_with_config_source(tmp_path):
    bucket = tmp_path / "bucket"
    generate_demo_bucket(bucket, clips=24, shards_per_split=2, frame_size=(64, 48), bad_records=1)
    work = tmp_path / "work"
    snakemake("--cores", "2", DATA, "--config", f"source={bucket}", "frame_size=32", workdir=work)

    data = work / "results" / "data"
    metadata = json.loads((data / "metadata.json").read_text())
    assert metadata["records"] == {
        "usable": 24,
        "total": 27,
        "skipped": {"no_valid_qa": 1, "undecodable_frame": 1, "wrong_frame_count": 1},
        "with_extra_texts": 0,
    }
    assert metadata["shards"] == 4 and metadata["frames"]["size"] == [32, 32]
    ids = {}
    for stage in ("stage1", "stage2"):
        for split in ("train", "val"):
            lines = [
                json.loads(x)
                for x in (data / stage / f"{split}.jsonl").read_text().split("\n")
                if x
            ]
            ids[stage, split] = {line["video_id"] for line in lines}
            for line in lines:
                assert all((data / "images" / image).is_file() for image in line["images"])
                for turn in line["conversations"]:
                    assert not re.search(r"<task|<PRED|True|False", turn["value"]), turn
    assert ids["stage1", "train"] == ids["stage2", "train"]
    assert ids["stage1", "val"] == ids["stage2", "val"]
    assert len(ids["stage2", "val"]) == round(0.1 * 24)
    assert not list((bucket).rglob("*.jsonl")), "a local source is used in place, not written to"

    again = snakemake("--cores", "2", DATA, "--config", f"source={bucket}", "frame_size=32",
                      workdir=work)  # fmt: skip
    assert "Nothing to be done" in again.stdout + again.stderr
    graph = snakemake("--rulegraph", "--config", f"source={bucket}", workdir=work).stdout
    assert 'label = "extract_frames"' in graph

    # A shard added to the source is listed, and only it is extracted. This one repeats
    # another shard's clips: their ids are taken, so they are skipped as duplicates.
    time.sleep(1)  # a later time stamp on the folder
    copied = bucket / "val" / "val-00000-of-00002.tfrecord"
    shutil.copyfile(copied, bucket / "val" / "val-copy")
    rerun = snakemake("--cores", "2", DATA, "--config", f"source={bucket}", "frame_size=32",
                      workdir=work)  # fmt: skip
    log = rerun.stdout + rerun.stderr
    assert "download" in log and log.count("rule extract_frames:") == 1, log
    after = json.loads((data / "metadata.json").read_text())
    assert after["records"]["usable"] == 24
    assert after["records"]["skipped"]["duplicate_video_id"] > 0
