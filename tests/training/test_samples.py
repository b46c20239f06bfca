"""Sample building and collation: frames, image tokens, labels on answers only, truncation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from robovqa_ft.training.attention import BRANCH, REAL, SEGMENT, model_inputs, visibility
from robovqa_ft.training.collate import (
    PREDICTING,
    collator,
    pack_batch,
    pad_batch,
    predicting_positions,
    split_counters,
)
from robovqa_ft.training.families import FAMILIES
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.random_model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tiny_internvl,
)
from robovqa_ft.training.samples import IGNORE_INDEX, JsonlDataset, SampleBuilder, frame_indices
from robovqa_ft.training.steps import StepSampler

FRAMES = 16
TOKENS_PER_FRAME = 4  # tiny InternVL: 56 px tile -> 4 image tokens
STAGE2_PAIRS = {
    "clip-a": [
        ("put cup Q: satisfied?", "yes"),
        ("Q: what just happened?", "pick up the cup"),
        ("Q: what is next?", "place the cup on the table"),
        ("Q: is the table clean?", "no"),
    ],
    "clip-b": [
        ("open drawer Q: satisfied?", "no"),
        ("Q: what is the robot holding?", "a blue sponge"),
        ("Q: what just happened?", "open the drawer"),
    ],
}


def frame_colour(index: int) -> tuple[int, int, int]:
    """A different solid colour per frame index, so the frames' order shows in pixel_values."""
    return (index * 16, 240 - index * 16, 128)


