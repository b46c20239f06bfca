"""Seconds per optimizer step of InternVL3-8B LoRA training, per configuration.

The full-size architecture (7.94B parameters, untied head) is built from its config with
random weights (nothing is downloaded), saved once, and loaded per configuration through
the project's own `load_model` and `attach_lora` (LoRA r 128 on the language model).
Samples are synthetic clips shaped like stage 1 (4 frames, one question, ~1.1k tokens)
and stage 2 (10 frames, the clip's 2-7 questions, ~2.8k tokens), encoded by the project's
`SampleBuilder`; steps run through its `CurriculumTrainer` and collators.

Per configuration and stage, one line: seconds per optimizer step of `--samples-per-step`
samples (median of the timed steps; the first step is a warm-up), real tokens/s, model
TFLOP/s, MFU, peak GPU memory, the share of computed tokens that are real, the counted
executed TFLOP of a step, and the samples a timed step held (questions at stage 1, clips at
stage 2), counted by the collator.

The seed's and bf16 LoRA's configurations also measure stage 1 as config.yaml lays it out
(`stage1.layout: tree`, robovqa_ft/training/trees.py), on a `stage1 tree` line: each clip's
questions as trees (`ClipTrees`), steps of whole clips of exactly `--samples-per-step`
questions (`whole_clip_steps`), each step's clips dealt into its `samples-per-step /
micro-batch` micro-batches as the training's `ClipStepSampler` deals them (one item each,
padded or packed as the configuration says, always with the trees' 4-D mask).

Model FLOPs per step (gradient-checkpointing recomputation not counted, as MFU requires):
  language model, per sample of T tokens: 4·N_lm·T (forward 2, input gradients 2; the
  frozen weights get no gradient) + 6·N_lora·T + attention 6·L·d·T² (causal: forward
  2·L·d·T², backward twice that); N_lm = the decoder layers' matmul weights; the head
  (d × vocab), 4·d·V per labelled token only (answers and their end token: the loss
  runs it on those positions alone, robovqa_ft/training/loss.py); vision tower and projector,
  frozen and before any LoRA, forward only (`visual_flops`), per tile: 2·N_vit·P +
  4·L_v·d_v·P² + 2·N_proj·P' (P = 1025 patches + class, P' = 256 tokens). Qwen2.5-VL's
  and Qwen3-VL's (bench/family_cost.py, and Qwen3-VL-8B in bench/gpu_slot.py), from their
  patch grids (`image_grid_thw`, `video_grid_thw`): per patch 2·N_blocks (the vision
  blocks' matmuls: attention q, k, v, o and the MLP, gated in Qwen2.5-VL), per merged
  token (2×2 patches) 2·N_mergers (the merger, and in Qwen3-VL one per deepstack layer),
  attention 4·d_v·g² per layer and attention group of g patches, the groups the model's
  own (`transformers.vision_utils`: each frame or frame pair alone; Qwen2.5-VL's windowed
  layers, all but `fullatt_block_indexes`, by `get_vision_window_index`). Patch
  embeddings are left out, as InternVL's formula leaves its own out (<0.5% of the vision).
  A tree (shared prefix of p tokens, then branches of b_k tokens) is counted as what it
  computes, its real tokens T = p + Σb_k: the prefix once in every linear term; attention
  6·L·d·(p² + Σ_k (2·p·b_k + b_k²)), each branch attending causally to the prefix and to
  itself (each question's causal square, the prefix's own square once, not once per
  question, and no square across branches); the head on its labelled tokens (the same as
  its questions' apart); the vision tower on its frames once. So a tree of k questions
  counts (k-1) prefixes' linear work, (k-1)·p² of attention and (k-1) sets of frames fewer
  than its questions laid out separately: MFU is of the work done, not of the work saved.
MFU = model FLOPs / (seconds per step × peak): 989 TFLOP/s dense bf16 for H100 SXM and
H200 (the nf4 path computes in bf16 too); `--peak-tflops` for any other device.

Run on a GPU: `python bench/train_step.py --workdir /tmp/bench` (the random 8B
weights are written once to the workdir, 16 GB; `--only` and `--steps 1` shorten a run).
On a CPU: `--tiny`. bench/gpu_slot.py runs these setups within a short GPU slot.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from synthetic import CONFIG, STAGES, stage_dataset, write_clips
from torch.utils.data import Dataset
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import is_flash_attn_2_available
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

from robovqa_ft.training.attention import BRANCH
from robovqa_ft.training.collate import collator
from robovqa_ft.training.families import FAMILIES, Family
from robovqa_ft.training.metrics import MetricsLog
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.random_model import build_random_internvl, conversation_texts
from robovqa_ft.training.samples import IGNORE_INDEX
from robovqa_ft.training.steps import ClipStepSampler, StepSampler
from robovqa_ft.training.train import CurriculumTrainer, training_arguments
from robovqa_ft.training.trees import ClipTrees

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "A100": 312.0}
LORA = CONFIG["lora"]  # r 128, alpha 256, as config.yaml
TREES = "stage1 tree"  # the line of stage 1 in the tree layout
COLUMNS = ("stage | quantization | gradient checkpointing | attention | micro-batch | padding | "
           "s/step | tokens/s | TFLOP/s | MFU | peak GB | real tokens | "
           "executed TFLOP/step (counted) | samples/step")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Setup:
    quantization: str  # nf4 (QLoRA) or none (bf16 LoRA)
    gradient_checkpointing: bool
    attention: str  # sdpa or flash_attention_2
    micro_batch: int
    padding: str  # longest, grouped or packed
    trees: bool = False  # stage 1 in the tree layout too, a `TREES` line

    def label(self, dtype: str) -> str:
        quant = "QLoRA nf4" if self.quantization == "nf4" else f"LoRA {dtype}"
        checkpointing = "gc on" if self.gradient_checkpointing else "gc off"
        return f"{quant} | {checkpointing} | {self.attention} | {self.micro_batch} | {self.padding}"


def setups(flash: bool) -> list[Setup]:
    """The seed's configuration, then one change at a time, then the combinations."""
    seed = Setup("nf4", True, "sdpa", 2, "longest")
    bf16 = dataclasses.replace(seed, quantization="none")
    chosen = [
        seed,
        dataclasses.replace(seed, micro_batch=8),
        bf16,
        dataclasses.replace(bf16, gradient_checkpointing=False),
        dataclasses.replace(bf16, micro_batch=8),
        dataclasses.replace(bf16, micro_batch=8, padding="grouped"),
        dataclasses.replace(bf16, micro_batch=8, padding="packed"),
        dataclasses.replace(bf16, gradient_checkpointing=False, micro_batch=4, padding="packed"),
    ]
    if flash:
        chosen += [
            dataclasses.replace(bf16, attention="flash_attention_2", micro_batch=8),
            dataclasses.replace(bf16, attention="flash_attention_2", micro_batch=8,
                                padding="packed"),
            dataclasses.replace(seed, attention="flash_attention_2", micro_batch=8,
                                padding="packed"),
        ]  # fmt: skip
    # The baselines measure stage 1 in config.yaml's tree layout too (SDPA takes its mask).
    return [dataclasses.replace(s, trees=True) if s in (seed, bf16) else s for s in chosen]


