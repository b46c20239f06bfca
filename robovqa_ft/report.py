"""What the runs did, for people: summaries of their metrics files."""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def describe_run(run_dir: Path | str) -> str:
    """One line on how a run's losses moved, from its metrics files."""
    run_dir = Path(run_dir)
    train = _read_csv(run_dir / "train_metrics.csv")
    evals = _read_csv(run_dir / "eval_metrics.csv")
    line = f"{run_dir.name}: {len(train) and train[-1]['step']} steps"
    if train:
        line += f", train loss {float(train[0]['loss']):.3f} -> {float(train[-1]['loss']):.3f}"
    if evals:
        line += (
            f", val loss {float(evals[0]['eval_loss']):.3f} -> {float(evals[-1]['eval_loss']):.3f}"
        )
    return line


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


if __name__ == "__main__":
    print("\n".join(describe_run(run) for run in sys.argv[1:]))
