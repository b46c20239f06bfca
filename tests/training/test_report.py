import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pandas as pd
import pytest

from robovqa_ft.evaluation.report import (
    DEMO_NOTE,
    NOISE,
    format_change,
    relative_change,
    write_report,
)

CLIPS = ("v0", "v1", "v2", "v3")
# (group, family, answer_type) of every clip's questions, in clip order (k = place)
QUESTIONS = (
    ("success", "success", "yes_no"),
    ("success", "success", "yes_no"),
    ("planning", "planning", "freeform"),
    ("affordance_discriminative", "affordance", "yes_no"),
)
FORMATS = ("stage1", "stage2")


@dataclass(frozen=True)
class Run:
    """A fabricated run: which answers it gets right, its BLEU, and its loss per token."""

    trained: tuple[str, ...]
    correct: Callable[[str, str, str, int], bool]  # (format, condition, clip, k)
    bleu: float = 0.0
    exact_clips: tuple[str, ...] = ()
    loss: Callable[[str, str], float] = lambda split, clip: 2.0  # nats per token


def predictions(run: Run) -> list[dict]:
    rows = []
    for i, clip in enumerate(CLIPS):
        for k, (group, family, kind) in enumerate(QUESTIONS):
            for fmt in FORMATS:
                base = {
                    "id": f"{clip}-{k:02d}",
                    "video_id": clip,
                    "group": group,
                    "family": family,
                    "answer_type": kind,
                    "format": fmt,
                    "question": "?",
                    "history_turns": 0 if fmt == "stage1" else k,
                    "dropped_history_turns": 0,
                }
                if kind == "freeform":
                    score = {"bleu": run.bleu, "exact_match": clip in run.exact_clips}
                    rows.append(
                        {
                            **base,
                            "condition": "frames",
                            "frames_of": clip,
                            "reference": "pick up the cup",
                            "prediction": "cup",
                            "score": score,
                        }
                    )
                    continue
                reference = "yes" if k == 0 else "no"
                for condition in ("frames", "blank_frames", "other_clip"):
                    right = run.correct(fmt, condition, clip, k)
                    said = reference if right else {"yes": "no", "no": "yes"}[reference]
                    shown = CLIPS[(i + 1) % len(CLIPS)] if condition == "other_clip" else clip
                    rows.append(
                        {
                            **base,
                            "condition": condition,
                            "frames_of": shown,
                            "reference": reference,
                            "prediction": said,
                            "score": {"said": said, "correct": right},
                        }
                    )
    return rows


def val_losses(run: Run) -> list[dict]:
    """stage1_val: one 5-token turn per question; stage2_val: one sample per clip, a turn
    of 5 + k tokens per question (26 tokens); one skipped sample in each set."""
    rows = []
    for clip in CLIPS:
        for k, (_, family, kind) in enumerate(QUESTIONS):
            turn = {
                "family": family,
                "answer_type": kind,
                "tokens": 5,
                "loss": 5 * run.loss("stage1_val", clip),
            }
            rows.append(
                {
                    "set": "stage1_val",
                    "id": f"{clip}-{k:02d}",
                    "video_id": clip,
                    "skipped": False,
                    "turns": [turn],
                }
            )
        turns = [
            {
                "family": f,
                "answer_type": kind,
                "tokens": 5 + k,
                "loss": (5 + k) * run.loss("stage2_val", clip),
            }
            for k, (_, f, kind) in enumerate(QUESTIONS)
        ]
        rows.append(
            {
                "set": "stage2_val",
                "id": f"{clip}-s2",
                "video_id": clip,
                "skipped": False,
                "turns": turns,
            }
        )
    for split in ("stage1_val", "stage2_val"):
        rows.append({"set": split, "id": "v9-00", "video_id": "v9", "skipped": True, "turns": []})
    return rows


def loss_summary(rows: list[dict]) -> dict:
    turns = [t for r in rows for t in r["turns"]]

    def mean(part):
        tokens = sum(t["tokens"] for t in part)
        return {"loss": sum(t["loss"] for t in part) / tokens, "tokens": tokens}

    def split_by(key):
        return {v: mean([t for t in turns if t[key] == v]) for v in {t[key] for t in turns}}

    total = mean(turns)
    return {
        **total,
        "perplexity": math.exp(total["loss"]),
        "samples": len(rows),
        "skipped_samples": sum(r["skipped"] for r in rows),
        "clips": len(CLIPS),
        "reduction": "token-level mean: test",
        "by_family": split_by("family"),
        "by_answer_type": split_by("answer_type"),
    }