class Samples(Dataset):
    """Encoded samples held in memory: the step time is the GPU's, not the data path's
    (bench/dataloader.py measures that). For the tree line each item is a clip's trees,
    and a tuple of clips (a micro-batch, as `ClipTrees` takes it) gives all their trees."""

    def __init__(self, samples: list[dict] | list[list[dict]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, ...]) -> dict | list[dict]:
        if isinstance(index, tuple):
            return [tree for clip in index for tree in self.samples[clip]]
        return self.samples[index]


@dataclasses.dataclass(frozen=True)
class ClipSteps:
    """Stage 1 as trees, for the `TREES` line: each clip's trees and question count
    (`ClipTrees`), its tokens as trees (`ClipTrees.token_counts`, by which the training
    balances micro-batches), and the clips of each step (`whole_clip_steps`)."""

    trees: list[list[dict]]
    questions: list[int]
    tokens: list[int]
    per_step: int  # questions a step
    steps: list[list[int]]

    def micro_batches(self, count: int) -> list[list[tuple[int, ...]]]:
        """Each step's clips dealt into `count` micro-batches, as the training deals them
        (`ClipStepSampler.balanced`; an empty one is the collator's stand-in)."""
        dealer = ClipStepSampler(self.questions, self.tokens, self.per_step, count, seed=0)
        return [dealer.balanced(step) for step in self.steps]