def stage1_row(video_id: str, question: str, answer: str) -> dict:
    return {
        "id": f"{video_id}-0",
        "video_id": video_id,
        "images": [f"{video_id}/{i:02d}.jpg" for i in range(FRAMES)],
        "task": "success",
        "answer_type": "yes_no",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def stage2_row(video_id: str, pairs: list[tuple[str, str]]) -> dict:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {
        "id": video_id,
        "video_id": video_id,
        "images": [f"{video_id}/{i:02d}.jpg" for i in range(FRAMES)],
        "task": "multi",
        "conversations": turns,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Frames of two clips, stage-1 and stage-2 rows, and their JSONL files."""
    root = tmp_path_factory.mktemp("samples")
    for video_id in STAGE2_PAIRS:
        (root / "images" / video_id).mkdir(parents=True)
        for i in range(FRAMES):
            Image.new("RGB", (288, 288), frame_colour(i)).save(
                root / "images" / video_id / f"{i:02d}.jpg"
            )
    stage1 = [
        stage1_row("clip-a", "put cup Q: satisfied?", "yes"),
        stage1_row("clip-b", "open drawer Q: satisfied?", "no"),
    ]
    stage2 = [stage2_row(video_id, pairs) for video_id, pairs in STAGE2_PAIRS.items()]
    paths = []
    for name, rows in (("stage1", stage1), ("stage2", stage2)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return {"root": root, "images": root / "images", "stage1": stage1, "stage2": stage2,
            "jsonl": paths}  # fmt: skip


@pytest.fixture(scope="module")
def internvl(data) -> dict:
    out_dir = data["root"] / "tiny-internvl"
    build_tiny_internvl(out_dir, data["jsonl"])
    processor = load_processor(out_dir)
    tokenizer = processor.tokenizer
    return {
        "processor": processor,
        "family": FAMILIES["internvl"],
        "context": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        "img": tokenizer.convert_tokens_to_ids("<img>"),
        "im_start": tokenizer.convert_tokens_to_ids("<|im_start|>"),
        "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }


@pytest.fixture(scope="module")
def qwen_processor(data) -> Qwen2_5_VLProcessor:
    """A tiny Qwen2.5-VL processor: BPE tokenizer trained on the rows, 60 px frames."""
    texts = [turn["value"] for row in data["stage1"] + data["stage2"]
             for turn in row["conversations"]]  # fmt: skip
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=QWEN_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # max_pixels 60×60: a 288 px frame is resized to 56 px = 4×4 patches = 2×2 merged tokens.
    pixels = {"min_pixels": 56 * 56, "max_pixels": 60 * 60}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        ),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def internvl_builder(data, internvl, max_frames=4, max_seq_len=2048, **kwargs) -> SampleBuilder:
    return SampleBuilder(internvl["processor"], internvl["family"], data["images"],
                         max_frames=max_frames, max_seq_len=max_seq_len, **kwargs)  # fmt: skip


def labelled_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of each contiguous run of labelled positions."""
    runs, start = [], None
    for i, label in enumerate([*labels.tolist(), IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def positions(ids: torch.Tensor, token_id: int) -> list[int]:
    return (ids == token_id).nonzero().flatten().tolist()


def chat_turns(text: str) -> list[tuple[str, str, bool]]:
    """(role, text, holds frames) of each turn of a decoded tiny-InternVL prompt; the
    text without the frames that open it."""
    turns = []
    for piece in text.split("<|im_start|>")[1:]:
        role, content = piece.removesuffix("<|im_end|>\n").split("\n", 1)
        turns.append((role, content.rpartition("</img>\n")[2], "<img>" in content))
    return turns


# --- frame_indices ---


@pytest.mark.parametrize("count", [4, 10])
def test_frame_indices_spread_evenly_from_first_to_last_frame(count):
    indices = frame_indices(16, count)
    assert len(indices) == count
    assert indices[0] == 0 and indices[-1] == 15
    gaps = [b - a for a, b in zip(indices, indices[1:], strict=False)]
    assert all(gap > 0 for gap in gaps)
    assert max(gaps) - min(gaps) <= 1


def test_frame_indices_single_frame_is_the_last_one():
    assert frame_indices(16, 1) == [15]


@pytest.mark.parametrize("count", [16, 20])
def test_frame_indices_take_every_frame_when_asking_for_as_many_or_more(count):
    assert frame_indices(16, count) == list(range(16))


# --- InternVL samples ---


def test_internvl_stage1_sample_has_one_tile_and_four_tokens_per_frame(data, internvl):
    sample = internvl_builder(data, internvl).encode(data["stage1"][0])
    ids = sample["input_ids"]
    assert len(positions(ids, internvl["context"])) == 4 * TOKENS_PER_FRAME
    assert len(positions(ids, internvl["img"])) == 4
    assert sample["pixel_values"].shape == (4, 3, 56, 56)  # no thumbnail, no extra tiles
    assert sample["dropped_turns"] == 0


def test_internvl_prompt_numbers_the_frames_in_order(data, internvl):
    sample = internvl_builder(data, internvl).encode(data["stage1"][0])
    text = internvl["processor"].tokenizer.decode(sample["input_ids"])
    starts = [text.find(f"Frame{n}: <img>") for n in range(1, 5)]
    assert all(start >= 0 for start in starts), text
    assert starts == sorted(starts)
    assert "Frame5:" not in text


def test_internvl_tiles_are_the_sampled_frames_in_prompt_order(data, internvl):
    sample = internvl_builder(data, internvl).encode(data["stage1"][0])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    colours = ((sample["pixel_values"] * std + mean) * 255).mean(dim=(2, 3))
    expected = torch.tensor([frame_colour(i) for i in frame_indices(16, 4)], dtype=torch.float)
    torch.testing.assert_close(colours, expected, atol=4.0, rtol=0)


def test_internvl_stage1_labels_only_the_answer_and_its_turn_end(data, internvl):
    sample = internvl_builder(data, internvl).encode(data["stage1"][0])
    ids, labels = sample["input_ids"], sample["labels"]
    assert labels.shape == ids.shape
    runs = labelled_runs(labels)
    assert len(runs) == 1
    start, stop = runs[0]
    assert torch.equal(labels[start:stop], ids[start:stop])
    assert internvl["processor"].tokenizer.decode(ids[start:stop]) == "yes<|im_end|>"
    # Nothing of the prompt: every image token and the assistant header come before it.
    assert max(positions(ids, internvl["context"])) < start
    assert max(positions(ids, internvl["im_start"])) < start
    assert stop == len(ids)


def test_internvl_stage2_labels_each_answer_and_never_a_question(data, internvl):
    row = data["stage2"][0]
    sample = internvl_builder(data, internvl, max_frames=10).encode(row)
    ids, labels = sample["input_ids"], sample["labels"]
    tokenizer = internvl["processor"].tokenizer
    runs = labelled_runs(labels)
    answers = [answer for _, answer in STAGE2_PAIRS[row["video_id"]]]
    assert [tokenizer.decode(ids[a:b]) for a, b in runs] == [f"{x}<|im_end|>" for x in answers]
    assert all(torch.equal(labels[a:b], ids[a:b]) for a, b in runs)
    labelled_text = "".join(tokenizer.decode(ids[a:b]) for a, b in runs)
    for question, _ in STAGE2_PAIRS[row["video_id"]]:
        assert question not in labelled_text
    # All 10 frames open the first human turn, before any answer.
    image_positions = positions(ids, internvl["context"])
    assert len(image_positions) == 10 * TOKENS_PER_FRAME
    assert max(image_positions) < positions(ids, internvl["im_end"])[0] < runs[0][0]
    assert sample["dropped_turns"] == 0


@pytest.mark.parametrize("kept", [1, 2])
def test_truncation_drops_whole_trailing_turns_and_keeps_every_image(data, internvl, kept):
    row = data["stage2"][0]
    pairs = len(row["conversations"]) // 2
    full = internvl_builder(data, internvl, max_frames=10).encode(row)
    runs = labelled_runs(full["labels"])
    # One token short of the next answer's end: that answer cannot fit.
    max_seq_len = runs[kept][1] - 1
    sample = internvl_builder(data, internvl, max_frames=10, max_seq_len=max_seq_len).encode(row)
    ids = sample["input_ids"]
    assert len(ids) == runs[kept - 1][1] <= max_seq_len
    assert ids[-1] == internvl["im_end"]
    assert torch.equal(ids, full["input_ids"][: len(ids)])
    assert torch.equal(sample["attention_mask"], full["attention_mask"][: len(ids)])
    assert torch.equal(sample["labels"], full["labels"][: len(ids)])
    assert len(labelled_runs(sample["labels"])) == kept
    assert len(positions(ids, internvl["context"])) == 10 * TOKENS_PER_FRAME
    assert torch.equal(sample["pixel_values"], full["pixel_values"])
    assert sample["dropped_turns"] == pairs - kept


def test_sample_is_none_when_not_even_the_first_answer_fits(data, internvl):
    row = data["stage2"][0]
    full = internvl_builder(data, internvl, max_frames=10).encode(row)
    image_prefix = max(positions(full["input_ids"], internvl["context"])) + 1
    first_answer_end = labelled_runs(full["labels"])[0][1]
    for max_seq_len in (image_prefix - 1, first_answer_end - 1):
        builder = internvl_builder(data, internvl, max_frames=10, max_seq_len=max_seq_len)
        assert builder.encode(row) is None
    # a micro-batch of such samples is a stand-in, not an error (see the test below)
    assert split_counters(pad_batch([None, None], pad_token_id=0))[1]["skipped_samples"] == 2


def test_blank_frames_change_pixels_but_not_tokens(data, internvl):
    row = data["stage2"][1]
    real = internvl_builder(data, internvl).encode(row)
    blank = internvl_builder(data, internvl, blank_frames=True).encode(row)
    assert torch.equal(blank["input_ids"], real["input_ids"])
    assert torch.equal(blank["labels"], real["labels"])
    assert blank["pixel_values"].shape == real["pixel_values"].shape
    assert not torch.allclose(blank["pixel_values"], real["pixel_values"])
    # Every blank frame is the same (black) picture.
    tiles = blank["pixel_values"]
    assert torch.equal(tiles, tiles[:1].expand_as(tiles))


# --- generation prompts ---


@pytest.mark.parametrize("turn", range(4))
def test_prompt_for_turn_k_is_the_earlier_pairs_then_its_question_and_the_header(
    data, internvl, turn
):
    row, pairs = data["stage2"][0], STAGE2_PAIRS["clip-a"]
    builder = internvl_builder(data, internvl)
    prompt = builder.encode_prompt(row, turn=turn)
    text = internvl["processor"].tokenizer.decode(prompt["input_ids"])
    history = [t for q, a in pairs[:turn] for t in (("user", q, False), ("assistant", a, False))]
    expected = [*history, ("user", pairs[turn][0], False), ("assistant", "", False)]
    expected[0] = (*expected[0][:2], True)  # the frames open the first question
    assert chat_turns(text) == expected
    assert text.endswith(f"{pairs[turn][0]}<|im_end|>\n<|im_start|>assistant\n")
    assert not any(question in text for question, _ in pairs[turn + 1 :])
    # The training sample cut just after the header of this turn's answer.
    full = builder.encode(row)
    start = labelled_runs(full["labels"])[turn][0]
    assert torch.equal(prompt["input_ids"], full["input_ids"][:start])
    assert torch.equal(prompt["attention_mask"], full["attention_mask"][:start])
    assert torch.equal(prompt["pixel_values"], full["pixel_values"])
    assert prompt["dropped_turns"] == 0


def test_first_question_prompt_is_unchanged_by_turn_and_budget_arguments(data, internvl):
    builder = internvl_builder(data, internvl)
    for row in data["stage1"] + data["stage2"]:
        full = builder.encode(row)
        start = labelled_runs(full["labels"])[0][0]
        for prompt in (
            builder.encode_prompt(row),
            builder.encode_prompt(row, turn=0),
            builder.encode_prompt(row, turn=0, budget=1),  # no history to drop
        ):
            assert prompt.keys() == {"input_ids", "attention_mask", "pixel_values", "dropped_turns"}
            assert torch.equal(prompt["input_ids"], full["input_ids"][:start])
            assert torch.equal(prompt["pixel_values"], full["pixel_values"])
            assert prompt["dropped_turns"] == 0


def clip_a_prompt(builder: SampleBuilder, turn: int, history: int) -> dict:
    """The prompt for clip-a's `turn`-th question of a row that never had the pairs before
    its last `history`: what dropping them must give."""
    pairs = STAGE2_PAIRS["clip-a"][turn - history : turn + 1]
    return builder.encode_prompt(stage2_row("clip-a", pairs), turn=history)


@pytest.mark.parametrize("kept", [0, 1, 2])
def test_prompt_over_budget_drops_the_oldest_pairs_and_opens_with_the_frames(data, internvl, kept):
    row, pairs, turn = data["stage2"][0], STAGE2_PAIRS["clip-a"], 3
    builder = internvl_builder(data, internvl)
    fits, too_long = clip_a_prompt(builder, turn, kept), clip_a_prompt(builder, turn, kept + 1)
    budget = len(too_long["input_ids"]) - 1
    assert builder.history_that_fits(row, turn, budget) == kept
    assert builder.history_that_fits(row, turn, len(fits["input_ids"])) == kept
    prompt = builder.encode_prompt(row, turn=turn, budget=budget)
    ids = prompt["input_ids"]
    assert len(ids) <= budget
    assert torch.equal(ids, fits["input_ids"])  # the newest `kept` pairs, then the question
    assert torch.equal(prompt["pixel_values"], fits["pixel_values"])
    assert prompt["dropped_turns"] == turn - kept
    turns = chat_turns(internvl["processor"].tokenizer.decode(ids))
    assert turns[0] == ("user", pairs[turn - kept][0], True)
    assert [holds_frames for *_, holds_frames in turns[1:]] == [False] * (len(turns) - 1)
    assert len(positions(ids, internvl["context"])) == 4 * TOKENS_PER_FRAME
    batch = pad_batch([prompt, builder.encode_prompt(row, turn=turn)], 0, side="left")
    assert batch["dropped_turns"] == turn - kept


def test_prompt_keeps_the_whole_question_when_it_alone_exceeds_the_budget(data, internvl):
    row, turn = data["stage2"][0], 3
    builder = internvl_builder(data, internvl)
    alone = clip_a_prompt(builder, turn, 0)
    for budget in (1, len(alone["input_ids"]) - 1):
        assert builder.history_that_fits(row, turn, budget) == 0
        prompt = builder.encode_prompt(row, turn=turn, budget=budget)
        assert torch.equal(prompt["input_ids"], alone["input_ids"])
        assert prompt["dropped_turns"] == turn
    # the same from max_seq_len, the default budget
    short = internvl_builder(data, internvl, max_seq_len=len(alone["input_ids"]) - 1)
    assert torch.equal(short.encode_prompt(row, turn=turn)["input_ids"], alone["input_ids"])


def test_history_that_fits_decodes_no_frame_once_a_frames_tokens_are_known(
    data, internvl, monkeypatch
):
    row, turn, budgets = data["stage2"][0], 3, range(40, 240, 5)
    learnt_here = internvl_builder(data, internvl)
    kept = [learnt_here.history_that_fits(row, turn, b) for b in budgets]  # learns from `row`
    learnt_by_lengths = internvl_builder(data, internvl)
    learnt_by_lengths.token_lengths(data["stage1"])

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was opened")

    monkeypatch.setattr("robovqa_ft.training.samples.Image.open", no_decoding)
    assert [learnt_here.history_that_fits(row, turn, b) for b in budgets] == kept
    assert [learnt_by_lengths.history_that_fits(row, turn, b) for b in budgets] == kept
    assert sorted(set(kept)) == [0, 1, 2, 3]
    assert kept == sorted(kept)


def test_prompt_for_a_question_the_row_lacks_is_an_error(data, internvl):
    builder = internvl_builder(data, internvl)
    for row, turn in ((data["stage2"][0], 4), (data["stage1"][0], 1), (data["stage1"][0], -1)):
        with pytest.raises(ValueError, match=f"row {row['id']}: no question {turn}"):
            builder.encode_prompt(row, turn=turn)
        with pytest.raises(ValueError):
            builder.history_that_fits(row, turn)


# --- pad_batch ---


def test_pad_batch_right_pads_and_concatenates_tiles(data, internvl):
    row_a, row_b = data["stage2"]
    full_a = internvl_builder(data, internvl).encode(row_a)
    full_b = internvl_builder(data, internvl).encode(row_b)
    # Different truncations, so the lengths and the dropped turns differ (1 and 2).
    fit_a, fit_b = labelled_runs(full_a["labels"])[2][1], labelled_runs(full_b["labels"])[0][1]
    a = internvl_builder(data, internvl, max_seq_len=fit_a).encode(row_a)
    b = internvl_builder(data, internvl, max_seq_len=fit_b).encode(row_b)
    assert (a["dropped_turns"], b["dropped_turns"]) == (1, 2)
    pad_id = internvl["processor"].tokenizer.pad_token_id
    batch = pad_batch([a, None, b], pad_token_id=pad_id)
    long, short = len(a["input_ids"]), len(b["input_ids"])
    assert long > short
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long)
    assert batch["attention_mask"].shape == (2, long)
    assert torch.equal(batch["input_ids"][0], a["input_ids"])
    assert torch.equal(batch["input_ids"][1, :short], b["input_ids"])
    assert torch.equal(batch["labels"][1, :short], b["labels"])
    assert (batch["input_ids"][1, short:] == pad_id).all()
    assert (batch["attention_mask"][1, short:] == 0).all()
    assert (batch["attention_mask"][1, :short] == 1).all()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (8, 3, 56, 56)
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
    counters = split_counters(batch)[1]
    assert counters == {"samples": 2, "dropped_turns": 3, "skipped_samples": 1,  # the None
                        "real_tokens": long + short, "computed_tokens": 2 * long, "trees": 0,
                        "prefix_tokens_saved": 0}  # fmt: skip
    assert_counts_and_positions_stay_on_the_host(batch)


def assert_counts_and_positions_stay_on_the_host(batch: dict) -> None:
    """Counts as Python ints (the Trainer moves only tensors to the GPU) and the positions
    that predict a label as flat CPU indices, one per labelled token (but a row's first)."""
    assert all(type(n) is int for n in split_counters(batch)[1].values())
    positions, labels = batch[PREDICTING], batch["labels"]
    assert positions.device.type == "cpu" and positions.dtype == torch.long
    assert len(positions) == int((labels[:, 1:] != IGNORE_INDEX).sum()) > 0
    assert (labels.flatten()[positions + 1] != IGNORE_INDEX).all()


def test_predicting_positions_are_flat_indices_of_the_positions_before_each_label():
    unlabelled = IGNORE_INDEX
    labels = torch.tensor([[unlabelled, unlabelled, 5, 6, unlabelled, 7],
                           [9, 8, unlabelled, unlabelled, unlabelled, unlabelled]])  # fmt: skip
    # a row's first label (9) is predicted by nothing: not by the row above's last position
    assert predicting_positions(labels).tolist() == [1, 2, 4, 6]


# --- length grouping and padding-free packing ---


@pytest.mark.parametrize("max_frames", [4, 10])
def test_token_lengths_from_text_alone_equal_the_encoded_lengths(data, internvl, max_frames):
    builder = internvl_builder(data, internvl, max_frames=max_frames)
    rows = data["stage1"] + data["stage2"]
    encoded = [len(builder.encode(row)["input_ids"]) for row in rows]
    assert builder.token_lengths(rows) == encoded
    assert len(set(encoded)) > 1
    dataset = JsonlDataset(data["jsonl"][1], builder)
    assert dataset.token_lengths(chunk=1) == encoded[2:]


def test_token_lengths_are_capped_at_max_seq_len(data, internvl):
    builder = internvl_builder(data, internvl, max_seq_len=30)
    assert builder.token_lengths(data["stage2"]) == [30, 30]


def test_qwen_token_lengths_equal_the_encoded_lengths(data, qwen_processor):
    builder = qwen_builder(data, qwen_processor)
    rows = data["stage1"] + data["stage2"]
    assert builder.token_lengths(rows) == [len(builder.encode(r)["input_ids"]) for r in rows]


def test_grouped_sampler_sorts_within_each_step_and_reshuffles_per_epoch():
    lengths = [(i * 37) % 101 for i in range(40)]
    sampler = StepSampler(40, step_size=8, seed=3, lengths=lengths)
    first = list(sampler)
    assert sorted(first) == list(range(40))
    steps = [first[i : i + 8] for i in range(0, 40, 8)]
    for step in steps:
        assert [lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True)
    # steps are random draws, not runs of similar lengths
    assert len({max(lengths[i] for i in step) for step in steps}) > 1
    assert list(StepSampler(40, 8, seed=3, lengths=lengths)) == first  # same seed, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(40)) and second != first
    resumed = StepSampler(40, 8, seed=3, lengths=lengths)
    resumed.set_epoch(1)
    assert list(resumed) == second  # a resumed run sees the same epoch order


def test_sampler_drops_the_remainder_of_less_than_one_step_afresh_each_epoch():
    sampler = StepSampler(45, step_size=8, seed=0)
    assert len(sampler) == 40 and sampler.steps == 5
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(set(order)) == 40 and set(order) <= set(range(45))
        epochs.append(set(range(45)) - set(order))
    assert len({frozenset(left_out) for left_out in epochs}) > 1  # not always the same 5


def test_pack_batch_lays_samples_end_to_end_with_restarting_positions(data, internvl):
    builder = internvl_builder(data, internvl)
    a, b = builder.encode(data["stage2"][0]), builder.encode(data["stage1"][1])
    batch = pack_batch([a, None, b])
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (1, n_a + n_b)
    assert "attention_mask" not in batch  # made on the device, from:
    mask = visibility(batch[SEGMENT], batch[BRANCH], batch[REAL])[0, 0]
    assert mask.shape == (n_a + n_b, n_a + n_b)
    assert mask[:n_a, :n_a].equal(torch.ones(n_a, n_a, dtype=torch.bool).tril())
    assert not mask[n_a:, :n_a].any() and not mask[:n_a, n_a:].any()
    assert "attention_mask" not in pack_batch([a, b], masked=False)  # flash: positions alone
    assert torch.equal(batch["input_ids"][0], torch.cat([a["input_ids"], b["input_ids"]]))
    positions = batch["position_ids"][0]
    assert torch.equal(positions, torch.cat([torch.arange(n_a), torch.arange(n_b)]))
    # each sample's first label is ignored (it already is: the row opens a user turn)
    assert batch["labels"][0, 0] == batch["labels"][0, n_a] == IGNORE_INDEX
    assert torch.equal(batch["labels"][0, :n_a], a["labels"])
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
    counters = split_counters(batch)[1]
    assert counters == {"samples": 2, "dropped_turns": 0, "skipped_samples": 1,
                        "real_tokens": n_a + n_b, "computed_tokens": n_a + n_b, "trees": 0,
                        "prefix_tokens_saved": 0}  # fmt: skip
    assert_counts_and_positions_stay_on_the_host(batch)
    padded = pad_batch([a, b], pad_token_id=internvl["processor"].tokenizer.pad_token_id)
    counters = split_counters(padded)[1]
    assert (counters["real_tokens"], counters["computed_tokens"]) == (n_a + n_b, 2 * max(n_a, n_b))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(data, internvl, attention):
    """The same samples give the same summed and mean loss packed as padded, and the
    same gradients: packed samples never see each other."""
    torch.manual_seed(0)
    model = load_model(data["root"] / "tiny-internvl", "none", "float32", attention, False)
    model = attach_lora(model, 8, 16, 0.0)
    lora = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA starts as a no-op; make it act so its gradients mean something
        for p in lora:
            p.normal_(0, 0.05)
    builder = internvl_builder(data, internvl)
    samples = [builder.encode(row) for row in data["stage2"] + data["stage1"]]
    pad_id = internvl["processor"].tokenizer.pad_token_id

    def loss_and_grads(batch, **kwargs):
        model.zero_grad()
        loss = model(**model_inputs(model, split_counters(batch)[0]), **kwargs).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in lora]

    padded, padded_grads = loss_and_grads(pad_batch(samples, pad_id))
    packed, packed_grads = loss_and_grads(pack_batch(samples))
    assert packed == pytest.approx(padded, rel=1e-5)
    for g_packed, g_padded in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-6)
    summed = loss_and_grads(pack_batch(samples), num_items_in_batch=1)[0]
    assert summed == pytest.approx(
        loss_and_grads(pad_batch(samples, pad_id), num_items_in_batch=1)[0], rel=1e-5
    )

    # The control: one causal mask over the row lets samples attend to each other. (Running
    # positions alone would change nothing: under the mask a sample shifted whole is the
    # same to rotary attention, which sees only distances.)
    leaky = pack_batch(samples)
    leaky[SEGMENT] = torch.zeros_like(leaky[SEGMENT])
    assert loss_and_grads(leaky)[0] != pytest.approx(padded, rel=1e-3)


# --- Qwen2.5-VL samples ---


def qwen_builder(data, processor) -> SampleBuilder:
    return SampleBuilder(processor, FAMILIES["qwen2_5_vl"], data["images"],
                         max_frames=4, max_seq_len=2048)  # fmt: skip


def test_qwen_stage1_sample_has_merged_image_tokens_and_labels_the_answer(data, qwen_processor):
    sample = qwen_builder(data, qwen_processor).encode(data["stage1"][0])
    tokenizer = qwen_processor.tokenizer
    ids = sample["input_ids"]
    grid = sample["image_grid_thw"]
    assert grid.shape == (4, 3)
    image_pads = len(positions(ids, tokenizer.convert_tokens_to_ids("<|image_pad|>")))
    assert image_pads == grid.prod(-1).sum().item() // 4 == 4 * 4
    assert len(positions(ids, tokenizer.convert_tokens_to_ids("<|vision_start|>"))) == 4
    assert sample["pixel_values"].shape[0] == grid.prod(-1).sum().item()
    runs = labelled_runs(sample["labels"])
    assert len(runs) == 1
    assert tokenizer.decode(ids[runs[0][0] : runs[0][1]]) == "yes<|im_end|>"
    assert sample["dropped_turns"] == 0


def test_qwen_pad_batch_concatenates_patches_and_grids(data, qwen_processor):
    builder = qwen_builder(data, qwen_processor)
    a, b = builder.encode(data["stage1"][0]), builder.encode(data["stage2"][1])
    batch = pad_batch([a, b], pad_token_id=qwen_processor.tokenizer.pad_token_id)
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], b["pixel_values"]]))
    grids = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    assert torch.equal(batch["image_grid_thw"], grids)
    assert batch["image_grid_thw"].shape == (8, 3)
    length = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, length)


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_a_micro_batch_in_which_nothing_fits_becomes_one_that_teaches_nothing(padding):
    batch = collator(padding, pad_token_id=7)([None, None, None])
    inputs, counters = split_counters(batch)
    assert counters == {"samples": 0, "dropped_turns": 0, "skipped_samples": 3,
                        "real_tokens": 1, "computed_tokens": 1, "trees": 0,
                        "prefix_tokens_saved": 0}  # fmt: skip
    assert inputs["input_ids"].tolist() == [[7]]
    assert (inputs["labels"] == IGNORE_INDEX).all()
    assert batch[PREDICTING].tolist() == []