def answer_summary(rows: list[dict], fmt: str) -> dict:
    shown = [r for r in rows if r["format"] == fmt]
    groups = {}
    for group in sorted({r["group"] for r in shown}):
        part = [r for r in shown if r["group"] == group]

        def mean(condition, key, part=part):
            values = [r["score"][key] for r in part if r["condition"] == condition]
            return sum(values) / len(values)

        if part[0]["answer_type"] == "yes_no":
            frames = [r for r in part if r["condition"] == "frames"]
            yes = sum(r["reference"] == "yes" for r in frames) / len(frames)
            groups[group] = {
                "n": len(frames),
                "majority_rate": max(yes, 1 - yes),
                "accuracy": mean("frames", "correct"),
                "invalid_rate": 0.0,
                "blank_frames_accuracy": mean("blank_frames", "correct"),
                "other_clip_accuracy": mean("other_clip", "correct"),
                "other_clip_n": len(frames),
            }
        else:
            groups[group] = {
                "n": len(part),
                "bleu": mean("frames", "bleu"),
                "exact_match": mean("frames", "exact_match"),
            }

    def macro(key):
        values = [g[key] for g in groups.values() if key in g]
        return sum(values) / len(values)

    return {
        "frames": 4,
        "max_seq_len": 2048,
        "prompt": "test prompt",
        "history_turns": 1.5,
        "dropped_history_turns": 0,
        "questions_trimmed": 0,
        "groups": groups,
        "macro": {
            "yes_no_accuracy": macro("accuracy"),
            "blank_frames_yes_no_accuracy": macro("blank_frames_accuracy"),
            "other_clip_yes_no_accuracy": macro("other_clip_accuracy"),
            "yes_no_majority_rate": macro("majority_rate"),
            "bleu": macro("bleu"),
            "exact_match": macro("exact_match"),
        },
    }


def write_run(folder, name: str, run: Run) -> None:
    """eval.json, predictions.jsonl and val_losses.jsonl as the issue-11 contract has them,
    eval.json's numbers computed from the other two."""
    folder.mkdir(parents=True)
    answers, losses = predictions(run), val_losses(run)
    for file, rows in (("predictions.jsonl", answers), ("val_losses.jsonl", losses)):
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {
        "run": name,
        "adapter": None,
        "model": "test",
        "trained_formats": list(run.trained),
        "loss": {
            s: loss_summary([r for r in losses if r["set"] == s])
            for s in ("stage1_val", "stage2_val")
        },
        "answers": {
            "questions": 16,
            "from": "stage-1 val questions",
            "decoding": "greedy",
            "formats": {f: answer_summary(answers, f) for f in FORMATS},
        },
        "hardware": "cpu",
        "wall_seconds": 3.0,
        "resumed_records": 0,
    }
    (folder / "eval.json").write_text(json.dumps(result))
    if name != "base":
        pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.2]}).to_csv(
            folder / "train_metrics.csv", index=False
        )
        pd.DataFrame({"step": [3], "eval_loss": [2.4]}).to_csv(
            folder / "eval_metrics.csv", index=False
        )


STAGE2_ONLY_WRONG = {("v0", 0), ("v1", 3)}  # one success and one affordance question
RUNS = {
    # right on its own frames only, in both formats
    "stage2": Run(
        ("stage1", "stage2"), lambda f, c, clip, k: c == "frames", bleu=40.0, exact_clips=("v0",)
    ),
    # wrong in the stage-1 format; the frames do not matter
    "stage2_only": Run(
        ("stage2",),
        lambda f, c, clip, k: f == "stage2" and (clip, k) not in STAGE2_ONLY_WRONG,
        bleu=20.0,
        loss=lambda s, clip: 3.0 if s == "stage1_val" else {"v0": 2.6, "v1": 1.6}.get(clip, 2.0),
    ),
    "stage1": Run(
        ("stage1",),
        lambda f, c, clip, k: f == "stage1" and c == "frames",
        bleu=30.0,
        loss=lambda s, clip: 2.5,
    ),
    "base": Run((), lambda f, c, clip, k: k == 0, bleu=5.0, loss=lambda s, clip: 4.0),
}


def settings(model="OpenGVLab/InternVL3-8B-hf", source="gs://gdm-robovqa/tfrecord"):
    stage = {
        "max_frames": 4,
        "max_seq_len": 2048,
        "learning_rate": 4e-5,
        "batch_size": 2,
        "grad_accum": 16,
        "epochs": 1,
    }
    return {
        "source": source,
        "model": {"name": model, "quantization": "nf4", "dtype": "bfloat16"},
        "lora": {"r": 128, "alpha": 256},
        "training": {"seed": 0},
        "stage1": stage,
        "stage2": stage,
        "evaluation": {"seed": 0},
    }