class Deadline(TrainerCallback):
    """Ends the training after the step past which the time left before `deadline`
    (time.monotonic) would not cover another step as long."""

    def __init__(self, deadline: float):
        self.deadline, self.last = deadline, time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if 2 * now - self.last > self.deadline:
            control.should_training_stop = True
        self.last = now


class StepTimer(TrainerCallback):
    """Wall time, real/computed tokens and samples of each optimizer step."""

    def __init__(self, metrics: MetricsLog):
        self.metrics, self.steps = metrics, []
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append((now - self.last, self.metrics.tokens, self.metrics.computed,
                           self.metrics.samples))  # fmt: skip
        self.metrics.tokens = self.metrics.computed = self.metrics.samples = 0
        self.last = now


def language_sizes(config) -> tuple[int, int, int]:
    """(the decoder layers' matmul weights N_lm, layers, hidden size) of the language model."""
    text = config.text_config
    d, layers = text.hidden_size, text.num_hidden_layers
    kv = text.num_key_value_heads * d // text.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * text.intermediate_size  # q,o + k,v + MLP
    return layers * per_layer, layers, d


def lora_parameters(config, r: int) -> int:
    """LoRA's trainable weights at rank `r` on the language model's seven projections."""
    text = config.text_config
    d, inner = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * d // text.num_attention_heads
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + inner) * 3)  # q,o; k,v; gate,up,down
    return text.num_hidden_layers * per_layer


def tile_flops(config) -> int:
    """InternVL's vision tower and projector on one tile, forward only (module docstring)."""
    vision = config.vision_config
    d = config.text_config.hidden_size
    dv, lv = vision.hidden_size, vision.num_hidden_layers
    n_vit = lv * (4 * dv * dv + 2 * dv * vision.intermediate_size)
    patches = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1
    projected = config.image_seq_length
    n_proj = 4 * dv * d + d * d  # 4096 -> 3584 -> 3584
    return 2 * n_vit * patches + 4 * lv * dv * patches**2 + 2 * n_proj * projected


def vision_weights(config) -> dict[str, int]:
    """A Qwen vision tower's matmul weights: its blocks' (attention q, k, v, o and the MLP,
    gated in Qwen2.5-VL) and its mergers' (2×2 patches to the language model's width; in
    Qwen3-VL, one merger more for each deepstack layer)."""
    vision = config.vision_config
    d, inner, depth = vision.hidden_size, vision.intermediate_size, vision.depth
    merged = d * vision.spatial_merge_size**2
    merger = merged * merged + merged * vision.out_hidden_size
    if config.model_type == "qwen2_5_vl":
        return {"blocks": depth * (4 * d * d + 3 * d * inner), "mergers": merger}
    if config.model_type == "qwen3_vl":
        deepstack = len(vision.deepstack_visual_indexes)
        return {"blocks": depth * (4 * d * d + 2 * d * inner), "mergers": (1 + deepstack) * merger}
    raise ValueError(f"no vision formula for {config.model_type}")


