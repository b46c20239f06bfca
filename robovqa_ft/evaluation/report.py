"""The ablation report: curriculum (stage 1 -> stage 2) against stage-2-only training.

Reads each run folder (eval.json, predictions.jsonl, val_losses.jsonl, metrics files);
writes `report.md`, `table.csv` and two plots. Pure reading and arithmetic: no model is
loaded here; the paired Δs come from `comparisons`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from robovqa_ft.core.runs import CURRICULUM, FORMATS, TRAINED
from robovqa_ft.core.text import markdown_table
from robovqa_ft.evaluation.comparisons import (
    CONTROLS,
    GROUP_METRIC,
    HEADLINE,
    LABELS,
    METRICS,
    RESAMPLES,
    SET_FORMAT,
    all_deltas,
    comparison_name,
    control_name,
    group_scores,
    read_predictions,
    read_val_losses,
    seed_spread,
)
from robovqa_ft.evaluation.confidence import questions_for_half_width

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

# The answer formats as the report shows them: first the one both headline runs were
# trained on (stage 2's), whose Δ is the like-for-like comparison.
SHOWN_FORMATS = sorted(FORMATS, key=lambda fmt: not all(fmt in CURRICULUM[r] for r in HEADLINE))

COLUMNS = {label: run for run, label in LABELS.items()}  # column label -> run folder
NOISE = "not distinguishable from noise"
NAMES = {"val_loss": "val loss", "yes_no_accuracy": "yes/no accuracy", "bleu": "BLEU",
         "exact_match": "exact match"}  # fmt: skip
# metric -> (scale, unit, decimals) of a Δ
UNITS = {"val_loss": (1, "nats", 3), "yes_no_accuracy": (100, "pts", 1), "bleu": (1, "BLEU", 1),
         "exact_match": (100, "pts", 1)}  # fmt: skip
DEMO_NOTE = (
    "- **DEMO**: a tiny randomly initialised InternVL on synthetic data; these numbers show "
    "the pipeline works, not how InternVL3-8B does."
)


def relative_change(curriculum: float, ablation: float) -> float:
    """How much higher (positive) the stage-2-only value is than the curriculum's."""
    return (ablation - curriculum) / curriculum


def format_change(change: float, what: str = "loss") -> str:
    return f"{change:+.0%} {what}"


def format_value(metric: str, value: float | None) -> str:
    if value is None or pd.isna(value):
        return "–"
    if metric == "val_loss":
        return f"{value:.3f}"
    return f"{value:.1f}" if metric == "bleu" else f"{value:.1%}"


def format_signed(metric: str, value: float, unit: bool = True) -> str:
    """A difference in the metric's units: nats, BLEU or percentage points."""
    if value is None or pd.isna(value):
        return "–"
    scale, name, digits = UNITS[metric]
    return f"{value * scale:+.{digits}f}" + (f" {name}" if unit else "")


def format_delta(row: pd.Series) -> str:
    """Δ [95% interval], and for a loss its relative change."""
    low, high = (format_signed(row["metric"], row[k], unit=False) for k in ("low", "high"))
    text = f"{format_signed(row['metric'], row['delta'])} [{low}, {high}]"
    if row["metric"] == "val_loss":
        text += f" ({format_change(relative_change(row['a_value'], row['b_value']))})"
    return text


def _cells(row: pd.Series) -> list[str]:
    """Δ with interval, McNemar p, what it rests on, and the noise mark."""
    p = "–" if pd.isna(row["p_mcnemar"]) else f"{row['p_mcnemar']:.3g}"
    rests = f"{int(row['questions']):,} {row['counted']}, {int(row['clips'])} clips"
    return [format_delta(row), p, rests, NOISE if row["spans_zero"] else ""]


def _metric(row: pd.Series) -> str:
    return f"{NAMES[row['metric']]} ({row['group']})"  # the val set, or "macro"


