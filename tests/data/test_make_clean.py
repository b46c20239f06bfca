"""`make clean` loses nothing expensive; deleting results takes its own, confirmed target."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make(*args: str, cwd: Path) -> str:
    result = subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout + result.stderr


def test_clean_keeps_results_and_clean_results_deletes_only_when_confirmed(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    for folder in ("results/bucket", "results/checkpoints/stage1", "logs", "demo/results"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "results/bucket/train-00000").write_bytes(b"x" * 1000)

    make("clean", cwd=tmp_path)
    assert not (tmp_path / "demo").exists()
    assert (tmp_path / "results/bucket/train-00000").exists() and (tmp_path / "logs").exists()

    said = make("clean-results", cwd=tmp_path)
    assert "results" in said and "CONFIRM=yes" in said
    assert (tmp_path / "results/bucket/train-00000").exists()

    make("clean-results", "CONFIRM=yes", cwd=tmp_path)
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