def attention_groups(config, grid_thw: torch.Tensor) -> dict[str, list[int]]:
    """Patches in each vision attention group: "full" (each frame, or frame pair, alone)
    and, for Qwen2.5-VL's windowed layers, "window", as the model's own code groups them."""
    vision = config.vision_config
    full = get_vision_cu_seqlens(grid_thw).diff().tolist()
    if config.model_type != "qwen2_5_vl":
        return {"full": full}
    _, windows = get_vision_window_index(
        grid_thw, vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    return {"full": full, "window": windows.diff().tolist()}


def qwen_vision_flops(config, grid_thw: torch.Tensor) -> int:
    """Frames of patch grid `grid_thw` through a Qwen vision tower and its mergers, forward
    only (module docstring)."""
    vision, weights = config.vision_config, vision_weights(config)
    patches = int(grid_thw.prod(dim=1).sum())
    merged = patches // vision.spatial_merge_size**2
    groups = attention_groups(config, grid_thw)
    full_layers = len(getattr(vision, "fullatt_block_indexes", range(vision.depth)))
    pairs = full_layers * sum(g * g for g in groups["full"])
    pairs += (vision.depth - full_layers) * sum(g * g for g in groups.get("window", []))
    linear = 2 * weights["blocks"] * patches + 2 * weights["mergers"] * merged
    return linear + 4 * vision.hidden_size * pairs


GRIDS = ("image_grid_thw", "video_grid_thw")  # a Qwen model's visual inputs


def visual_flops(config, inputs: Mapping) -> int:
    """Forward FLOPs of the vision side (tower and projector, frozen) on one sample's,
    tree's or micro-batch's visual inputs, each once (module docstring): InternVL's tiles
    (`pixel_values`), or a Qwen2.5-VL or Qwen3-VL model's patch grids (`GRIDS`); 0 for
    none."""
    if config.model_type == "internvl":
        return len(inputs.get("pixel_values", ())) * tile_flops(config)
    if config.model_type in ("qwen2_5_vl", "qwen3_vl"):
        grids = [inputs[key] for key in GRIDS if inputs.get(key) is not None]
        return sum(qwen_vision_flops(config, grid) for grid in grids)
    raise ValueError(f"no vision formula for {config.model_type}")


def model_flops(
    config,
    lengths: list[int],
    labelled: int,
    visual: float,
    lora_params: int,
    squares: list[int] | None = None,
) -> float:
    """Model FLOPs of one optimizer step over samples of `lengths` tokens, `labelled` of them
    labelled, whose frames' vision side costs `visual` FLOPs in all (`visual_flops`; module
    docstring). `squares`: each sample's attention, in units of one causal sequence's T²
    (`tree_squares` for a tree); by default each sample is one causal sequence, T²."""
    text = config.text_config
    n_lm, layers, d = language_sizes(config)
    tokens = sum(lengths)
    squares = [t * t for t in lengths] if squares is None else squares
    language = (4 * n_lm + 6 * lora_params) * tokens + 6 * layers * d * sum(squares)
    language += 4 * d * text.vocab_size * labelled  # the head, on labelled positions only
    return language + visual


def computed_layout(setup: Setup, lengths: list[int]) -> tuple[list[int], list[tuple[int, bool]]]:
    """What the kernels compute for one step of samples of `lengths` under `setup`: the
    rows' lengths (every linear layer runs on each row's every position) and the attention
    squares, each (side, whether the whole square is computed rather than its causal half).

    A padded micro-batch is as many rows as samples, each as long as its longest (grouped:
    the step's samples sorted first, as the sampler groups them). A packed one is one row
    holding them all. SDPA and eager take a mask as soon as a row is padded or packed, and
    then compute each row's whole square (no kernel skips masked blocks): for packing, a
    square over every sample of the micro-batch. Flash-attention 2 unpads and attends
    within each sample, causally, whatever the layout.
    """
    if setup.padding == "grouped":
        lengths = sorted(lengths)
    size = setup.micro_batch
    rows: list[int] = []
    squares: list[tuple[int, bool]] = []
    for batch in (lengths[i : i + size] for i in range(0, len(lengths), size)):
        layout = [sum(batch)] if setup.padding == "packed" else [max(batch)] * len(batch)
        rows += layout
        if setup.attention == "flash_attention_2":
            squares += [(length, False) for length in batch]
        else:
            masked = setup.padding == "packed" or len(set(batch)) > 1
            squares += [(side, masked) for side in layout]
    return rows, squares


def tree_layout(
    setup: Setup, micro_batches: list[list[int]]
) -> tuple[list[int], list[tuple[int, bool]]]:
    """`computed_layout` of a step of trees, each micro-batch given by its trees' lengths:
    a padded one is a row per tree, as long as its longest; a packed one is one row. A
    tree always comes with its 4-D mask, so SDPA computes each row's whole square. An
    empty micro-batch is the collator's stand-in, one token (its square counted whole
    too: one FLOP unit)."""
    rows: list[int] = []
    for batch in micro_batches:
        if not batch:
            rows.append(1)
        elif setup.padding == "packed":
            rows.append(sum(batch))
        else:
            rows += [max(batch)] * len(batch)
    return rows, [(row, True) for row in rows]


def executed_flops(
    config, setup: Setup, lengths: list[int], labelled: int, visual: float, lora_params: int
) -> float:
    """FLOPs the kernels execute for one step (counted, not measured) of samples of
    `lengths`, their frames' vision side `visual` FLOPs: `layout_flops` of their
    `computed_layout`."""
    rows, squares = computed_layout(setup, lengths)
    return layout_flops(config, setup, rows, squares, labelled, visual, lora_params)


def layout_flops(
    config,
    setup: Setup,
    rows: list[int],
    squares: list[tuple[int, bool]],
    labelled: int,
    visual: float,
    lora_params: int,
) -> float:
    """FLOPs the kernels execute for one step computed as `rows` with attention `squares`
    (`computed_layout`): the model FLOPs of the rows (padding included) with those
    squares and the vision side's `visual` (frozen, forward only: no padding, no
    recomputation), and with gradient checkpointing each decoder layer's forward once
    more in the backward pass."""
    n_lm, layers, d = language_sizes(config)
    causal_halves = [(2 if whole else 1) * side * side for side, whole in squares]
    flops = model_flops(config, rows, labelled, visual, lora_params, causal_halves)
    if setup.gradient_checkpointing:
        flops += (2 * n_lm + 2 * lora_params) * sum(rows) + 2 * layers * d * sum(causal_halves)
    return flops


def step_flops(
    config, setup: Setup, samples: list[dict], per_step: int, lora_params: int
) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of the average step of `per_step` of `samples`, of
    the model family of `config` (`visual_flops`)."""
    model = executed = 0.0
    steps = [samples[i : i + per_step] for i in range(0, len(samples), per_step)]
    for step in steps:
        figures = ([len(s["input_ids"]) for s in step],
                   sum(int((torch.as_tensor(s["labels"]) != IGNORE_INDEX).sum()) for s in step),
                   sum(visual_flops(config, s) for s in step))  # fmt: skip
        model += model_flops(config, *figures, lora_params)
        executed += executed_flops(config, setup, *figures, lora_params)
    return model / len(steps), executed / len(steps)


def tree_squares(tree: dict) -> int:
    """A tree's attention in units of a causal T² (module docstring): p² + Σ_k (2·p·b_k +
    b_k²) for a prefix of p tokens and branches of b_k."""
    sizes = torch.bincount(tree[BRANCH]).tolist()
    prefix, branches = sizes[0], sizes[1:]
    return prefix * prefix + sum(2 * prefix * b + b * b for b in branches)


def tree_step_flops(
    config,
    setup: Setup,
    clips: ClipSteps,
    micro_batches: list[list[tuple[int, ...]]],
    lora_params: int,
) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of the average step of `clips`' trees dealt into
    `micro_batches` (`ClipSteps.micro_batches`): a tree's frames are its clip's, once."""
    model = executed = 0.0
    for step in micro_batches:
        batches = [[tree for clip in batch for tree in clips.trees[clip]] for batch in step]
        trees = [tree for batch in batches for tree in batch]
        labelled = sum(int((t["labels"] != IGNORE_INDEX).sum()) for t in trees)
        visual = sum(visual_flops(config, t) for t in trees)
        model += model_flops(config, [len(t["input_ids"]) for t in trees], labelled, visual,
                             lora_params, [tree_squares(t) for t in trees])  # fmt: skip
        rows, squares = tree_layout(setup, [[len(t["input_ids"]) for t in b] for b in batches])
        executed += layout_flops(config, setup, rows, squares, labelled, visual, lora_params)
    return model / len(micro_batches), executed / len(micro_batches)


