import json
import math

import pytest
import sacrebleu
from peft import PeftModel
from training_helpers import run_settings, train_tiny

from robovqa_ft.evaluate import (
    answer_sample,
    evaluate_run,
    generate_answers,
    normalize,
    other_clip_rows,
    score_group,
    score_predictions,
    sentence_bleu,
    val_loss,
    yes_no,
)
from robovqa_ft.model import attach_lora, load_model, load_processor, model_family
from robovqa_ft.samples import (
    JsonlDataset,
    SampleBuilder,
    clip_order,
    pad_batch,
    split_counters,
)


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
    return {"group": group, "answer_type": answer_type, "reference": reference,
            "prediction": said, "blank_frames_prediction": blank,
            "other_clip_prediction": other}  # fmt: skip


def test_perfect_and_empty_predictions_score_at_the_extremes():
    perfect = score_predictions([
        prediction("success", "yes", "Yes.", "no", "yes_no", other="no"),
        prediction("success", "no", "no", "no", "yes_no", other=None),  # no other clip
        prediction("planning", "put the cup in the bin", "put the cup in the bin"),
    ])  # fmt: skip
    assert perfect["groups"]["success"] == {
        "n": 2, "majority_rate": 0.5, "accuracy": 1.0, "invalid_rate": 0.0,
        "blank_frames_accuracy": 0.5, "other_clip_accuracy": 0.0, "other_clip_n": 1,
    }  # fmt: skip
    assert perfect["macro"]["other_clip_yes_no_accuracy"] == 0.0
    assert perfect["groups"]["planning"]["bleu"] == pytest.approx(100)
    assert perfect["groups"]["planning"]["exact_match"] == 1.0

    empty = score_predictions([
        prediction("success", "yes", "", "", "yes_no"),
        prediction("planning", "put the cup in the bin", ""),
    ])  # fmt: skip
    assert empty["groups"]["success"]["accuracy"] == 0.0
    assert empty["groups"]["success"]["invalid_rate"] == 1.0
    assert empty["groups"]["planning"] == {"n": 1, "bleu": 0.0, "exact_match": 0.0}
    assert empty["macro"]["yes_no_accuracy"] == 0.0 and empty["macro"]["bleu"] == 0.0


def test_macro_average_weighs_each_group_equally():
    scores = score_predictions([
        prediction("success", "yes", "yes", "yes", "yes_no"),
        prediction("affordance_discriminative", "yes", "no", "no", "yes_no"),
        prediction("affordance_discriminative", "no", "no", "no", "yes_no"),
        prediction("affordance_discriminative", "no", "no", "no", "yes_no"),
    ])  # fmt: skip
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


@pytest.mark.parametrize("workers", [0, 2])
def test_val_loss_is_the_token_mean_of_the_training_loss(tiny_setup, workers):
    model = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    model = attach_lora(model, 8, 16, 0.0).eval()
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    dataset = JsonlDataset(tiny_setup["stage2_val"], builder, limit=6)
    pad = processor.tokenizer.pad_token_id
    result = val_loss(model, dataset, batch_size=4, pad_id=pad, workers=workers, dtype="float32")

    # by hand: each sample's mean loss from the model's own full-logit loss, weighted by
    # its tokens
    total = tokens = 0
    for i in range(len(dataset)):
        batch = pad_batch([dataset[i]], pad)
        n = int((batch["labels"][:, 1:] != -100).sum())
        inputs, _ = split_counters(batch)
        total += float(model(**inputs).loss) * n
        tokens += n
    assert result["tokens"] == tokens and result["samples"] == 6
    assert result["skipped_samples"] == 0
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert "token-level mean" in result["reduction"]


def test_eval_of_a_fixed_adapter_gives_the_same_numbers_twice(tiny_setup, tmp_path):
    settings = run_settings(tiny_setup["model"])
    adapter = train_tiny(tiny_setup, tmp_path, max_steps=3)
    stages = {"stage1": settings["stage"], "stage2": settings["stage"]}
    evaluation = {"seed": 0, "batch_size": 4, "generation_batch_size": 4,
                  "dataloader_workers": 1, "loss_clips": 4, "answers_per_family": 3,
                  "max_new_tokens": 6}  # fmt: skip
    before = (adapter / "adapter_model.safetensors").read_bytes()
    results = []
    for attempt in ("a", "b"):
        result = evaluate_run(
            adapter_dir=adapter, images_dir=tiny_setup["images"],
            val_jsonl={"stage1": tiny_setup["stage1_val"], "stage2": tiny_setup["stage2_val"]},
            eval_path=tmp_path / attempt / "eval.json",
            predictions_path=tmp_path / attempt / "predictions.jsonl",
            model=settings["model"], stages=stages, evaluation=evaluation, run="stage1",
        )  # fmt: skip
        result.pop("wall_seconds")
        results.append(result)
    assert results[0] == results[1]
    assert (adapter / "adapter_model.safetensors").read_bytes() == before  # eval never trains
    assert set(results[0]["loss"]) == {"stage1_val", "stage2_val"}
    predictions = (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 6
    row = json.loads(predictions[0])
    assert {"question", "reference", "prediction", "family"} <= set(row)
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (
        tmp_path / "b" / "predictions.jsonl"
    ).read_text()


def test_batched_left_padded_generation_answers_like_one_at_a_time(tiny_setup, tmp_path):
    adapter = train_tiny(tiny_setup, tmp_path, data="stage2", max_steps=6)
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    # prompts of different lengths: a padding mistake would change the answers
    rows = [json.loads(line) for line in tiny_setup["stage1_val"].read_text().splitlines()][:6]
    rows[1]["conversations"][0]["value"] += " and then some more words to make it longer"
    settings = {"max_new_tokens": 6, "workers": 0, "dtype": "float32"}
    batched = generate_answers(model, builder, rows, batch_size=6, **settings)
    single = [generate_answers(model, builder, [r], batch_size=1, **settings)[0] for r in rows]
    assert batched == single


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
