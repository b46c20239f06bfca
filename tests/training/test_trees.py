"""Stage 1's one-pass layout: each question's loss and gradient from a tree are its separate
sample's, on the tiny InternVL (1-D positions) and tiny Qwen2.5-VL / Qwen3-VL (3-D), fp32;
the Qwen-VLs with their frames as one video (and Qwen3-VL's timestamps in the prefix) and
as images.

The controls that make these tests able to fail were run by breaking the code on purpose:
a mask that lets branches see each other (`attention.visibility` without its branch
term), and branch positions that run on instead of continuing from the prefix; each
made the equality tests below fail (docs/performance.md §7, "Stage 1 in one pass a clip").
"""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import BatchSampler
from training_helpers import csv_rows, train_tiny, with_unfit_rows
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from robovqa_ft.evaluation.journal import Journal
from robovqa_ft.evaluation.val_losses import loss_summary, sample_losses
from robovqa_ft.training.attention import BRANCH, SEGMENT, model_inputs
from robovqa_ft.training.collate import collator, split_counters
from robovqa_ft.training.families import family_of, model_family
from robovqa_ft.training.loss import labelled_token_losses
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.random_model import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS
from robovqa_ft.training.samples import IGNORE_INDEX, JsonlDataset, SampleBuilder
from robovqa_ft.training.steps import ClipStepSampler
from robovqa_ft.training.trees import ClipTrees, build_tree, clip_trees, shared_prefix

QUESTIONS = [
    ("put cup Q: satisfied?", "yes"),
    ("Q: what just happened?", "pick up the cup"),
    ("Q: what just happened? satisfied?", "no"),
    ("put cup Q: what just happened?", "put the cup"),
    ("put cup Q: satisfied?", "no"),  # the first question again, answered otherwise
]


def clip_rows(images: list[str], video_id: str, count: int) -> list[dict]:
    return [
        {"id": f"{video_id}-{k}", "video_id": video_id, "images": images,
         "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for k, (q, a) in enumerate(QUESTIONS[:count])
    ]  # fmt: skip


def lora_that_acts(model) -> list[torch.Tensor]:
    """The LoRA weights, drawn at random: LoRA starts as a no-op, whose gradients say little."""
    lora = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return lora


@pytest.fixture(scope="module")
def internvl(tiny_setup) -> dict:
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(processor, model_family(tiny_setup["model"]), tiny_setup["images"],
                            4, 512)  # fmt: skip
    images = [f"train-000/{i:02d}.jpg" for i in range(16)]
    other = [f"train-001/{i:02d}.jpg" for i in range(16)]
    clips = [clip_rows(images, "train-000", 3), clip_rows(other, "train-001", 4),
             clip_rows(images, "train-002", 1), clip_rows(other, "train-003", 2),
             [clip_rows(images, "train-004", 5)[i] for i in (0, 4)]]  # fmt: skip
    models = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = attach_lora(load_model(tiny_setup["model"], "none", "float32", attention, False),
                            8, 16, 0.0)  # fmt: skip
        lora_that_acts(model)
        models[attention] = model.eval()
    return {"builder": builder, "clips": clips, "models": models,
            "pad": processor.tokenizer.pad_token_id}  # fmt: skip


def question_sums(model, batch: dict) -> list[float]:
    """Each question's summed loss, in the batch's order: a stage-1 question has one
    answer, so each unbroken run of labelled tokens in a row is one question."""
    losses = labelled_token_losses(model, batch)
    sums: list[float] = []
    last = (-1, -1)
    for row, position, loss in zip(losses.rows.tolist(), losses.positions.tolist(),
                                   losses.losses.tolist(), strict=True):  # fmt: skip
        if (row, position - 1) != last:
            sums.append(0.0)
        sums[-1] += loss
        last = (row, position)
    return sums


def separate_sums(model, builder, clips, pad) -> list[float]:
    samples = [builder.encode(row) for rows in clips for row in rows]
    with torch.no_grad():
        return question_sums(model, collator("longest", pad)(samples))


def tree_items(builder, clips) -> list[list]:
    return [clip_trees([builder.encode(row) for row in rows], builder.max_seq_len)
            for rows in clips]  # fmt: skip


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_questions_loss_from_a_padded_batch_of_trees_is_its_separate_samples(
    internvl, attention
):
    model, builder = internvl["models"][attention], internvl["builder"]
    expected = separate_sums(model, builder, internvl["clips"], internvl["pad"])
    batch = collator("longest", internvl["pad"])(tree_items(builder, internvl["clips"]))
    assert "attention_mask" not in batch and batch[SEGMENT].shape == batch["input_ids"].shape
    assert batch["input_ids"].shape[0] == 5  # a tree a row, padded
    with torch.no_grad():
        got = question_sums(model, batch)
    assert len(got) == len(expected) == 12
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


def test_each_questions_loss_from_a_packed_row_of_trees_is_its_separate_samples(internvl):
    model, builder = internvl["models"]["sdpa"], internvl["builder"]
    expected = separate_sums(model, builder, internvl["clips"], internvl["pad"])
    batch = collator("packed", internvl["pad"])(tree_items(builder, internvl["clips"]))
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        got = question_sums(model, batch)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


def assert_tree_gradients_are_the_separate_ones(model, builder, clips, pad) -> None:
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]

    def gradients(batch) -> list[torch.Tensor]:
        model.zero_grad()
        losses = labelled_token_losses(model, batch).losses
        (losses.sum() / len(losses)).backward()
        return [p.grad.clone() for p in lora]

    samples = [builder.encode(row) for rows in clips for row in rows]
    try:
        separate = gradients(collator("longest", pad)(samples))
        tree = gradients(collator("longest", pad)(tree_items(builder, clips)))
    finally:
        model.eval()
    assert any(g.abs().max() > 0 for g in separate)
    for a, b in zip(tree, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lora_gradients_of_a_tree_step_are_the_separate_steps(internvl):
    assert_tree_gradients_are_the_separate_ones(internvl["models"]["sdpa"], internvl["builder"],
                                                internvl["clips"], internvl["pad"])  # fmt: skip


def test_branches_never_see_each_other(internvl):
    """Changing one branch's tokens changes its own logits and no other branch's."""
    model, builder = internvl["models"]["sdpa"], internvl["builder"]
    (tree,) = tree_items(builder, [internvl["clips"][1]])[0:1][0]
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in tree.items()}
    in_second = (tree[BRANCH] == 2).nonzero().squeeze(1)
    changed["input_ids"][in_second[1:]] = tree["input_ids"][0]  # all but its first token

    def logits(item) -> torch.Tensor:
        batch = collator("longest", internvl["pad"])([[item]])
        with torch.no_grad():
            return model(**model_inputs(model, split_counters(batch)[0])).logits[0]

    before, after = logits(tree), logits(changed)
    for branch in (0, 1, 3, 4):
        where = tree[BRANCH] == branch
        torch.testing.assert_close(after[where], before[where], rtol=0, atol=0)
    assert not torch.allclose(after[tree[BRANCH] == 2], before[tree[BRANCH] == 2])


