import json

import pandas as pd
import pytest

from robovqa_ft.report import (
    DEMO_NOTE,
    format_change,
    loss_table,
    relative_change,
    render_loss_table,
    write_report,
)


def test_relative_change_is_stage2_only_against_the_curriculum():
    assert relative_change(2.0, 2.96) == pytest.approx(0.48)
    assert format_change(relative_change(2.0, 2.96)) == "+48% loss"
    assert format_change(relative_change(2.0, 1.5)) == "-25% loss"


def fake_eval(loss1, loss2, accuracy, blank, bleu):
    def loss(value):
        return {"loss": value, "perplexity": 2.718281828**value, "samples": 10, "tokens": 50,
                "reduction": "token-level mean: test"}  # fmt: skip

    return {
        "loss": {"stage1_val": loss(loss1), "stage2_val": loss(loss2)},
        "answers": {
            "questions": 20, "from": "stage-1 val questions", "frames": 4, "decoding": "greedy",
            "groups": {
                "success": {"n": 10, "accuracy": accuracy, "invalid_rate": 0.0,
                            "blank_frames_accuracy": blank, "other_clip_accuracy": blank + 0.1,
                            "other_clip_n": 10},
                "planning": {"n": 10, "bleu": bleu, "exact_match": 0.1},
            },
            "macro": {"yes_no_accuracy": accuracy, "blank_frames_yes_no_accuracy": blank,
                      "other_clip_yes_no_accuracy": blank + 0.1, "bleu": bleu,
                      "exact_match": 0.1},
        },
        "wall_seconds": 3.0,
    }  # fmt: skip


EVALS = {
    "base": fake_eval(4.0, 4.2, 0.5, 0.5, 1.0),
    "stage1": fake_eval(2.0, 2.5, 0.8, 0.5, 30.0),
    "stage2": fake_eval(2.0, 2.0, 0.9, 0.5, 40.0),
    "stage2_only": fake_eval(2.96, 3.0, 0.6, 0.55, 20.0),
}


def test_loss_table_renders_loss_perplexity_and_delta():
    text = render_loss_table(loss_table(EVALS))
    rows = text.splitlines()
    assert rows[2] == "| stage1_val | 2.000 / 7.4 | 2.960 / 19.3 | +48% loss |"
    assert rows[3] == "| stage2_val | 2.000 / 7.4 | 3.000 / 20.1 | +50% loss |"


def settings(model="OpenGVLab/InternVL3-8B-hf", source="gs://gdm-robovqa/tfrecord"):
    stage = {"max_frames": 4, "max_seq_len": 2048, "learning_rate": 4e-5, "batch_size": 2,
             "grad_accum": 16, "epochs": 1}  # fmt: skip
    return {"source": source, "model": {"name": model, "quantization": "nf4", "dtype": "bfloat16"},
            "lora": {"r": 128, "alpha": 256}, "training": {"seed": 0}, "stage1": stage,
            "stage2": stage, "evaluation": {"seed": 0}}  # fmt: skip


@pytest.fixture
def runs(tmp_path):
    paths = {}
    for run, result in EVALS.items():
        folder = tmp_path / run
        folder.mkdir()
        (folder / "eval.json").write_text(json.dumps(result))
        paths[run] = folder / "eval.json"
        if run != "base":
            pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.2]}).to_csv(
                folder / "train_metrics.csv", index=False
            )
            pd.DataFrame({"step": [3], "eval_loss": [2.4]}).to_csv(
                folder / "eval_metrics.csv", index=False
            )
    metadata = {"splits": {s: {"clips": 10, "stage1_samples": 30} for s in ("train", "val")},
                "split": {"subset_ratio": 1.0, "method": "hash", "split_seed": 0}}  # fmt: skip
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    return paths, tmp_path


def out_paths(folder):
    names = {"report": "report.md", "table": "table.csv", "curves": "loss_curves.png",
             "scores": "scores.png"}  # fmt: skip
    return {key: folder / "ablation" / name for key, name in names.items()}


def test_report_holds_both_tables_conditions_and_plots(runs):
    paths, root = runs
    out = out_paths(root)
    write_report(paths, root / "metadata.json", settings(), out)
    text = out["report"].read_text()
    assert "| stage1_val | 2.000 / 7.4 | 2.960 / 19.3 | +48% loss |" in text
    assert (
        "| success | accuracy | 50.0% (blank frames 50.0%, other clip 60.0%) | "
        "80.0% (blank frames 50.0%, other clip 60.0%) |" in text
    )
    assert "| planning | BLEU | 1.0 | 30.0 | 40.0 | 20.0 | -20.0 |" in text
    assert "| 60.0% (blank frames 55.0%, other clip 65.0%) | -30.0 pts |" in text  # 0.6 vs 0.9
    assert "OpenGVLab/InternVL3-8B-hf, quantization nf4" in text and "stage1: 3 steps" in text
    assert "DEMO" not in text
    for key in ("curves", "scores"):
        assert out[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out["table"])
    assert set(table["table"]) == {"loss", "answers"}
    assert table.loc[table["val set"] == "stage1_val", "delta"].item() == pytest.approx(0.48)


def test_a_demo_report_says_so_in_its_title_and_first_condition(runs):
    paths, root = runs
    out = out_paths(root)
    text = write_report(paths, root / "metadata.json", settings("tiny", "demo"), out)
    assert text.splitlines()[0].endswith("DEMO (tiny model, synthetic data)")
    assert DEMO_NOTE in text