def write_runs(root, runs=RUNS) -> dict:
    for name, run in runs.items():
        write_run(root / "results" / name, name, run)
    return {name: root / "results" / name for name in runs}


@pytest.fixture
def runs(tmp_path):
    metadata = {
        "splits": {s: {"clips": 10, "stage1_samples": 30} for s in ("train", "val")},
        "split": {"subset_ratio": 1.0, "method": "hash", "split_seed": 0},
    }
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    return write_runs(tmp_path / "main"), tmp_path


def out_paths(folder):
    names = {
        "report": "report.md",
        "table": "table.csv",
        "curves": "loss_curves.png",
        "scores": "scores.png",
    }
    return {key: folder / "ablation" / name for key, name in names.items()}


def report(runs, **kwargs):
    dirs, root = runs
    out = out_paths(root)
    text = write_report(
        dirs, root / "metadata.json", kwargs.pop("settings", settings()), out, **kwargs
    )
    return text, pd.read_csv(out["table"]), out


def delta_row(table, comparison, fmt, group="macro", metric="yes_no_accuracy"):
    found = table[
        (table["table"] == "delta")
        & (table["comparison"] == comparison)
        & (table["format"] == fmt)
        & (table["group"] == group)
        & (table["metric"] == metric)
    ]
    assert len(found) == 1
    return found.iloc[0]


def line_of(text, *parts):
    found = [line for line in text.splitlines() if all(p in line for p in parts)]
    assert len(found) == 1, (parts, found)
    return found[0]


def test_relative_change_is_stage2_only_against_the_curriculum():
    assert relative_change(2.0, 2.96) == pytest.approx(0.48)
    assert format_change(relative_change(2.0, 2.96)) == "+48% loss"
    assert format_change(relative_change(2.0, 1.5)) == "-25% loss"


def test_headline_deltas_equal_the_hand_computed_ones(runs):
    _, table, _ = report(runs)
    head = "stage2_only - curriculum"
    # stage-2 format: stage-2-only misses 1 of 8 success and 1 of 4 affordance questions:
    # macro (7/8 + 3/4) / 2 against 1. Never better on any clip, and 1/16 of the resamples
    # draw neither v0 nor v1: the upper end is exactly 0.
    fair = delta_row(table, head, "stage2")
    assert fair["delta"] == pytest.approx(-0.1875) and fair["high"] == 0.0
    assert fair["low"] < fair["delta"] and fair["spans_zero"]
    assert (fair["questions"], fair["clips"], fair["discordant"]) == (12, 4, 2)
    assert fair["p_mcnemar"] == pytest.approx(2 * 1 / 2**2)
    # stage-1 format: all 12 right against all wrong, in every clip alike
    seen = delta_row(table, head, "stage1")
    assert (seen["delta"], seen["low"], seen["high"]) == (-1.0, -1.0, -1.0)
    assert not seen["spans_zero"] and seen["p_mcnemar"] == pytest.approx(2 / 2**12)
    success = delta_row(table, head, "stage1", group="success")
    assert success["p_mcnemar"] == pytest.approx(2 / 2**8) and success["questions"] == 8
    bleu = delta_row(table, head, "stage2", metric="bleu")
    assert (bleu["delta"], bleu["low"], bleu["high"]) == (-20.0, -20.0, -20.0)
    exact = delta_row(table, head, "stage1", metric="exact_match")  # 1 of 4 against 0
    assert exact["delta"] == pytest.approx(-0.25) and exact["spans_zero"]
    # losses: 3 against 2 nats per token on every stage-1 sample; the skipped one is left out
    loss = delta_row(table, head, "stage1", group="stage1_val", metric="val_loss")
    assert (loss["delta"], loss["low"], loss["high"]) == pytest.approx((1.0, 1.0, 1.0))
    assert (loss["questions"], loss["counted"], loss["clips"]) == (80, "tokens", 4)
    noisy = delta_row(table, head, "stage2", group="stage2_val", metric="val_loss")
    assert noisy["delta"] == pytest.approx((0.6 - 0.4) * 26 / 104) and noisy["spans_zero"]
    # against base: 1 against (4/8 + 0/4) / 2, the same in every clip
    base = delta_row(table, "curriculum - base", "stage2")
    assert (base["delta"], base["low"], base["high"]) == pytest.approx((0.75, 0.75, 0.75))