INTERNVL = FAMILIES["internvl"]


def encode(
    paths: dict,
    processor,
    stage: str,
    count: int,
    family: Family = INTERNVL,
    frame_rate: float | None = None,
) -> list[dict]:
    """`count` of the stage's samples (round and round), encoded for `family` (its frames
    as a video at `frame_rate`, where it takes them so: `synthetic.stage_dataset`)."""
    dataset = stage_dataset(processor, paths, stage, family, frame_rate)
    return [dataset[i % len(dataset)] for i in range(count)]


def whole_clip_steps(questions: list[int], per_step: int, steps: int) -> list[list[int]]:
    """`steps` steps of whole clips (indices into `questions`, each clip's question count),
    each of exactly `per_step` questions, so that a tree line's seconds compare with the
    separate line's (the training's `ClipStepSampler` makes steps of about as many). The
    clips are taken in order, round and round; one that would leave a remainder no clips
    make up waits, first in line, for the next step."""
    makes = [True] + [False] * per_step  # makes[n]: whole clips can add up to n questions
    for n in range(1, per_step + 1):
        makes[n] = any(q <= n and makes[n - q] for q in set(questions))
    if not makes[per_step]:
        raise ValueError(f"no whole clips of {sorted(set(questions))} questions make {per_step}")
    upcoming, waiting = itertools.cycle(range(len(questions))), []
    chosen = []
    for _ in range(steps):
        step, left = [], per_step
        while left:
            fits = [c for c in waiting if questions[c] <= left and makes[left - questions[c]]]
            if fits:
                clip = fits[0]
                waiting.remove(clip)
            else:
                clip = next(upcoming)
                if questions[clip] > left or not makes[left - questions[clip]]:
                    waiting.append(clip)
                    continue
            step.append(clip)
            left -= questions[clip]
        chosen.append(step)
    return chosen


