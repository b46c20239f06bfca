import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_extract_frames_benchmark_prints_every_figure():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "extract_frames.py"),
         "--frames", "16", "--clips", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    rows = [line.split(" | ") for line in result.stdout.splitlines() if " | " in line]
    figures = {row[0]: row[1:] for row in rows}
    assert set(figures) >= {"320x240", "1280x960", "extract_shard"}
    for name in ("320x240", "1280x960", "extract_shard"):
        assert all(float(x.rstrip("x")) > 0 for x in figures[name]), figures[name]