def test_each_branch_cut_back_out_of_its_tree_is_the_separate_sample(internvl):
    builder = internvl["builder"]
    for rows in internvl["clips"]:
        samples = [builder.encode(row) for row in rows]
        (tree,) = clip_trees(samples, builder.max_seq_len)
        prefix = shared_prefix(samples)
        assert tree["questions"] == len(rows)
        assert tree["prefix_tokens_saved"] == prefix * (len(rows) - 1)
        for k, sample in enumerate(samples, start=1):
            cut = (tree[BRANCH] == 0) | (tree[BRANCH] == k)
            for key in ("input_ids", "labels"):
                assert torch.equal(tree[key][cut], sample[key])
            assert torch.equal(tree["position_ids"][cut], torch.arange(len(sample["input_ids"])))
            assert torch.equal(tree["pixel_values"], sample["pixel_values"])
        # the prefix holds every frame and stops before any label
        assert (tree["labels"][:prefix] == IGNORE_INDEX).all()


def test_a_clip_with_one_question_gives_exactly_its_separate_sample(internvl):
    builder = internvl["builder"]
    (sample,) = [builder.encode(row) for row in internvl["clips"][2]]
    tree = build_tree([sample])
    for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(tree[key], sample[key])
    assert torch.equal(tree["position_ids"], torch.arange(len(sample["input_ids"])))
    assert tree["prefix_tokens_saved"] == 0 and tree["questions"] == 1