def encode_clip_steps(
    paths: dict,
    processor,
    per_step: int,
    steps: int,
    family: Family = INTERNVL,
    frame_rate: float | None = None,
) -> ClipSteps:
    """The stage-1 clips' trees, as the training builds them, in `steps` steps of
    `per_step` questions; `family` and `frame_rate` as `encode`'s."""
    clips = ClipTrees(stage_dataset(processor, paths, "stage1", family, frame_rate))
    return ClipSteps(
        trees=[clips[c] for c in range(len(clips))], questions=clips.questions,
        tokens=clips.token_counts(), per_step=per_step,
        steps=whole_clip_steps(clips.questions, per_step, steps),
    )  # fmt: skip


def stage_samples(
    paths: dict,
    processor,
    stages: list[str],
    per_step: int,
    steps: int,
    trees: bool,
    family: Family = INTERNVL,
    frame_rate: float | None = None,
) -> dict[str, list[dict] | ClipSteps]:
    """Each stage's samples for `steps` steps of `per_step`, and with `trees` (and stage
    1), stage 1's clips as trees under `TREES`; `family` and `frame_rate` as `encode`'s."""
    samples: dict[str, list[dict] | ClipSteps] = {
        stage: encode(paths, processor, stage, per_step * steps, family, frame_rate)
        for stage in stages
    }
    if trees and "stage1" in stages:
        samples[TREES] = encode_clip_steps(paths, processor, per_step, steps, family, frame_rate)
    return samples


