"""The ablation report: curriculum (stage 1 -> stage 2) against stage-2-only training.

Reads each run's `eval.json` and metrics files; writes `report.md`, `table.csv` and two
plots. Pure reading and arithmetic: no model is loaded here.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

# Column label -> run folder. "curriculum" is stage 2 trained from the stage-1 adapter.
COLUMNS = {"base": "base", "stage1": "stage1", "curriculum": "stage2", "stage2_only": "stage2_only"}
TRAINED = ("stage1", "stage2", "stage2_only")
DEMO_NOTE = (
    "- **DEMO**: a tiny randomly initialised InternVL on synthetic data; these numbers show "
    "the pipeline works, not how InternVL3-8B does."
)


def relative_change(curriculum: float, ablation: float) -> float:
    """How much higher (positive) the stage-2-only value is than the curriculum's."""
    return (ablation - curriculum) / curriculum


def format_change(change: float, what: str = "loss") -> str:
    return f"{change:+.0%} {what}"


def loss_table(evals: dict[str, dict]) -> pd.DataFrame:
    """The seed's comparison: val loss and perplexity, curriculum vs stage-2-only, and Δ."""
    rows = []
    for split in ("stage1_val", "stage2_val"):
        cur, abl = evals["stage2"]["loss"][split], evals["stage2_only"]["loss"][split]
        rows.append({
            "val set": split, "curriculum_loss": cur["loss"], "curriculum_ppl": cur["perplexity"],
            "stage2_only_loss": abl["loss"], "stage2_only_ppl": abl["perplexity"],
            "delta": relative_change(cur["loss"], abl["loss"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def answer_table(evals: dict[str, dict]) -> pd.DataFrame:
    """Per score group (accuracy for yes/no, BLEU for free form) for every run, base included."""
    groups = sorted({g for e in evals.values() for g in e["answers"]["groups"]})
    rows = []
    for group in groups:
        row = {"group": group}
        for label, run in COLUMNS.items():
            scores = evals[run]["answers"]["groups"].get(group, {})
            if "accuracy" in scores:
                row["metric"] = "accuracy"
                row[label] = scores["accuracy"]
                row[f"{label}_blank_frames"] = scores["blank_frames_accuracy"]
                row[f"{label}_other_clip"] = scores.get("other_clip_accuracy")
            elif "bleu" in scores:
                row["metric"] = "BLEU"
                row[label] = scores["bleu"]
        rows.append(row)
    for metric, key in (("accuracy", "yes_no_accuracy"), ("BLEU", "bleu")):
        row = {"group": "macro", "metric": metric}
        for label, run in COLUMNS.items():
            row[label] = evals[run]["answers"]["macro"][key]
            if key == "yes_no_accuracy":
                macro = evals[run]["answers"]["macro"]
                row[f"{label}_blank_frames"] = macro["blank_frames_yes_no_accuracy"]
                row[f"{label}_other_clip"] = macro.get("other_clip_yes_no_accuracy")
        rows.append(row)
    table = pd.DataFrame(rows)
    # stage-2-only minus curriculum, in the metric's own units (accuracy or BLEU points)
    table["delta"] = table["stage2_only"] - table["curriculum"]
    return table


def render_loss_table(table: pd.DataFrame) -> str:
    lines = [
        "| val set | curriculum (stage 1 → 2) | stage-2-only | Δ (stage-2-only vs curriculum) |",
        "|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r[1]} | {r.curriculum_loss:.3f} / {r.curriculum_ppl:.1f} | "
            f"{r.stage2_only_loss:.3f} / {r.stage2_only_ppl:.1f} | {format_change(r.delta)} |"
        )
    return "\n".join(lines)


def render_answer_table(table: pd.DataFrame) -> str:
    labels = list(COLUMNS)
    header = " | ".join(labels) + " | Δ (stage-2-only − curriculum)"
    lines = [f"| group | metric | {header} |", "|---|---|" + "---|" * (len(labels) + 1)]
    for _, r in table.iterrows():
        cells = []
        for label in labels:
            value = r.get(label)
            if value is None or pd.isna(value):
                cells.append("–")
            elif r["metric"] == "accuracy":
                blank, other = r.get(f"{label}_blank_frames"), r.get(f"{label}_other_clip")
                other = "–" if other is None or pd.isna(other) else f"{other:.1%}"
                cells.append(f"{value:.1%} (blank frames {blank:.1%}, other clip {other})")
            else:
                cells.append(f"{value:.1f}")
        delta = r.get("delta")
        if delta is None or pd.isna(delta):
            cells.append("–")
        elif r["metric"] == "accuracy":
            cells.append(f"{delta * 100:+.1f} pts")
        else:
            cells.append(f"{delta:+.1f}")
        lines.append(f"| {r['group']} | {r['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_loss_curves(run_dirs: dict[str, Path], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run, folder in run_dirs.items():
        train = _csv(folder / "train_metrics.csv")
        evals = _csv(folder / "eval_metrics.csv")
        if not train.empty:
            line = axis.plot(train["step"], train["loss"], label=f"{run} train", alpha=0.7)[0]
            if not evals.empty:
                axis.plot(evals["step"], evals["eval_loss"], "o--", color=line.get_color(),
                          label=f"{run} val (token mean)")  # fmt: skip
    axis.set_xlabel("optimizer step (each run counts from 0)")
    axis.set_ylabel("loss (token-level cross-entropy)")
    axis.set_title("Training and periodic val loss")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_scores(table: pd.DataFrame, path: Path, majority: float | None) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, metric in zip(axes, ("accuracy", "BLEU"), strict=True):
        columns = list(COLUMNS)
        if metric == "accuracy":  # the control beside the real thing
            columns += ["curriculum_blank_frames", "curriculum_other_clip"]
        part = table[table["metric"] == metric].set_index("group")[columns]
        part.plot.bar(ax=axis, rot=30)
        axis.set_title(f"{metric} per group" + (" (yes/no)" if metric == "accuracy" else ""))
        if metric == "accuracy" and majority is not None:
            axis.axhline(majority, color="grey", linestyle=":", label="majority answer")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def conditions(
    run_dirs: dict[str, Path], metadata: dict, settings: dict, evals: dict[str, dict],
    timings: dict[str, Path],
) -> list[str]:  # fmt: skip
    """What the numbers hold under, one bullet each."""
    model, data = settings["model"], metadata["splits"]
    demo = model["name"] in ("tiny", "results/models/tiny") or settings["source"] == "demo"
    lines = [
        f"- model: {model['name']}, quantization {model['quantization']}, dtype {model['dtype']}, "
        f"LoRA r {settings['lora']['r']} / alpha {settings['lora']['alpha']}",
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
            f"{s['epochs']} epochs"
        )
    for run, folder in run_dirs.items():
        logged = [_csv(folder / name) for name in ("train_metrics.csv", "eval_metrics.csv")]
        steps = max((int(t["step"].max()) for t in logged if not t.empty), default=0)
        seconds = _benchmark_seconds(timings.get(run))
        timing = f"{seconds / 60:.1f} min training" if seconds is not None else "time unknown"
        lines.append(f"- {run}: {steps} steps, {timing}, eval {evals[run]['wall_seconds']} s")
    lines.append(f"- base: eval {evals['base']['wall_seconds']} s")
    lines.append(f"- seeds: training {settings['training']['seed']}, "
                 f"evaluation {settings['evaluation']['seed']}")  # fmt: skip
    machines = sorted({e.get("hardware", "unknown") for e in evals.values()})
    lines.append(f"- hardware (evaluation): {', '.join(machines)}")
    answers = evals["stage2"]["answers"]
    lines.append(f"- answers: {answers['questions']} {answers['from']}, {answers['frames']} "
                 f"frames, {answers['decoding']}")  # fmt: skip
    if demo:
        lines.insert(0, DEMO_NOTE)
    return lines


def _benchmark_seconds(path: Path | None) -> float | None:
    if path is None or not Path(path).exists():
        return None
    return float(pd.read_csv(path, sep="\t")["s"].iloc[-1])


def write_report(
    eval_paths: dict[str, Path | str],
    metadata_path: Path | str,
    settings: dict,
    out: dict[str, Path | str],
    timings: dict[str, Path | str] | None = None,
) -> str:
    """Write the report, table and plots to `out` ("report", "table", "curves", "scores")."""
    evals = {run: json.loads(Path(p).read_text()) for run, p in eval_paths.items()}
    run_dirs = {run: Path(eval_paths[run]).parent for run in TRAINED}
    metadata = json.loads(Path(metadata_path).read_text())
    losses, answers = loss_table(evals), answer_table(evals)
    out = {k: Path(v) for k, v in out.items()}
    out["table"].parent.mkdir(parents=True, exist_ok=True)
    pd.concat([losses.assign(table="loss"), answers.assign(table="answers")]).to_csv(
        out["table"], index=False
    )
    plot_loss_curves(run_dirs, out["curves"])
    majority = evals["stage2"]["answers"]["macro"].get("yes_no_majority_rate")
    plot_scores(answers, out["scores"], majority)
    lines = conditions(
        run_dirs, metadata, settings, evals, {k: Path(v) for k, v in (timings or {}).items()}
    )
    demo = lines[0] == DEMO_NOTE
    title = "# Ablation: curriculum vs stage-2-only" + (
        " — DEMO (tiny model, synthetic data)" if demo else ""
    )
    text = "\n\n".join([
        title,
        "## Val loss / perplexity\n\n" + render_loss_table(losses)
        + f"\n\nLoss: {evals['stage2']['loss']['stage1_val']['reduction']}. Δ is "
          "(stage-2-only − curriculum) / curriculum: positive means the curriculum is better.",
        "## Answers per task family\n\n" + render_answer_table(answers)
        + "\n\nYes/no groups: accuracy after normalization (first yes/no word, else invalid), "
          "with the same questions on blank frames and on another clip's frames of the same "
          "family (a seeded derangement: no clip shown its own) beside it; a model that "
          "learned from the pixels beats both; free-form groups: sacrebleu "
          "sentence BLEU (prediction vs the one reference, default settings). Always giving "
          "the commoner answer would score "
          + (f"{majority:.1%}" if majority is not None else "an unknown share")
          + " on these yes/no questions: the floor to beat.",
        "## Conditions\n\n" + "\n".join(lines),
        f"![loss curves]({out['curves'].name})\n\n![scores]({out['scores'].name})",
    ])  # fmt: skip
    out["report"].write_text(text + "\n", encoding="utf-8")
    return text
