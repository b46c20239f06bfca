import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sacrebleu
import torch
from peft import PeftModel
from training_helpers import run_settings, train_tiny

from robovqa_ft.evaluation.evaluate import evaluate_run
from robovqa_ft.evaluation.generation import answer_batches
from robovqa_ft.evaluation.journal import Journal, journal_fingerprint
from robovqa_ft.evaluation.questions import (
    answer_sample,
    other_clip_rows,
    question_turn,
    questions_to_ask,
)
from robovqa_ft.evaluation.scoring import (
    normalize,
    score_answer,
    score_group,
    score_predictions,
    sentence_bleu,
    yes_no,
)
from robovqa_ft.evaluation.val_losses import loss_summary, sample_losses
from robovqa_ft.training.collate import pad_batch, split_counters
from robovqa_ft.training.families import model_family
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder, assistant_spans, clip_order


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("NO!", "no"),
        ("no, it is not", "no"),
        ("well... yes, it is", "yes"),
        ("not sure", None),
        ("", None),
        ("nono", None),  # not the word "no"
        ("yesterday", None),
    ],
)
def test_yes_no_normalization(answer, expected):
    assert yes_no(answer) == expected


def test_normalize_lowercases_strips_punctuation_and_spaces():
    assert normalize("  Put the Cup, on shelf A: top! ") == "put the cup on shelf a top"


def test_bleu_is_sacrebleus_own_sentence_bleu_with_prediction_as_hypothesis():
    prediction, reference = "put the red cup in the bin", "put the red block in the bin"
    expected = sacrebleu.sentence_bleu(prediction, [reference]).score
    assert sentence_bleu(prediction, reference) == expected
    assert 0 < expected < 100
    # the order matters (brevity penalty): swapping would give another number
    assert sentence_bleu("put the cup", "put the red cup in the bin") != sentence_bleu(
        "put the red cup in the bin", "put the cup"
    )


def prediction(group, reference, said, blank=None, answer_type="freeform", other=None):
    """One question's rows as evaluate_run writes them: the answer, and its controls."""
    question = f"q{next(_ids)}"
    rows = []
    for condition, text in (("frames", said), ("blank_frames", blank), ("other_clip", other)):
        if text is not None:
            rows.append({"id": question, "group": group, "answer_type": answer_type,
                         "condition": condition, "reference": reference, "prediction": text,
                         "score": score_answer(answer_type, text, reference)})  # fmt: skip
    return rows


_ids = itertools.count()


def flat(questions):
    return [row for rows in questions for row in rows]


def test_perfect_and_empty_predictions_score_at_the_extremes():
    perfect = score_predictions(flat([
        prediction("success", "yes", "Yes.", "no", "yes_no", other="no"),
        prediction("success", "no", "no", "no", "yes_no", other=None),  # no other clip
        prediction("planning", "put the cup in the bin", "put the cup in the bin"),
    ]))  # fmt: skip
    assert perfect["groups"]["success"] == {
        "n": 2, "majority_rate": 0.5, "accuracy": 1.0, "invalid_rate": 0.0,
        "blank_frames_accuracy": 0.5, "other_clip_accuracy": 0.0, "other_clip_n": 1,
    }  # fmt: skip
    assert perfect["macro"]["other_clip_yes_no_accuracy"] == 0.0
    assert perfect["groups"]["planning"]["bleu"] == pytest.approx(100)
    assert perfect["groups"]["planning"]["exact_match"] == 1.0

    empty = score_predictions(flat([
        prediction("success", "yes", "", "", "yes_no"),
        prediction("planning", "put the cup in the bin", ""),
    ]))  # fmt: skip
    assert empty["groups"]["success"]["accuracy"] == 0.0
    assert empty["groups"]["success"]["invalid_rate"] == 1.0
    assert empty["groups"]["planning"] == {"n": 1, "bleu": 0.0, "exact_match": 0.0}
    assert empty["macro"]["yes_no_accuracy"] == 0.0 and empty["macro"]["bleu"] == 0.0