def measure(
    setup: Setup,
    stage: str,
    model,
    processor,
    samples: list[dict] | ClipSteps,
    args,
    out: Path,
    deadline: float | None = None,
) -> dict | None:
    """Time `args.steps` optimizer steps after one warm-up step; returns the figures, or
    None where `deadline` (time.monotonic) came before a timed step ended. `stage` is a
    stage of `STAGES`, or `TREES` with `samples` its `ClipSteps`."""
    trees = stage == TREES
    stage_settings = {  # config.yaml's stage, with this setup's micro-batch and the layout
        **CONFIG["stage1" if trees else stage], "batch_size": setup.micro_batch,
        "grad_accum": args.samples_per_step // setup.micro_batch,
        "layout": "tree" if trees else "separate",
    }  # fmt: skip
    training = {"max_steps": 1 + args.steps, "logging_steps": 10**6, "eval_steps": 10**6,
                "save_steps": 10**6, "save_total_limit": 2, "seed": 0,
                "dataloader_workers": 0, "hang_timeout_minutes": 30}  # fmt: skip
    model_settings = {"dtype": args.dtype}
    targs = training_arguments(out, stage_settings, training, model_settings)
    targs = dataclasses.replace(targs, eval_strategy="no", save_strategy="no", disable_tqdm=True)
    sampler = None
    if trees:  # one item a micro-batch: a tuple of whole clips
        micro_batches = samples.micro_batches(stage_settings["grad_accum"])
        sampler = [batch for step in micro_batches for batch in step]
    elif setup.padding == "grouped":
        lengths = [len(s["input_ids"]) for s in samples]
        sampler = StepSampler(len(lengths), args.samples_per_step, 0, lengths)
    trainer = CurriculumTrainer(
        model=model, args=targs, train_dataset=Samples(samples.trees if trees else samples),
        data_collator=collator(setup.padding, processor.tokenizer.pad_token_id, setup.attention),
        metrics=MetricsLog(out, 0, 0), train_sampler=sampler,
    )  # fmt: skip
    timer = StepTimer(trainer.metrics)
    trainer.add_callback(timer)
    if deadline is not None:
        trainer.add_callback(Deadline(deadline))
    trainer.remove_callback(PrinterCallback)  # one line per setup, printed below
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer.last = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    timed = timer.steps[1:]
    if not timed:
        del trainer
        return None
    seconds = statistics.median(t for t, _, _, _ in timed)
    real = sum(r for _, r, _, _ in timed) / len(timed)
    computed = sum(c for _, _, c, _ in timed) / len(timed)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trees:  # the steps are fixed: count those timed
        counted = micro_batches[1 : len(timer.steps)]
        flops, executed = tree_step_flops(model.config, setup, samples, counted, lora_params)
    else:  # steps draw their samples at random: count the FLOPs of the average step
        flops, executed = step_flops(model.config, setup, samples, args.samples_per_step,
                                     lora_params)  # fmt: skip
    del trainer
    return {"seconds": seconds, "tokens_per_s": real / seconds, "tflops": flops / seconds / 1e12,
            "peak_gb": peak, "real_share": real / computed, "executed_tflop": executed / 1e12,
            "samples_per_step": sum(n for _, _, _, n in timed) / len(timed)}  # fmt: skip


