"""The training's own metrics beside the Trainer's: samples (questions), trees and the
prefix tokens they saved (stage 1's tree layout), real and computed tokens, dropped turns
and skipped samples counted from the collated batches, summed over the
processes, added to each log and appended to `train_metrics.csv` (cut back to the resumed
step on resume, so that a rerun repeats no row)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from transformers import TrainerCallback

from robovqa_ft.core.files import atomic_open
from robovqa_ft.core.space import named_if_full
from robovqa_ft.training import ranks
from robovqa_ft.training.memory import cuda_peak_allocated_gb


class MetricsLog(TrainerCallback):
    """`train_metrics.csv` and `eval_metrics.csv` in the run folder, kept across resumes,
    and the counters of the logging window behind the project's figures (`figures`, which
    the Trainer adds to its logs). Counters are the job's (summed over ranks); rank 0 writes."""

    TRAIN = ["step", "epoch", "loss", "learning_rate", "grad_norm", "samples", "samples_per_s",
             "tokens_per_s", "real_token_share", "peak_memory_gb", "dropped_turns",
             "skipped_samples", "trees", "prefix_tokens_saved"]  # fmt: skip
    EVAL = ["step", "epoch", "eval_loss", "eval_samples", "eval_tokens"]

    def __init__(self, run_dir: Path, resumed_step: int, eval_samples: int):
        self.train_csv, self.eval_csv = run_dir / "train_metrics.csv", run_dir / "eval_metrics.csv"
        self.eval_samples = eval_samples
        self.writes = ranks.world().is_main
        for path, fields in ((self.train_csv, self.TRAIN), (self.eval_csv, self.EVAL)):
            if self.writes:
                _keep_rows_up_to(path, fields, resumed_step)
        self.window_start, self.samples, self.tokens, self.computed = time.monotonic(), 0, 0, 0
        self.dropped = self.skipped = self.trees = self.saved = 0  # per logging window

    def count(
        self,
        *,
        samples: int,
        dropped_turns: int,
        skipped_samples: int,
        real_tokens: int,
        computed_tokens: int,
        trees: int,
        prefix_tokens_saved: int,
    ) -> None:
        """Add a micro-batch's counters (`split_counters`), Python ints from the collator."""
        self.samples += samples
        self.tokens += real_tokens
        self.computed += computed_tokens
        self.dropped += dropped_turns
        self.skipped += skipped_samples
        self.trees += trees
        self.saved += prefix_tokens_saved

    def figures(self) -> dict[str, float]:
        """The window's samples, throughput, real-token share, peak memory, dropped turns
        and skipped samples, summed over ranks (every rank calls this); then a new window."""
        seconds = max(time.monotonic() - self.window_start, 1e-9)
        samples, tokens, computed, dropped, skipped, trees, saved = ranks.summed(
            [self.samples, self.tokens, self.computed, self.dropped, self.skipped, self.trees,
             self.saved]
        )  # fmt: skip
        peak = cuda_peak_allocated_gb()  # since the process started, as the guard resets it
        (peak,) = ranks.highest([peak])
        self.window_start, self.samples, self.tokens, self.computed = time.monotonic(), 0, 0, 0
        self.dropped = self.skipped = self.trees = self.saved = 0
        return {"samples": int(samples), "samples_per_s": samples / seconds,
                "tokens_per_s": tokens / seconds,
                "real_token_share": round(tokens / max(computed, 1), 4),
                "peak_memory_gb": round(peak, 3), "dropped_turns": int(dropped),
                "skipped_samples": int(skipped), "trees": int(trees),
                "prefix_tokens_saved": int(saved)}  # fmt: skip

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        if "eval_loss" in logs and self.writes:
            _append(self.eval_csv, self.EVAL, {**row, "eval_loss": logs["eval_loss"],
                                               "eval_samples": self.eval_samples,
                                               "eval_tokens": logs.get("eval_tokens")})  # fmt: skip
        elif "loss" in logs and self.writes:
            _append(self.train_csv, self.TRAIN, {**row, **{k: logs.get(k) for k in self.TRAIN[2:]}})


def _append(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    kept = "a rerun drops the row cut short and resumes from the last complete checkpoint"
    with (
        named_if_full(path, "the metrics", kept),
        path.open("a", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.DictWriter(handle, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _keep_rows_up_to(path: Path, fields: list[str], step: int) -> None:
    """Drop rows past the resumed step: they will be logged again. So is a last row
    that a full disk or a kill cut short (it lacks its line end), which could read as
    another step (12 cut to 1) or not at all."""
    if not path.exists():
        return
    with path.open(encoding="utf-8", newline="") as handle:
        text = handle.read()
    whole = io.StringIO(text[: text.rfind("\n") + 1])
    rows = [r for r in csv.DictReader(whole) if int(r["step"]) <= step]
    with named_if_full(path, "the metrics"), atomic_open(path) as handle:
        writer = csv.DictWriter(handle, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