def test_a_tree_longer_than_max_seq_len_splits_with_the_prefix_in_each(internvl):
    builder = internvl["builder"]
    samples = [builder.encode(row) for row in internvl["clips"][1]]  # 4 questions
    prefix = shared_prefix(samples)
    whole = build_tree(samples)
    limit = len(whole["input_ids"]) - 1
    trees = clip_trees(samples, limit)
    assert len(trees) == 2 and all(len(t["input_ids"]) <= limit for t in trees)
    assert sum(t["questions"] for t in trees) == 4
    for tree in trees:
        assert torch.equal(tree["input_ids"][:prefix], samples[0]["input_ids"][:prefix])
    # a question that cannot fit alone stays skipped, as in the separate layout
    assert clip_trees([None, samples[0]], builder.max_seq_len)[0] is None


# --- Qwen2.5-VL and Qwen3-VL: 3-D rotary positions ---

QWEN = {
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                   Qwen2VLVideoProcessor,
                   14, {"rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                 Qwen3VLVideoProcessor,
                 16, {"rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1]}}),
}  # fmt: skip


@pytest.fixture(scope="module", params=[(family, frames_as) for family in sorted(QWEN)
                                        for frames_as in ("video", "images")],
                ids="-".join)  # fmt: skip
def qwen(request, tiny_setup) -> dict:
    """A tiny Qwen-VL of each family with its vision tower, and its processor (frames of
    2×2 merged tokens), given its frames as one video or as images."""
    family, frames_as = request.param
    config_class, model_class, processor_class, video_class, patch, rope = QWEN[family]
    texts = [q for q, _ in QUESTIONS] + [a for _, a in QUESTIONS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")  # fmt: skip
    side = 2 * patch * 2  # 2×2 merged tokens a frame (a frame pair, as a video)
    pixels = {"min_pixels": side * side, "max_pixels": side * side, "patch_size": patch}
    # Qwen3-VL's video processor sizes the whole video: its budget is 4 frames'
    video = ({"size": {"shortest_edge": side * side, "longest_edge": 4 * side * side}}
             if video_class is Qwen3VLVideoProcessor else pixels)  # fmt: skip
    processor = processor_class(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=fast,
                                video_processor=video_class(**{"patch_size": patch, **video}),
                                chat_template=QWEN_CHAT_TEMPLATE)  # fmt: skip
    ids = {
        name: fast.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = {"vocab_size": len(fast), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, **rope}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 32, "patch_size": patch, "spatial_merge_size": 2,
              "temporal_patch_size": 2}  # fmt: skip
    if family == "qwen3_vl":
        vision["deepstack_visual_indexes"] = [0]
    torch.manual_seed(0)
    model = model_class(config_class(text_config=text, vision_config=vision, **ids))
    model = attach_lora(model.float(), 8, 16, 0.0)
    lora_that_acts(model)
    builder = SampleBuilder(processor, family_of(family, frames_as), tiny_setup["images"], 4,
                            512, frame_rate=2.0)  # fmt: skip
    images = [f"train-000/{i:02d}.jpg" for i in range(16)]
    other = [f"train-001/{i:02d}.jpg" for i in range(16)]
    clips = [clip_rows(images, "train-000", 3), clip_rows(other, "train-001", 2),
             clip_rows(images, "train-002", 1)]  # fmt: skip
    return {"model": model.eval(), "builder": builder, "clips": clips,
            "pad": fast.pad_token_id}  # fmt: skip


def test_qwen_each_questions_loss_from_trees_is_its_separate_samples(qwen):
    model, builder = qwen["model"], qwen["builder"]
    expected = separate_sums(model, builder, qwen["clips"], qwen["pad"])
    batch = collator("longest", qwen["pad"])(tree_items(builder, qwen["clips"]))
    with torch.no_grad():
        got = question_sums(model, batch)
    assert len(got) == len(expected) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


def test_qwen_lora_gradients_of_a_tree_step_are_the_separate_steps(qwen):
    assert_tree_gradients_are_the_separate_ones(qwen["model"], qwen["builder"], qwen["clips"],
                                                qwen["pad"])  # fmt: skip


def test_qwen_branch_positions_are_where_their_separate_sample_has_them(qwen):
    """Each branch's three position rows are its separate sample's, as the model's own
    `get_rope_index` places them: right after the prefix's largest position for frames as
    images and for Qwen3-VL's video (timestamps and all), and after the video's time-scaled
    positions for Qwen2.5-VL's."""
    model, builder = qwen["model"], qwen["builder"]
    rows = qwen["clips"][0]
    (tree,) = tree_items(builder, [rows])[0]
    batch = collator("longest", qwen["pad"])([[tree]])
    positions = model_inputs(model, split_counters(batch)[0])["position_ids"][:, 0]
    assert positions.shape[0] == 3
    prefix = int((tree[BRANCH] == 0).sum())
    inner = model.get_base_model().model
    wanted = set(inspect.signature(inner.get_rope_index).parameters)
    for branch, row in enumerate(rows, start=1):
        alone = collator("longest", qwen["pad"])([builder.encode(row)])
        given = {k: v for k, v in split_counters(alone)[0].items() if k in wanted}
        expected = inner.get_rope_index(**given)[0][:, 0, prefix:]
        where = (tree[BRANCH] == branch).nonzero().squeeze(1)
        assert torch.equal(positions[:, where], expected), branch
    if not (builder.family.video and builder.family.name == "qwen2_5_vl"):
        top = positions[:, tree[BRANCH] == 0].max()
        assert int(positions[0, (tree[BRANCH] == 1).nonzero()[0, 0]]) == top + 1


# --- steps of whole clips ---


def test_clip_steps_train_every_question_once_an_epoch_in_balanced_micro_batches():
    generator = torch.Generator().manual_seed(0)
    questions = torch.randint(2, 8, (60,), generator=generator).tolist()
    tokens = [
        1050 + 75 * q + int(torch.randint(0, 50, (1,), generator=generator)) for q in questions
    ]
    sampler = ClipStepSampler(questions, tokens, step_questions=16, micro_batches=4, seed=0)
    assert sampler.steps == sum(questions) // 16 and len(sampler) == sampler.steps * 4
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        micro = list(sampler)
        assert len(micro) == len(sampler)
        clips = [c for batch in micro for c in batch]
        assert sorted(clips) == list(range(60))  # every clip, so every question, once
        steps = [micro[i : i + 4] for i in range(0, len(micro), 4)]
        per_step = [sum(questions[c] for b in step for c in b) for step in steps]
        assert all(abs(n - sum(questions) / sampler.steps) <= 7 for n in per_step)
        for step in steps:  # the heaviest micro-batch carries at most one clip too many
            loads = sorted(sum(tokens[c] for c in b) for b in step)
            assert loads[-1] - loads[0] <= max(tokens)
        orders.append(clips)
    assert orders[0] != orders[1]  # a fresh order each epoch


def test_tree_layout_trains_whole_clips_and_counts_questions_trees_and_saved_tokens(
    tiny_setup, tmp_path
):
    out = tmp_path / "tree"
    train_tiny(tiny_setup, out, stage={"layout": "tree", "batch_size": 4, "grad_accum": 2},
               max_steps=-1)  # fmt: skip
    rows = csv_rows(out / "train_metrics.csv")
    questions = len(tiny_setup["stage1_train"].read_text().splitlines())  # 2 a clip
    assert len(rows) == questions // 8  # steps of 8 questions: whole clips of 2
    assert sum(int(r["samples"]) for r in rows) == questions  # each once
    assert all(int(r["trees"]) == 4 for r in rows)
    # each clip's second question shares its prefix: the frames and the prompt
    saved = [int(r["prefix_tokens_saved"]) for r in rows]
    assert len(set(saved)) == 1 and saved[0] > 4 * 16  # 4 trees × 4 frames × 4 tokens
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["stage"]["layout"] == "tree"


def test_tree_layout_is_refused_with_flash_attention_before_any_work(tiny_setup, tmp_path):
    with pytest.raises(ValueError, match="stage1.layout = 'tree' needs an attention kernel"):
        train_tiny(tiny_setup, tmp_path / "run", stage={"layout": "tree"},
                   model_settings={"attn_implementation": "flash_attention_2"})  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_val_losses_as_trees_equal_the_separate_ones(tiny_setup, tmp_path):
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(processor, model_family(tiny_setup["model"]), tiny_setup["images"],
                            4, 512)  # fmt: skip
    torch.manual_seed(0)
    model = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False), 8, 16,
                        0.0)  # fmt: skip
    lora_that_acts(model)
    model.eval()
    dataset = JsonlDataset(tiny_setup["stage1_val"], builder)
    pad = processor.tokenizer.pad_token_id
    records = {}
    for trees in (False, True):
        journal = Journal(tmp_path / f"journal-{trees}.jsonl", "f")
        records[trees] = sample_losses(model, dataset, "stage1_val", 3, pad, 0, "float32",
                                       journal, trees)  # fmt: skip
    assert [r["id"] for r in records[True]] == [r["id"] for r in records[False]]
    for tree, separate in zip(records[True], records[False], strict=True):
        assert [t["tokens"] for t in tree["turns"]] == [t["tokens"] for t in separate["turns"]]
        for a, b in zip(tree["turns"], separate["turns"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert loss_summary(records[True])["loss"] == pytest.approx(
        loss_summary(records[False])["loss"], rel=1e-6
    )


def test_clip_steps_deal_each_rank_the_same_tokens_and_any_rank_count_the_same_clips():
    generator = torch.Generator().manual_seed(2)
    questions = torch.randint(2, 8, (90,), generator=generator).tolist()
    tokens = [1050 + 75 * q for q in questions]
    one, two = (ClipStepSampler(questions, tokens, 32, 16, seed=0, ranks=r) for r in (1, 2))
    # each rank's micro-batches as the Trainer's data loader has accelerate deal them
    shards = [list(BatchSamplerShard(BatchSampler(two, 1, False), 2, rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == one.steps * 8
    micro_one = list(one)
    for step in range(one.steps):
        mine = [[b[0] for b in shard[step * 8 : (step + 1) * 8]] for shard in shards]
        clips = sorted(c for rank in mine for b in rank for c in b)
        assert clips == sorted(c for b in micro_one[step * 16 : (step + 1) * 16] for c in b)
        loads = sorted(sum(tokens[c] for b in rank for c in b) for rank in mine)
        # the heavier rank carries at most the lightest clip more than the other
        assert loads[1] - loads[0] <= min(tokens[c] for c in clips)


def test_tree_token_counts_from_text_are_the_built_trees_lengths(tiny_setup):
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(processor, model_family(tiny_setup["model"]), tiny_setup["images"],
                            4, 512)  # fmt: skip
    trees = ClipTrees(JsonlDataset(tiny_setup["stage1_train"], builder))
    counts = trees.token_counts(chunk=5)  # chunks that cut through clips
    for clip in range(0, len(trees), 7):
        assert counts[clip] == sum(len(t["input_ids"]) for t in trees[clip])


def test_a_clip_with_more_questions_than_a_step_is_refused_before_training(tiny_setup, tmp_path):
    # the tiny setup's clips have 2 questions; a step of 1 cannot hold one
    with pytest.raises(ValueError, match="has 2 questions, more than a step's 1"):
        train_tiny(tiny_setup, tmp_path / "run",
                   stage={"layout": "tree", "batch_size": 1, "grad_accum": 1})  # fmt: skip
    assert not list((tmp_path / "run").glob("adapter*"))


def test_val_losses_as_trees_with_split_trees_skipped_questions_and_a_part_done_journal(
    tiny_setup, tmp_path
):
    """Clips whose trees split (max_seq_len fits each question, not two), questions that
    fit nowhere (skipped, as separate), and a journal that already holds some questions
    (the rest of their clips computed as smaller trees): the same records as separate."""
    processor = load_processor(tiny_setup["model"])
    family = model_family(tiny_setup["model"])
    source = with_unfit_rows(tiny_setup["stage1_val"], tmp_path / "val.jsonl", every=5)
    wide = SampleBuilder(processor, family, tiny_setup["images"], 4, 512)
    fitting = [s for s in JsonlDataset(source, wide) if s is not None]
    longest = max(len(s["input_ids"]) for s in fitting)
    builder = SampleBuilder(processor, family, tiny_setup["images"], 4, longest)
    dataset = JsonlDataset(source, builder)
    groups = ClipTrees(dataset)
    rows = [dataset.row(i) for i in groups.members[0]]
    assert len(clip_trees([builder.encode(r) for r in rows], longest)) == 2  # split
    torch.manual_seed(0)
    model = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False), 8, 16,
                        0.0)  # fmt: skip
    lora_that_acts(model)
    model.eval()
    pad = processor.tokenizer.pad_token_id
    separate = sample_losses(model, dataset, "v", 3, pad, 0, "float32",
                             Journal(tmp_path / "separate.jsonl", "f"))  # fmt: skip
    assert any(r["skipped"] for r in separate)
    journal = Journal(tmp_path / "trees.jsonl", "f")
    journal.append(separate[1::3])  # done before: one question of some clips
    trees = sample_losses(model, dataset, "v", 2, pad, 0, "float32", journal, trees=True)
    assert [r["id"] for r in trees] == [r["id"] for r in separate]
    for tree, alone in zip(trees, separate, strict=True):
        assert tree["skipped"] == alone["skipped"]
        assert [t["tokens"] for t in tree["turns"]] == [t["tokens"] for t in alone["turns"]]
        for a, b in zip(tree["turns"], alone["turns"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