def stage_lines(
    setup: Setup,
    model,
    processor,
    samples: dict[str, list[dict] | ClipSteps],
    args,
    out: Path,
    peak: float | None,
    deadline: float | None = None,
) -> Iterator[tuple[str, dict | None, str]]:
    """Measure `setup` on each of `args.stages`, then with `setup.trees` on stage 1 as
    trees (`TREES`, last: a failure there costs no other line): (stage, figures or None,
    its table line). Past `deadline` (time.monotonic) no stage starts, and a running one
    ends at its step."""
    trees = [TREES] if setup.trees and TREES in samples else []
    for stage in [*args.stages, *trees]:
        label = f"{stage} | {setup.label(args.dtype)}"
        if deadline is not None and time.monotonic() > deadline:
            yield stage, None, f"{label} | not run: the budget is spent"
            continue
        r, out_of_memory = None, False
        try:
            r = measure(setup, stage, model, processor, samples[stage], args, out, deadline)
        except torch.OutOfMemoryError:
            out_of_memory = True
        # outside the except clause, whose traceback still holds the Trainer
        model.zero_grad(set_to_none=True)
        free_memory()
        if out_of_memory:
            yield stage, None, f"{label} | out of memory"
        elif r is None:
            yield stage, None, f"{label} | stopped at the budget before a timed step"
        else:
            mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
            memory = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
            figures = [f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.3g}",
                       mfu, memory, f"{r['real_share']:.1%}", f"{r['executed_tflop']:.3g}",
                       f"{r['samples_per_step']:g}"]  # fmt: skip
            yield stage, r, " | ".join([label, *figures])


def device_peak(args) -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return f"CPU ({platform.machine()}, {os.cpu_count()} cores)", args.peak_tflops
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops
    for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if peak is None and key in name:
            peak = value
    return name, peak


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keeps the random model between runs")
    parser.add_argument("--samples-per-step", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--only", type=int, nargs="+", help="run these setups (1-based)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU, float32 (tests)")
    args = parser.parse_args()
    args.dtype = "float32" if args.tiny else "bfloat16"
    if args.tiny:
        args.samples_per_step, args.steps = 16, 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train_step-"))
    architecture = "tiny" if args.tiny else "internvl3-8b"
    paths = write_clips(workdir / "clips", 24, seed=0, shared_frames=True)
    model_dir = workdir / f"model-{architecture}"
    if not model_dir.exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_random_internvl(
            model_dir, conversation_texts([paths["stage2"]]), architecture, vocab_size=8000,
            dtype=getattr(torch, args.dtype), device=device,
        )  # fmt: skip
        free_memory()
    processor = load_processor(model_dir)
    flash = is_flash_attn_2_available()
    chosen = setups(flash)
    trees = any(s.trees for n, s in enumerate(chosen, 1) if not args.only or n in args.only)
    samples = stage_samples(paths, processor, args.stages, args.samples_per_step,
                            1 + args.steps, trees)  # fmt: skip

    name, peak = device_peak(args)
    print(f"# {time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, "
          f"{architecture}, {args.samples_per_step} samples per step, "
          f"flash-attn {'installed' if flash else 'not installed'}")  # fmt: skip
    print(COLUMNS)
    for number, setup in enumerate(chosen, 1):
        if args.only and number not in args.only:
            continue
        try:
            model = load_model(model_dir, setup.quantization, args.dtype, setup.attention,
                               setup.gradient_checkpointing)  # fmt: skip
            model = attach_lora(model, **LORA)
        except Exception as error:  # noqa: BLE001 - a setup that cannot load is a result
            print(f"all | {setup.label(args.dtype)} | cannot load: {type(error).__name__}: {error}")
            continue
        for _, _, line in stage_lines(setup, model, processor, samples, args, workdir / "out",
                                      peak):  # fmt: skip
            print(line, flush=True)
        del model
        free_memory()


if __name__ == "__main__":
    main()