def _summary_rows(deltas: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """One comparison's loss and macro rows, the stage-2 format first."""
    rows = deltas[deltas["comparison"] == comparison_name(a, b)]
    order = {"format": list(SHOWN_FORMATS), "metric": ["val_loss", *METRICS]}
    keys = {c: rows[c].map({v: i for i, v in enumerate(values)}) for c, values in order.items()}
    return rows.assign(_f=keys["format"], _m=keys["metric"]).sort_values(["_f", "_m", "group"])


def trained_on(evals: dict[str, dict], fmt: str) -> str:
    """Which of the headline runs was trained on answers of this format."""
    who = [LABELS[run] for run in HEADLINE if fmt in evals[run]["trained_formats"]]
    return "both" if len(who) == len(HEADLINE) else f"{who[0]} only" if who else "neither"


def headline(deltas: pd.DataFrame, evals: dict[str, dict], seed: int) -> str:
    rows = _summary_rows(deltas, *HEADLINE)
    summary = rows["group"].isin(["macro", *SET_FORMAT])
    table = markdown_table(
        "metric | format | trained on | curriculum | stage-2-only | "
        "Δ (stage-2-only − curriculum) [95%] | McNemar p | rests on | noise?",
        [[_metric(r), r.format, trained_on(evals, r.format), format_value(r.metric, r.a_value),
          format_value(r.metric, r.b_value), *_cells(r)] for _, r in rows[summary].iterrows()],
    )  # fmt: skip
    groups = markdown_table(
        "group | format | metric | Δ [95%] | McNemar p | rests on | noise?",
        [[r.group, r.format, NAMES[r.metric], *_cells(r)] for _, r in rows[~summary].iterrows()],
    )
    reduction = evals[HEADLINE[0]]["loss"]["stage1_val"]["reduction"]
    notes = [
        "Δ = stage-2-only − curriculum, in the metric's own units: a positive loss Δ means "
        "the curriculum is better, a positive accuracy, BLEU or exact-match Δ means "
        "stage-2-only is. 'trained on' says which of the two runs was trained on answers in "
        "that format: the stage-2 format is the fair comparison (both were), the stage-1 "
        "format only the curriculum saw.",
        f"Loss: {reduction}; a val set holds its format's samples, paired by (set, id). "
        "Macro Δ (macro rows): every group weighs the same (each question 1/n_group), so it "
        "is the difference of the macro scores.",
        f"Intervals: 95% paired bootstrap, clips resampled with replacement ({RESAMPLES:,} "
        f"draws, evaluation seed {seed}). They cover the questions asked, not the training "
        f"seed. A Δ whose interval holds 0 is marked '{NOISE}'. McNemar: exact, two-sided, "
        "over the format's yes/no questions pooled (per group below).",
    ]
    for _, r in rows[summary & (rows["metric"] == "yes_no_accuracy")].iterrows():
        share = r.discordant / r.questions
        notes.append(
            f"Achieved 95% half-width of the macro yes/no accuracy Δ, {r.format} format: "
            f"±{(r.high - r.low) / 2 * 100:.1f} pts on {int(r.questions):,} questions of "
            f"{int(r.clips)} clips; {share:.0%} of them discordant, at which ±5 pts would take "
            f"about {questions_for_half_width(0.05, share):,} questions."
        )
    return "\n\n".join([table, *notes, "Per group:\n\n" + groups])


def versus_base(deltas: pd.DataFrame, evals: dict[str, dict]) -> str:
    rows = []
    for run in TRAINED:
        part = _summary_rows(deltas, "base", run)
        for _, r in part[part["group"].isin(["macro", *SET_FORMAT])].iterrows():
            trained = "yes" if r.format in evals[run]["trained_formats"] else "no"
            values = [format_value(r.metric, v) for v in (r.b_value, r.a_value)]
            rows.append([LABELS[run], _metric(r), r.format, trained, *values, *_cells(r)])
    header = "run | metric | format | run trained on it | run's | base | Δ (run − base) [95%] | "
    table = markdown_table(header + "McNemar p | rests on | noise?", rows)
    return table + "\n\nPositive Δ: the run scores higher than base (for loss: is worse)."


def _control_row(deltas: pd.DataFrame, run: str, control: str, fmt: str) -> pd.Series | None:
    found = deltas[(deltas["comparison"] == control_name(run, control)) & (deltas["format"] == fmt)]
    return found.iloc[0] if len(found) else None


def _beats(found: dict[str, pd.Series | None]) -> str:
    failing = [c.replace("_", " ") for c, r in found.items() if r is None or r["low"] <= 0]
    if not failing:
        return "beats both controls (intervals exclude 0)"
    return f"does not beat {' and '.join(failing)} with an interval that excludes 0"


def controls(deltas: pd.DataFrame, evals: dict[str, dict]) -> str:
    rows, verdicts = [], []
    for run in LABELS:
        parts = []
        for fmt in SHOWN_FORMATS:
            found = {c: _control_row(deltas, run, c, fmt) for c in CONTROLS}
            shown = [r for r in found.values() if r is not None]
            if not shown:
                continue
            cells = [format_value("yes_no_accuracy", shown[0]["b_value"])]
            for r in found.values():
                noise = f" ({NOISE})" if r is not None and r["spans_zero"] else ""
                cells += ["–", "–"] if r is None else [
                    format_value(r["metric"], r["a_value"]), format_delta(r) + noise]  # fmt: skip
            majority = evals[run]["answers"]["formats"][fmt]["macro"]["yes_no_majority_rate"]
            rows.append([LABELS[run], fmt, *cells, format_value("yes_no_accuracy", majority)])
            parts.append(f"{fmt} format: {_beats(found)}")
        verdicts.append(f"- {LABELS[run]}, own frames against the controls: " + "; ".join(parts))
    header = "run | format | frames | blank frames | Δ frames − blank [95%] | other clip | "
    table = markdown_table(header + "Δ frames − other clip [95%] | majority floor", rows)
    note = (
        "Yes/no questions, macro accuracy, paired by (id, format) within the run: the clip's "
        "own frames against blank frames and against another clip's frames of the same group "
        "(a seeded derangement). A model that uses the pixels beats both; always giving a "
        "group's commoner answer scores the majority floor."
    )
    return "\n\n".join([table, note, "\n".join(verdicts)])


def _score(answers: dict, group: str, metric: str) -> float | None:
    """A group's score in one format of an eval.json, or the macro one."""
    if group == "macro":
        return answers["macro"][metric]
    key = "accuracy" if metric == "yes_no_accuracy" else metric
    return answers["groups"].get(group, {}).get(key)


def answers_per_group(evals: dict[str, dict]) -> str:
    """Per format and score group (accuracy for yes/no, BLEU for free form) every run's
    score from its eval.json, then the macro scores, and stage-2-only − curriculum."""
    rows = []
    for fmt in SHOWN_FORMATS:
        per_run = {label: evals[run]["answers"]["formats"][fmt] for label, run in COLUMNS.items()}
        scored = {g: s for answers in per_run.values() for g, s in answers["groups"].items()}
        lines = [(g, GROUP_METRIC["yes_no" if "accuracy" in s else "freeform"], s["n"])
                 for g, s in sorted(scored.items())]  # fmt: skip
        for group, metric, n in [*lines, *(("macro", metric, "") for metric in METRICS)]:
            values = {label: _score(answers, group, metric) for label, answers in per_run.items()}
            a, b = (values[LABELS[run]] for run in HEADLINE)
            delta = format_signed(metric, b - a) if None not in (a, b) else "–"
            scores = [format_value(metric, value) for value in values.values()]
            rows.append([fmt, group, NAMES[metric], n, *scores, delta])
    header = "format | group | metric | n | " + " | ".join(COLUMNS)
    return markdown_table(header + " | Δ (stage-2-only − curriculum)", rows)


def family_losses(evals: dict[str, dict]) -> str:
    """Each run's token-level val loss split by family and by answer kind."""
    rows = []
    for split in SET_FORMAT:
        for kind, key in (("family", "by_family"), ("answer kind", "by_answer_type")):
            parts = [evals[run]["loss"][split][key] for run in COLUMNS.values()]
            for name in sorted({n for part in parts for n in part}):
                tokens = next(part[name]["tokens"] for part in parts if name in part)
                losses = [format_value("val_loss", p.get(name, {}).get("loss")) for p in parts]
                rows.append([split, kind, name, f"{tokens:,}", *losses])
    table = markdown_table("val set | split by | part | tokens | " + " | ".join(COLUMNS), rows)
    return table + "\n\nToken-level mean loss (nats) over the part's answer tokens."


def _mean_sd(metric: str, mean: float, sd: float, signed: bool) -> str:
    scale, _, digits = UNITS[metric]
    return f"{mean * scale:{'+' if signed else ''}.{digits}f} ± {sd * scale:.{digits}f}"


def seeds(evals: dict[str, dict], pool: Sequence[Path | str]) -> str:
    if not pool:
        return ("One training seed only. To add seeds, train a second `--directory` with "
                "another training.seed and list it in report.pool.")  # fmt: skip
    others = [
        {run: json.loads((Path(d) / "results" / run / "eval.json").read_text()) for run in evals}
        for d in pool
    ]
    spread = seed_spread([evals, *others]).set_index(["metric", "format", "run"])
    rows = []
    for fmt in SHOWN_FORMATS:
        for metric in ("val_loss", *METRICS):
            cells = [
                _mean_sd(metric, *spread.loc[(metric, fmt, label)], signed=label == "Δ")
                for label in (*COLUMNS, "Δ")
            ]
            rows.append([NAMES[metric], fmt, *cells])
    header = "metric | format | " + " | ".join(COLUMNS) + " | Δ (stage-2-only − curriculum)"
    note = (
        f"Mean ± sd (n − 1) over {len(pool) + 1} directories trained with different training "
        f"seeds: this one and {', '.join(map(str, pool))}; accuracy and exact match in %, loss "
        "in nats. The within-seed intervals above cover the questions asked, not this seed "
        "variance."
    )
    return markdown_table(header, rows) + "\n\n" + note


def plot_loss_curves(run_dirs: dict[str, Path], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run, folder in run_dirs.items():
        train = _csv(folder / "train_metrics.csv")
        evals = _csv(folder / "eval_metrics.csv")
        if not train.empty:
            label = f"{LABELS[run]} train (token mean)"
            line = axis.plot(train["step"], train["loss"], label=label, alpha=0.7)[0]
            if not evals.empty:
                axis.plot(evals["step"], evals["eval_loss"], "o--", color=line.get_color(),
                          label=f"{LABELS[run]} val (token mean)")  # fmt: skip
    axis.set_xlabel("optimizer step (each run counts from 0)")
    axis.set_ylabel("loss (token-level cross-entropy)")
    axis.set_title("Training and periodic val loss")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_scores(scores: pd.DataFrame, path: Path, majority: dict[str, float | None]) -> None:
    """Per format: accuracy and BLEU per group, each run's bar with its 95% clip interval."""
    figure, axes = plt.subplots(
        len(SHOWN_FORMATS), 2, figsize=(13, 4.5 * len(SHOWN_FORMATS)), squeeze=False
    )
    width = 0.8 / len(COLUMNS)
    for row, fmt in zip(axes, SHOWN_FORMATS, strict=True):
        for axis, metric in zip(row, GROUP_METRIC.values(), strict=True):
            part = scores[(scores["format"] == fmt) & (scores["metric"] == metric)]
            groups = sorted(set(part["group"]))
            for i, label in enumerate(COLUMNS):
                bars = part[part["run"] == label].set_index("group").reindex(groups)
                # a percentile interval can miss its own estimate by a rounding error
                errors = [(bars["score"] - bars["low"]).clip(lower=0),
                          (bars["high"] - bars["score"]).clip(lower=0)]  # fmt: skip
                x = np.arange(len(groups)) + (i - (len(COLUMNS) - 1) / 2) * width
                axis.bar(x, bars["score"], width, yerr=errors, capsize=2, label=label)
            if metric == "yes_no_accuracy" and majority.get(fmt) is not None:
                axis.axhline(majority[fmt], color="grey", linestyle=":", label="majority answer")
            axis.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
            axis.set_title(f"{fmt} format: {NAMES[metric]} per group (95% clip bootstrap)")
            axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def conditions(
    run_dirs: dict[str, Path], metadata: dict, settings: dict, evals: dict[str, dict],
    timings: dict[str, Path], generations: dict[str, int],
) -> list[str]:  # fmt: skip
    """What the numbers hold under, one bullet each."""
    model, data = settings["model"], metadata["splits"]
    demo = model["name"] in ("tiny", "results/models/tiny") or settings["source"] == "demo"
    tiny = settings.get("tiny_model", {}).get("family") if model["name"] == "tiny" else None
    lines = [
        f"- model: {model['name']}{f' ({tiny})' if tiny else ''}, quantization "
        f"{model['quantization']}, dtype {model['dtype']}, LoRA r {settings['lora']['r']} / "
        f"alpha {settings['lora']['alpha']}; frames as {model.get('frames_as', 'video')} "
        f"(times at a nominal {settings.get('frame_rate')} frames/s where the family reads them)",
        f"- data: source {settings['source']}; train {data['train']['clips']:,} clips "
        f"({data['train']['stage1_samples']:,} stage-1 samples), val {data['val']['clips']:,} "
        f"clips ({data['val']['stage1_samples']:,}); subset ratio "
        f"{metadata['split']['subset_ratio']}, split {metadata['split']['method']} "
        f"(seed {metadata['split']['split_seed']})",
    ]
    for stage in ("stage1", "stage2"):
        s = settings[stage]
        lines.append(
            f"- {stage}: {s['max_frames']} frames, max {s['max_seq_len']} tokens, "
            f"lr {s['learning_rate']}, batch {s['batch_size']} x {s['grad_accum']}, "
            f"{s['epochs']} epochs" + (f", {s['layout']} layout" if "layout" in s else "")
        )
    for run in TRAINED:
        logged = [_csv(run_dirs[run] / f) for f in ("train_metrics.csv", "eval_metrics.csv")]
        steps = max((int(t["step"].max()) for t in logged if not t.empty), default=0)
        seconds = _benchmark_seconds(timings.get(run))
        timing = f"{seconds / 60:.1f} min training" if seconds is not None else "time unknown"
        name = run if LABELS[run] == run else f"{LABELS[run]} ({run})"
        lines.append(
            f"- {name}: {steps} steps, {timing}, eval {evals[run]['wall_seconds']} s, "
            f"trained on {' + '.join(evals[run]['trained_formats'])} format"
        )
    lines.append(f"- base: eval {evals['base']['wall_seconds']} s")
    counts = [f"{LABELS[run]} {n:,}" for run, n in generations.items()]
    resumed = sum(e.get("resumed_records", 0) for e in evals.values())
    lines.append(f"- generations (rows of predictions.jsonl): {', '.join(counts)}; "
                 f"{resumed} records taken from interrupted earlier attempts")  # fmt: skip
    lines.append(f"- seeds: training {settings['training']['seed']}, "
                 f"evaluation {settings['evaluation']['seed']}")  # fmt: skip
    machines = sorted({e.get("hardware", "unknown") for e in evals.values()})
    lines.append(f"- hardware (evaluation): {', '.join(machines)}")
    answers = evals[HEADLINE[0]]["answers"]
    lines.append(f"- answers: {answers['questions']} {answers['from']}, {answers['decoding']}")
    for fmt, f in answers["formats"].items():
        lines.append(
            f"- {fmt} format: {f['frames']} frames, max {f['max_seq_len']} tokens, prompt: "
            f"{f['prompt']}; history {f['history_turns']:.1f} pairs shown on average, "
            f"{f['dropped_history_turns']} dropped ({f['questions_trimmed']} questions trimmed)"
        )
    if demo:
        lines.insert(0, DEMO_NOTE)
    return lines


def _benchmark_seconds(path: Path | None) -> float | None:
    if path is None or not Path(path).exists():
        return None
    return float(pd.read_csv(path, sep="\t")["s"].iloc[-1])


def write_report(
    run_dirs: dict[str, Path | str],
    metadata_path: Path | str,
    settings: dict,
    out: dict[str, Path | str],
    timings: dict[str, Path | str] | None = None,
    pool: Sequence[Path | str] = (),
) -> str:
    """Write the report, table and plots to `out` ("report", "table", "curves", "scores").
    `run_dirs`: run -> its results folder; `pool`: workflow directories trained with other
    training seeds, each holding results/{run}/eval.json."""
    dirs = {run: Path(folder) for run, folder in run_dirs.items()}
    evals = {run: json.loads((d / "eval.json").read_text()) for run, d in dirs.items()}
    predictions = {run: read_predictions(dirs[run]) for run in LABELS}
    seed = settings["evaluation"]["seed"]
    deltas = all_deltas(predictions, {run: read_val_losses(d) for run, d in dirs.items()}, seed)
    scores = group_scores(predictions, seed)
    out = {k: Path(v) for k, v in out.items()}
    out["table"].parent.mkdir(parents=True, exist_ok=True)
    pd.concat([deltas, scores]).to_csv(out["table"], index=False)
    plot_loss_curves({run: dirs[run] for run in TRAINED}, out["curves"])
    formats = evals[HEADLINE[0]]["answers"]["formats"]
    majority = {fmt: answers["macro"]["yes_no_majority_rate"] for fmt, answers in formats.items()}
    plot_scores(scores, out["scores"], majority)
    metadata = json.loads(Path(metadata_path).read_text())
    times = {run: Path(path) for run, path in (timings or {}).items()}
    counts = {run: len(frame) for run, frame in predictions.items()}
    lines = conditions(dirs, metadata, settings, evals, times, counts)
    title = "# Ablation: curriculum vs stage-2-only"
    if lines[0] == DEMO_NOTE:
        title += " — DEMO (tiny model, synthetic data)"
    text = "\n\n".join([
        title,
        "## Headline: curriculum vs stage-2-only\n\n" + headline(deltas, evals, seed),
        "## Each trained run vs base\n\n" + versus_base(deltas, evals),
        "## Controls: do the frames matter?\n\n" + controls(deltas, evals),
        "## Answers per group\n\n" + answers_per_group(evals)
        + "\n\nYes/no groups: accuracy after normalization (first yes/no word, else invalid); "
          "free-form groups: sacrebleu sentence BLEU (0-100), prediction vs the one reference.",
        "## Val loss per family and answer kind\n\n" + family_losses(evals),
        "## Across training seeds\n\n" + seeds(evals, pool),
        "## Conditions\n\n" + "\n".join(lines),
        f"![loss curves]({out['curves'].name})\n\n![scores]({out['scores'].name})",
    ])  # fmt: skip
    out["report"].write_text(text + "\n", encoding="utf-8")
    return text
