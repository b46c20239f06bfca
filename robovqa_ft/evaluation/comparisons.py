"""The ablation report's paired Δs: each run's predictions and val losses read from its
folder (the issue-11 contract), paired question by question with another run's, and handed
to `confidence` for clip-bootstrap intervals and McNemar tests.

Δ = run b − run a, in the metric's own units; clips (video ids) are the bootstrap clusters.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from robovqa_ft.core.runs import TRAINED
from robovqa_ft.evaluation.confidence import (
    Interval,
    bootstrap_mean,
    mcnemar_exact,
    paired_bootstrap,
)

RESAMPLES = 10_000
# Run folder -> the label the report uses. "curriculum" is stage 2 from the stage-1 adapter.
LABELS = {"base": "base", "stage1": "stage1", "stage2": "curriculum", "stage2_only": "stage2_only"}
HEADLINE = ("stage2", "stage2_only")  # (a, b): Δ = stage-2-only − curriculum
SET_FORMAT = {"stage1_val": "stage1", "stage2_val": "stage2"}  # a val set is one format's data
CONTROLS = ("blank_frames", "other_clip")
# metric -> (answer type it scores, predictions column)
METRICS = {
    "yes_no_accuracy": ("yes_no", "correct"),
    "bleu": ("freeform", "bleu"),
    "exact_match": ("freeform", "exact_match"),
}
SCORES = tuple(column for _, column in METRICS.values())
GROUP_METRIC = {"yes_no": "yes_no_accuracy", "freeform": "bleu"}  # what a group is scored by
COLUMNS = [
    "table",
    "comparison",
    "run",
    "format",
    "group",
    "metric",
    "delta",
    "low",
    "high",
    "questions",
    "counted",
    "clips",
    "p_mcnemar",
    "discordant",
    "spans_zero",
    "a_value",
    "b_value",
    "score",
]


def comparison_name(a: str, b: str) -> str:
    return f"{LABELS[b]} - {LABELS[a]}"


def control_name(run: str, control: str) -> str:
    return f"{LABELS[run]}: frames - {control}"


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def read_predictions(folder: Path) -> pd.DataFrame:
    """predictions.jsonl, one row per (id, format, condition), its score as the columns
    correct (yes/no), bleu and exact_match (free form)."""
    frame = pd.DataFrame(_jsonl(folder / "predictions.jsonl"))
    for column in SCORES:
        frame[column] = [score.get(column) for score in frame["score"]]
    return frame.drop(columns="score")


def read_val_losses(folder: Path) -> pd.DataFrame:
    """val_losses.jsonl, one row per sample with at least one scored turn: its summed loss
    (nats) and tokens."""
    rows = [
        {
            "set": r["set"],
            "id": r["id"],
            "video_id": r["video_id"],
            "loss": sum(t["loss"] for t in r["turns"]),
            "tokens": sum(t["tokens"] for t in r["turns"]),
        }
        for r in _jsonl(folder / "val_losses.jsonl")
        if not r["skipped"] and r["turns"]
    ]
    return pd.DataFrame(rows, columns=["set", "id", "video_id", "loss", "tokens"])


def _interval(interval: Interval) -> dict:
    return {**asdict(interval), "spans_zero": interval.spans_zero}


def _pair(a: pd.DataFrame, b: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    return a.merge(b[[*keys, *SCORES]], on=list(keys), suffixes=("_a", "_b"), validate="1:1")


def _delta_row(pairs: pd.DataFrame, metric: str, seed: int, **where: str) -> dict:
    """Δ of `metric` over paired questions, every group weighing the same (each question
    1/n_group), so on the full sample it is the difference of the macro scores."""
    column = METRICS[metric][1]
    weights = 1 / pairs.groupby("group")["id"].transform("size").to_numpy(float)
    a = pairs[f"{column}_a"].to_numpy(float) * weights
    b = pairs[f"{column}_b"].to_numpy(float) * weights
    interval = paired_bootstrap(a, b, pairs["video_id"].tolist(), weights, RESAMPLES, seed)
    row = {
        "table": "delta",
        **where,
        "metric": metric,
        **_interval(interval),
        "counted": "questions",
        "a_value": a.sum() / weights.sum(),
        "b_value": b.sum() / weights.sum(),
    }
    if metric == "yes_no_accuracy":  # pooled over the questions, whatever their group
        a_ok, b_ok = pairs["correct_a"].astype(bool), pairs["correct_b"].astype(bool)
        row["p_mcnemar"] = mcnemar_exact(a_ok.tolist(), b_ok.tolist())
        row["discordant"] = int((a_ok != b_ok).sum())
    return row


def answer_deltas(a: pd.DataFrame, b: pd.DataFrame, comparison: str, seed: int) -> list[dict]:
    """Per format, on the clip's own frames: the macro Δ of each metric, then each group's
    Δ of its own metric (accuracy or BLEU)."""
    shown = [p[p["condition"] == "frames"] for p in (a, b)]
    rows = []
    for fmt, part in _pair(*shown, ("id", "format")).groupby("format"):
        for metric, (kind, _) in METRICS.items():
            scored = part[part["answer_type"] == kind]
            if len(scored):
                rows.append(
                    _delta_row(
                        scored, metric, seed, comparison=comparison, format=fmt, group="macro"
                    )
                )
        for group, scored in part.groupby("group"):
            metric = GROUP_METRIC[scored["answer_type"].iloc[0]]
            rows.append(
                _delta_row(scored, metric, seed, comparison=comparison, format=fmt, group=group)
            )
    return rows


def control_deltas(predictions: pd.DataFrame, run: str, seed: int) -> list[dict]:
    """Within one run: yes/no accuracy on the clip's frames minus on each control's, per
    format (positive: the frames helped)."""
    yes_no = predictions[predictions["answer_type"] == "yes_no"]
    frames = yes_no[yes_no["condition"] == "frames"]
    rows = []
    for control in CONTROLS:
        pairs = _pair(yes_no[yes_no["condition"] == control], frames, ("id", "format"))
        for fmt, part in pairs.groupby("format"):
            rows.append(
                _delta_row(
                    part,
                    "yes_no_accuracy",
                    seed,
                    format=fmt,
                    group="macro",
                    comparison=control_name(run, control),
                )
            )
    return rows


def loss_deltas(a: pd.DataFrame, b: pd.DataFrame, comparison: str, seed: int) -> list[dict]:
    """Per val set: Δ token-level loss = (Σ loss_b − Σ loss_a) / Σ tokens, in nats."""
    pairs = a.merge(
        b[["set", "id", "loss", "tokens"]], on=["set", "id"], suffixes=("_a", "_b"), validate="1:1"
    )
    if not np.array_equal(pairs["tokens_a"], pairs["tokens_b"]):
        raise ValueError(f"{comparison}: the two runs scored different tokens")
    rows = []
    for split, part in pairs.groupby("set"):
        tokens = part["tokens_a"].to_numpy(float)
        interval = paired_bootstrap(
            part["loss_a"], part["loss_b"], part["video_id"].tolist(), tokens, RESAMPLES, seed
        )
        rows.append(
            {
                "table": "delta",
                "comparison": comparison,
                "format": SET_FORMAT[split],
                "group": split,
                "metric": "val_loss",
                **_interval(interval),
                "questions": int(tokens.sum()),
                "counted": "tokens",
                "a_value": part["loss_a"].sum() / tokens.sum(),
                "b_value": part["loss_b"].sum() / tokens.sum(),
            }
        )
    return rows


def all_deltas(predictions: dict, losses: dict, seed: int) -> pd.DataFrame:
    """Every Δ of the report: the headline, each trained run against base, the controls."""
    rows = []
    for a, b in (HEADLINE, *(("base", run) for run in TRAINED)):
        name = comparison_name(a, b)
        rows += loss_deltas(losses[a], losses[b], name, seed)
        rows += answer_deltas(predictions[a], predictions[b], name, seed)
    for run, frame in predictions.items():
        rows += control_deltas(frame, run, seed)
    return pd.DataFrame(rows, columns=COLUMNS)


def group_scores(predictions: dict, seed: int) -> pd.DataFrame:
    """Each run's score per format and group on its own frames, with its clip-bootstrap
    interval (accuracy for yes/no groups, BLEU for free form)."""
    rows = []
    for run, frame in predictions.items():
        shown = frame[frame["condition"] == "frames"]
        for (fmt, group), part in shown.groupby(["format", "group"]):
            metric = GROUP_METRIC[part["answer_type"].iloc[0]]
            values = part[METRICS[metric][1]].to_numpy(float)
            interval = bootstrap_mean(values, part["video_id"].tolist(), RESAMPLES, seed)
            rows.append(
                {
                    "table": "score",
                    "run": LABELS[run],
                    "format": fmt,
                    "group": group,
                    "metric": metric,
                    "score": interval.delta,
                    "low": interval.low,
                    "high": interval.high,
                    "questions": interval.questions,
                    "counted": "questions",
                    "clips": interval.clips,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def headline_metrics(evaluation: dict) -> dict[tuple[str, str], float]:
    """(metric, format) -> its value in one run's eval.json (val loss, macro answer scores)."""
    values = {("val_loss", fmt): evaluation["loss"][s]["loss"] for s, fmt in SET_FORMAT.items()}
    for fmt, answers in evaluation["answers"]["formats"].items():
        values.update({(metric, fmt): answers["macro"][metric] for metric in METRICS})
    return values


def seed_spread(directories: list[dict[str, dict]]) -> pd.DataFrame:
    """Mean and sd (n − 1) over directories (run -> eval.json each, one per training seed) of
    every headline metric per run label, and of the Δ stage-2-only − curriculum (run "Δ")."""
    rows = []
    for evals in directories:
        metrics = {LABELS[run]: headline_metrics(e) for run, e in evals.items()}
        a, b = (metrics[LABELS[run]] for run in HEADLINE)
        metrics["Δ"] = {key: b[key] - a[key] for key in a}
        rows += [
            {"run": label, "metric": metric, "format": fmt, "value": value}
            for label, values in metrics.items()
            for (metric, fmt), value in values.items()
        ]
    spread = pd.DataFrame(rows).groupby(["metric", "format", "run"])["value"]
    return spread.agg(["mean", "std"]).reset_index()