def test_macro_average_weighs_each_group_equally():
    scores = score_predictions(flat([
        prediction("success", "yes", "yes", "yes", "yes_no"),
        prediction("affordance_discriminative", "yes", "no", "no", "yes_no"),
        prediction("affordance_discriminative", "no", "no", "no", "yes_no"),
        prediction("affordance_discriminative", "no", "no", "no", "yes_no"),
    ]))  # fmt: skip
    assert scores["macro"]["yes_no_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_answer_sample_is_stratified_and_the_same_for_every_run(tiny_setup):
    first = answer_sample(tiny_setup["stage1_val"], per_group=3, seed=0)
    assert first == answer_sample(tiny_setup["stage1_val"], per_group=3, seed=0)
    groups = [r["task"] for r in first]
    assert len(first) == 6 and sorted(set(groups)) == ["past_description", "success"]
    assert answer_sample(tiny_setup["stage1_val"], per_group=3, seed=1) != first
    # clip by clip: each group's questions come from the first clips of the seeded order
    order = clip_order(tiny_setup["stage1_val"], seed=0)
    for group in set(groups):
        clips = [order.index(r["video_id"]) for r in first if r["task"] == group]
        assert clips == sorted(clips) == list(range(3))  # one question a clip and family


def test_loss_clips_are_a_seeded_sample_the_same_for_both_val_sets(tiny_setup, tmp_path):
    stage1, stage2 = tiny_setup["stage1_val"], tiny_setup["stage2_val"]
    order = clip_order(stage1, seed=0)
    assert order == clip_order(stage2, seed=0) == clip_order(stage1, seed=0)
    in_file = list(
        dict.fromkeys(json.loads(x)["video_id"] for x in stage2.read_text().splitlines())
    )
    assert sorted(order) == sorted(in_file) and order != in_file  # all clips, shuffled
    assert clip_order(stage1, seed=1) != order

    # Every question of the chosen clips, and none of the others', in both val sets.
    builder = SampleBuilder(
        load_processor(tiny_setup["model"]),
        model_family(tiny_setup["model"]),
        tiny_setup["images"],
        4,
        512,
    )
    chosen = order[:3]
    for path, per_clip in ((stage1, 2), (stage2, 1)):
        rows = list(JsonlDataset(path, builder, clips=chosen).rows())
        assert sorted(r["video_id"] for r in rows) == sorted(chosen * per_clip)


@pytest.fixture(scope="module")
def tiny_eval(tiny_setup):
    torch.manual_seed(0)
    model = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    model = attach_lora(model, 8, 16, 0.0).eval()
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    return model, builder, processor.tokenizer.pad_token_id


@pytest.mark.parametrize("workers", [0, 2])
def test_val_loss_is_the_token_mean_of_the_training_loss(tiny_setup, tiny_eval, tmp_path, workers):
    model, builder, pad = tiny_eval
    dataset = JsonlDataset(tiny_setup["stage2_val"], builder, limit=6)
    journal = Journal(tmp_path / "progress.jsonl", "fingerprint")
    records = sample_losses(model, dataset, "stage2_val", 4, pad, workers, "float32", journal)
    result = loss_summary(records)

    # by hand: each answer's loss from the model's own full-logit loss with only that
    # answer labelled, times its tokens
    total = tokens = 0
    by_kind = {"yes_no": [0.0, 0], "freeform": [0.0, 0]}
    for i, record in enumerate(records):
        batch = pad_batch([dataset[i]], pad)
        inputs, _ = split_counters(batch)
        labels = inputs.pop("labels")
        spans = assistant_spans(inputs["input_ids"][0].tolist(), builder.header, builder.end)
        assert [t["answer_type"] for t in record["turns"]] == ["yes_no", "freeform"]
        for (start, stop), turn in zip(spans, record["turns"], strict=True):
            alone = torch.full_like(labels, -100)
            alone[:, start:stop] = labels[:, start:stop]
            loss = float(model(**inputs, labels=alone).loss) * (stop - start)
            assert turn["tokens"] == stop - start
            assert turn["loss"] == pytest.approx(loss, rel=1e-5)
            by_kind[turn["answer_type"]][0] += loss
            by_kind[turn["answer_type"]][1] += stop - start
            total, tokens = total + loss, tokens + stop - start
    assert result["tokens"] == tokens and result["samples"] == 6
    assert result["skipped_samples"] == 0
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert "token-level mean" in result["reduction"]
    for kind, (loss, n) in by_kind.items():
        assert result["by_answer_type"][kind] == pytest.approx({"loss": loss / n, "tokens": n})
    assert result["by_family"]["success"] == result["by_answer_type"]["yes_no"]


def test_samples_that_fit_nothing_are_counted_as_skipped(tiny_setup, tiny_eval, tmp_path):
    model, builder, pad = tiny_eval
    short = SampleBuilder(builder.processor, builder.family, tiny_setup["images"], 4, 20)
    dataset = JsonlDataset(tiny_setup["stage1_val"], short, limit=3)
    journal = Journal(tmp_path / "progress.jsonl", "fingerprint")
    records = sample_losses(model, dataset, "stage1_val", 2, pad, 0, "float32", journal)
    assert [r["skipped"] for r in records] == [True] * 3
    assert loss_summary(records)["skipped_samples"] == 3


def eval_settings(**overrides):
    return {"seed": 0, "batch_size": 4, "generation_batch_size": 4, "dataloader_workers": 1,
            "loss_clips": 4, "answers_per_family": 3, "max_new_tokens": 6,
            **overrides}  # fmt: skip


def evaluate(tiny_setup, adapter, out, stages, evaluation, run="stage1"):
    return evaluate_run(
        adapter_dir=adapter, images_dir=tiny_setup["images"],
        val_jsonl={"stage1": tiny_setup["stage1_val"], "stage2": tiny_setup["stage2_val"]},
        outputs={"eval": out / "eval.json", "predictions": out / "predictions.jsonl",
                 "losses": out / "val_losses.jsonl"},
        model=run_settings(tiny_setup["model"])["model"], stages=stages,
        evaluation=evaluation, run=run,
    )  # fmt: skip


def test_eval_of_a_fixed_adapter_gives_the_same_numbers_twice(tiny_setup, tmp_path):
    settings = run_settings(tiny_setup["model"])
    adapter = train_tiny(tiny_setup, tmp_path, max_steps=3)
    stages = {"stage1": settings["stage"], "stage2": {**settings["stage"], "max_frames": 6}}
    before = (adapter / "adapter_model.safetensors").read_bytes()
    results = []
    for attempt in ("a", "b"):
        result = evaluate(tiny_setup, adapter, tmp_path / attempt, stages, eval_settings())
        result.pop("wall_seconds")
        results.append(result)
    assert results[0] == results[1]
    assert (adapter / "adapter_model.safetensors").read_bytes() == before  # eval never trains
    assert set(results[0]["loss"]) == {"stage1_val", "stage2_val"}
    assert results[0]["trained_formats"] == ["stage1"] and results[0]["resumed_records"] == 0
    formats = results[0]["answers"]["formats"]
    assert [formats[f]["frames"] for f in ("stage1", "stage2")] == [4, 6]
    predictions = [json.loads(x) for x in (tmp_path / "a" / "predictions.jsonl").open()]
    # 3 yes/no and 3 free-form questions; yes/no ones also on blank and other-clip frames
    asked = {(p["format"], p["condition"]) for p in predictions}
    assert len(predictions) == 2 * (6 + 3 + 3) and len(asked) == 6
    for p in predictions:
        assert {"question", "reference", "prediction", "family", "score", "video_id"} <= set(p)
        assert (p["frames_of"] != p["video_id"]) == (p["condition"] == "other_clip")
        # stage-2 format: the clip's earlier questions (here one pair before the second)
        assert p["history_turns"] == (int(p["id"][-1]) if p["format"] == "stage2" else 0)
    for name in ("predictions.jsonl", "val_losses.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert not (tmp_path / "a" / "eval_progress.jsonl").exists()  # removed once done
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(), flags=re.M))
    assert field_paths(results[0]) - documented == set()