def test_report_marks_noise_and_says_which_format_each_run_was_trained_on(runs):
    text, _, _ = report(runs)
    fair = line_of(text, "| yes/no accuracy (macro) | stage2 | both |")
    assert "-18.8 pts [" in fair and "+0.0]" in fair and "12 questions, 4 clips" in fair
    assert fair.endswith(f"| {NOISE} |")
    seen = line_of(text, "| yes/no accuracy (macro) | stage1 | curriculum only |")
    assert "-100.0 pts [-100.0, -100.0]" in seen and NOISE not in seen
    loss = line_of(text, "| val loss (stage1_val) | stage1 | curriculum only |")
    assert "+1.000 nats [+1.000, +1.000] (+50% loss)" in loss and "80 tokens, 4 clips" in loss
    assert "Δ = stage-2-only − curriculum" in text
    assert "cover the questions asked, not the training seed" in text
    assert "half-width of the macro yes/no accuracy Δ, stage1 format: ±0.0 pts" in text
    assert "- stage2_only: 3 steps, time unknown, eval 3.0 s, trained on stage2 format" in text
    assert "- curriculum (stage2): 3 steps, time unknown, eval 3.0 s, trained on stage1 + " in text


def test_controls_say_which_runs_the_frames_help(runs):
    text, table, _ = report(runs)
    assert line_of(text, "- curriculum, own frames against the controls:").endswith(
        ": stage2 format: beats both controls (intervals exclude 0); "
        "stage1 format: beats both controls (intervals exclude 0)"
    )
    assert line_of(text, "- stage1, own frames against the controls:").endswith(
        ": stage2 format: does not beat blank frames and other clip with an interval that "
        "excludes 0; stage1 format: beats both controls (intervals exclude 0)"
    )
    blank = delta_row(table, "curriculum: frames - blank_frames", "stage1")
    assert (blank["delta"], blank["low"], blank["high"]) == (1.0, 1.0, 1.0)
    same = delta_row(table, "stage2_only: frames - other_clip", "stage2")
    assert same["delta"] == 0.0 and same["spans_zero"]
    row = line_of(text, "| curriculum | stage2 | 100.0% | 0.0% |")
    assert row.endswith("| 75.0% |")  # majority floor: (1/2 + 1) / 2 over the groups


def test_answers_and_family_losses_cover_both_formats_and_every_run(runs):
    text, table, _ = report(runs)
    assert (
        "| stage1 | success | yes/no accuracy | 8 | 50.0% | 100.0% | 100.0% | 0.0% | -100.0 pts |"
        in text
    )
    assert "| stage2 | planning | BLEU | 4 | 5.0 | 30.0 | 40.0 | 20.0 | -20.0 BLEU |" in text
    assert "| stage2_val | answer kind | yes_no | 76 | 4.000 | 2.500 | 2.000 |" in text
    assert "| stage1_val | family | affordance | 20 | 4.000 | 2.500 | 2.000 | 3.000 |" in text
    scores = table[table["table"] == "score"]
    assert set(scores["format"]) == set(FORMATS) and len(scores) == 4 * 2 * 3
    planning = scores[(scores["run"] == "stage1") & (scores["group"] == "planning")]
    assert planning["score"].tolist() == [30.0, 30.0]
    assert "- generations (rows of predictions.jsonl): " in text
    assert "curriculum 80" in line_of(text, "- generations")  # 32 on frames + 48 controls


def test_plots_are_written(runs):
    _, _, out = report(runs)
    for key in ("curves", "scores"):
        assert out[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_pool_gives_mean_and_sd_over_directories(runs):
    dirs, root = runs
    text, _, _ = report(runs)
    assert "report.pool" in line_of(text, "training.seed")
    pool = []
    for i, rate in enumerate((2.2, 2.4)):
        curriculum = replace(RUNS["stage2"], loss=lambda s, clip, rate=rate: rate)
        write_runs(root / f"seed{i}", {**RUNS, "stage2": curriculum})
        pool.append(root / f"seed{i}")
    text, _, _ = report(runs, pool=pool)
    # curriculum stage1_val: 2.0, 2.2, 2.4; stage-2-only 3.0 in every directory
    row = line_of(text, "| val loss | stage1 |")
    assert "| 2.200 ± 0.200 | 3.000 ± 0.000 | +0.800 ± 0.200 |" in row
    assert "Mean ± sd (n − 1) over 3 directories" in text and "not this seed variance" in text


def test_a_demo_report_says_so_in_its_title_and_first_condition(runs):
    text, _, _ = report(runs, settings=settings("tiny", "demo"))
    assert text.splitlines()[0].endswith("DEMO (tiny model, synthetic data)")
    assert DEMO_NOTE in text
    assert "DEMO" not in report(runs)[0]