DOCS = Path(__file__).parents[2] / "docs" / "eval_json.md"
# Keys named by the data, not by the code: docs/eval_json.md writes them as placeholders.
PLACEHOLDERS = {("loss",): "<set>", ("by_family",): "<family>", ("by_answer_type",): "<kind>",
                ("formats",): "<format>", ("groups",): "<group>",
                ("packages",): "<package>"}  # fmt: skip


def field_paths(value, prefix=()):
    """Every field of a nested dict as a dotted path, named keys as placeholders."""
    paths = {".".join(prefix)} if prefix else set()
    if isinstance(value, dict):
        placeholder = PLACEHOLDERS.get(prefix[-1:])
        for key, item in value.items():
            paths |= field_paths(item, (*prefix, placeholder or key))
    return paths


def test_a_killed_evaluation_resumes_after_its_last_batch(tiny_setup, tmp_path):
    settings = run_settings(tiny_setup["model"])
    stages = {"stage1": settings["stage"], "stage2": settings["stage"]}
    evaluation = eval_settings(generation_batch_size=2, batch_size=2, dataloader_workers=0)
    whole = evaluate(tiny_setup, None, tmp_path / "whole", stages, evaluation, run="base")

    out = tmp_path / "killed"
    script = (
        "import json, sys\n"
        "from test_evaluate import evaluate\n"
        "args = json.loads(sys.argv[1])\n"
        "evaluate({k: Path(v) for k, v in args['setup'].items()}, None, Path(args['out']),"
        " args['stages'], args['evaluation'], run='base')\n"
    )
    setup = {k: str(v) for k, v in tiny_setup.items()}
    argument = json.dumps({"setup": setup, "out": str(out), "stages": stages,
                           "evaluation": evaluation})  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", "from pathlib import Path\n" + script, argument],
        cwd=Path(__file__).parent,
    )
    progress = out / "eval_progress.jsonl"
    deadline = time.monotonic() + 300
    # header, the losses, and a few answer batches
    while not progress.exists() or progress.read_text().count('"answer"') < 6:
        assert process.poll() is None, "the evaluation ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "eval.json").exists()
    # whole batches only: a line cut short by the kill is not taken
    lines = progress.read_text().split("\n")[1:-1]
    kept = sum(len(json.loads(line)["batch"]) for line in lines)
    assert all(len(json.loads(line)["batch"]) <= 2 for line in lines)
    resumed = evaluate(tiny_setup, None, out, stages, evaluation, run="base")
    assert resumed["resumed_records"] == kept > 0
    for result in (whole, resumed):
        for key in ("wall_seconds", "resumed_records"):
            result.pop(key)
    assert resumed == whole
    for name in ("predictions.jsonl", "val_losses.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_the_journal_is_kept_only_for_the_same_numbers(tiny_setup):
    stages, inputs = {"stage1": {"max_frames": 4}}, [tiny_setup["stage1_val"]]
    model = run_settings(tiny_setup["model"])["model"]
    same = journal_fingerprint(model, stages, eval_settings(), inputs)
    assert journal_fingerprint(model, stages, eval_settings(dataloader_workers=3), inputs) == same
    for changed in (eval_settings(generation_batch_size=5), eval_settings(seed=1)):
        assert journal_fingerprint(model, stages, changed, inputs) != same
    other_kernel = {**model, "attn_implementation": "eager"}
    assert journal_fingerprint(other_kernel, stages, eval_settings(), inputs) != same
    assert journal_fingerprint(model, stages, eval_settings(), [tiny_setup["stage2_val"]]) != same


def test_a_journal_of_other_settings_is_not_resumed(tmp_path):
    journal = Journal(tmp_path / "progress.jsonl", "one")
    journal.append([{"key": ["answer", "stage1", "frames", "q"], "prediction": "yes"}])
    assert ["answer", "stage1", "frames", "q"] in Journal(tmp_path / "progress.jsonl", "one")
    with open(tmp_path / "progress.jsonl", "a") as handle:
        handle.write('{"key": ["answer", "stage1", "frames", "r"], "predic')  # a kill mid-write
    again = Journal(tmp_path / "progress.jsonl", "one")
    assert again.resumed == 1
    again.append([{"key": ["answer", "stage1", "frames", "r"], "prediction": "no"}])
    assert Journal(tmp_path / "progress.jsonl", "one").resumed == 2
    assert Journal(tmp_path / "progress.jsonl", "two").resumed == 0  # other settings: anew
    assert Journal(tmp_path / "progress.jsonl", "one").resumed == 0


def test_batched_left_padded_generation_answers_like_one_at_a_time(tiny_setup, tmp_path):
    adapter = train_tiny(tiny_setup, tmp_path, data="stage2", max_steps=6)
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    # prompts of different lengths: a padding mistake would change the answers
    rows = [json.loads(line) for line in tiny_setup["stage1_val"].read_text().splitlines()][:4]
    rows[1]["conversations"][0]["value"] += " and then some more words to make it longer"
    conversations = [json.loads(x) for x in tiny_setup["stage2_val"].read_text().splitlines()]
    asks = [(r, 0) for r in rows] + [(c, 1) for c in conversations[:2]]  # with history
    settings = {"budget": 500, "max_new_tokens": 6, "workers": 0, "dtype": "float32"}
    batched = [a for batch in answer_batches(model, builder, asks, batch_size=6, **settings)
               for a in batch]  # fmt: skip
    single = [next(answer_batches(model, builder, [a], batch_size=1, **settings))[0]
              for a in asks]  # fmt: skip
    assert batched == single and len(batched) == 6


def test_every_question_is_asked_in_both_formats_and_yes_no_ones_under_both_controls(
    tiny_setup,
):
    rows = answer_sample(tiny_setup["stage1_val"], per_group=3, seed=0)
    conversations = {json.loads(x)["video_id"]: json.loads(x)
                     for x in tiny_setup["stage2_val"].read_text().splitlines()}  # fmt: skip
    asks = questions_to_ask(rows, conversations, seed=0)
    keys = [tuple(a["key"]) for a in asks]
    assert len(keys) == len(set(keys)) == 2 * (6 + 3 + 3)
    for ask in asks:
        _, form, condition, question = ask["key"]
        row = ask["question"]
        assert row["id"] == question
        if form == "stage2":  # the clip's conversation, asked at this question's turn
            turns = ask["row"]["conversations"]
            assert turns[2 * ask["turn"]]["value"] == row["conversations"][0]["value"]
            assert ask["row"]["video_id"] == row["video_id"]
        else:
            assert ask["turn"] == 0 and ask["row"]["conversations"] == row["conversations"]
        own = conversations[row["video_id"]]["images"]
        assert (ask["row"]["images"] == own) == (condition != "other_clip")


def test_a_stage1_question_not_in_its_clips_conversation_is_refused(tiny_setup):
    rows = [json.loads(x) for x in tiny_setup["stage1_val"].read_text().splitlines()]
    conversation = json.loads(tiny_setup["stage2_val"].read_text().splitlines()[0])
    assert question_turn(rows[1], conversation) == 1
    wrong = {**rows[1], "id": rows[1]["id"][:-1] + "0"}
    with pytest.raises(ValueError, match=f"question {wrong['id']} is not question 0"):
        question_turn(wrong, conversation)


def test_the_other_clip_control_never_shows_a_clip_its_own_frames_and_keeps_the_family():
    rows = [
        {
            "id": f"{clip}-{task}",
            "video_id": clip,
            "images": [f"{clip}/15.jpg"],
            "task": task,
            "answer_type": "yes_no",
        }
        for clip in ("a", "b", "c", "d")
        for task in ("success", "affordance")
    ]
    rows.append(
        {
            "id": "e-success",
            "video_id": "e",
            "images": ["e/15.jpg"],
            "task": "success",
            "answer_type": "yes_no",
        }
    )
    rows.append(
        {
            "id": "lone",
            "video_id": "f",
            "images": ["f/15.jpg"],
            "task": "planning",
            "answer_type": "yes_no",
        }
    )  # a group of one clip
    swapped = other_clip_rows(rows, seed=0)
    assert set(swapped) == {r["id"] for r in rows} - {"lone"}
    for row in rows[:-1]:
        other = swapped[row["id"]]
        assert other["frames_of"] != row["video_id"]
        assert other["images"] == [f"{other['frames_of']}/15.jpg"]
        assert other["task"] == row["task"] and other["id"] == row["id"]
        same_family = {r["video_id"] for r in rows if score_group(r) == score_group(row)}
        assert other["frames_of"] in same_family
    # a derangement: within a family each clip's frames are shown exactly once
    success = [swapped[r["id"]]["frames_of"] for r in rows if r["task"] == "success"]
    assert sorted(success) == ["a", "b", "c", "d", "e"]
    assert other_clip_rows(rows, seed=0) == swapped
