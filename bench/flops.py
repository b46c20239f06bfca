"""Executed FLOPs of one InternVL3-8B LoRA optimizer step, per module group, beside the
model-FLOPs formula of `train_step.py` (its `model_flops`).

torch's `FlopCounterMode` counts what one micro-batch of each stage's mean length executes
in `CurriculumTrainer.training_step` (forward, loss, backward: the training code's own
path), with the model loaded through `load_model` and `attach_lora` (LoRA r 128) at the
full InternVL3-8B width and vocabulary, but with two language-model layers and one vision
layer: the meta device cannot run InternVL's data-dependent image-token placement, and a
full 8B step is hours on two cores. Two layers, because the first one differs: its input
(the embeddings) needs no gradient. Counts scale to the real depth (the first layer once,
the second for each of the other 27; the vision layer 24 times) and by the micro-batches
of one optimizer step (config.yaml's grad_accum).

Groups: vision tower, projector, language model (its frozen matmuls and attention), LoRA
(lora_A, lora_B), head, other (outside them all). Backward FLOPs belong to the group whose
forward made the autograd node that runs them; FLOPs of forwards re-run inside the
backward (gradient checkpointing's recomputation) are their own line, `recompute`.

Attention: torch has no formula for the CPU flash kernel; the one given here counts what
the kernel needs, which for causal attention (`is_causal`, no mask) is the T(T+1)/2
query-key pairs it computes (torch's GPU formulas count the full square).

Stage 1's layouts: FLOPs per question of the separate layout (one sample a question)
and of the tree layout (a clip's questions as one tree, `robovqa_ft/training/trees.py`),
by the same groups, with config.yaml's gradient checkpointing. Clips of 2 to 7 questions
(ROBOVQA.md: 722,979 stage-1 questions from 199,721 clips, 3.6 each) weighted as the
synthetic clips are drawn (`synthetic.questions_per_clip`: 2 + Binomial(5, 0.32), shares
0.145, 0.342, 0.322, 0.151, 0.036, 0.003, mean 3.6); per count, one typical synthetic
clip (4 frames, 1,024 image tokens, ~75 text tokens a question) is counted as one tree
and as its questions one by one (unpadded: the separate layout at its cheapest; five of
their shapes counted, the others exactly from those, `lone_counts`). A tree's attention
runs SDPA with a float mask, and a dense kernel computes every pair of such a mask, the
hidden ones too: it counts as the full L×L square; the separate samples' attention stays
causal, as above.

The model computes in config.yaml's dtype (bfloat16; FLOPs do not depend on it, and this
CPU runs bfloat16 matmuls five times faster than float32).

Run: `python bench/flops.py` (part of `make bench`; 867 s and 12 GB of memory on 2 shared
cores, 2026-12-06, the stage-1 layouts included; writes a 3 GB random model to a temporary
folder, or to `--workdir` to keep it); `--tiny` for the tiny architecture in float32
(seconds; `make test` runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import transformers
from synthetic import CONFIG, STAGES, questions_per_clip, stage_dataset, write_clips
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from train_step import LORA, model_flops, visual_flops

from robovqa_ft.training import random_model
from robovqa_ft.training.attention import BRANCH
from robovqa_ft.training.collate import collator
from robovqa_ft.training.metrics import MetricsLog
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.random_model import (
    build_random_internvl,
    conversation_texts,
    internvl_config,
)
from robovqa_ft.training.samples import IGNORE_INDEX
from robovqa_ft.training.train import CurriculumTrainer, training_arguments
from robovqa_ft.training.trees import ClipTrees, clip_trees

GROUPS = ("vision", "projector", "language model", "LoRA", "head", "other")
TOTALS = (*GROUPS, "recompute", "executed")  # the lines of a step's or a question's FLOPs
PHASES = ("forward", "backward", "recompute")
TEXT_LAYERS, VISION_LAYERS = 2, 1  # built and measured
OTHER = ("other", 1.0)
GROUP_KEY = "flops_group"  # in an autograd node's metadata: the group whose forward made it
CHECKPOINTING = {False: "gc off", True: "gc on"}
TRAINING = {"max_steps": 1, "logging_steps": 1, "eval_steps": 1, "save_steps": 1,
            "save_total_limit": 1, "seed": 0, "dataloader_workers": 0,
            "hang_timeout_minutes": 30}  # fmt: skip


def measured_architecture(name: str) -> str:
    """Registers `name` with TEXT_LAYERS text and VISION_LAYERS vision layers; returns its
    name for `build_random_internvl`."""
    arch = random_model.ARCHITECTURES[name]
    random_model.ARCHITECTURES[f"{name}-measured"] = {
        **arch,
        "text_config": {**arch["text_config"], "num_hidden_layers": TEXT_LAYERS},
        "vision_config": {**arch["vision_config"], "num_hidden_layers": VISION_LAYERS},
    }
    return f"{name}-measured"


def module_groups(model, text_layers: int, vision_layers: int) -> dict:
    """Each module of a group: (group, how many times the real model runs it per run here)."""
    groups = {}
    for name, module in model.named_modules():
        if re.search(r"\.lora_[AB]\b", name):
            group = "LoRA"
        elif "vision_tower" in name:
            group = "vision"
        elif "multi_modal_projector" in name:
            group = "projector"
        elif "lm_head" in name:
            group = "head"
        elif "language_model" in name:
            group = "language model"
        else:
            continue
        scale = 1.0
        if layer := re.search(r"language_model\.layers\.(\d+)\b", name):
            scale = 1.0 if layer[1] == "0" else (text_layers - 1) / (TEXT_LAYERS - 1)
        elif re.search(r"vision_tower\.encoder\.layer\.\d+\b", name):
            scale = vision_layers / VISION_LAYERS
        groups[module] = (group, scale)
    return groups


def _causal_share(query_shape, key_shape, is_causal: bool) -> float:
    """Share of the query-key pairs that causal attention computes (top-left aligned)."""
    s_q, s_k = query_shape[-2], key_shape[-2]
    return sum(min(i + 1, s_k) for i in range(s_q)) / (s_q * s_k) if is_causal else 1.0


def cpu_attention_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kw):
    return round(sdpa_flop_count(q, k, v) * _causal_share(q, k, is_causal))


def cpu_attention_backward_flops(
    grad_out, q, k, v, out, logsumexp, dropout_p=0.0, is_causal=False, *a, out_shape=None, **kw
):
    return round(sdpa_backward_flop_count(grad_out, q, k, v) * _causal_share(q, k, is_causal))


CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        cpu_attention_backward_flops
    ),
}


class _TagNodes(TorchFunctionMode):
    """Tags each autograd node a forward makes with the group running."""

    def __init__(self, tracker: GroupTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() == -1:  # not a recomputation in backward
            where = self.tracker.running[-1] if self.tracker.running else OTHER
            outputs = out if isinstance(out, tuple | list) else (out,)
            nodes = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]
            while nodes:  # this call's new nodes: back to those tagged before
                node = nodes.pop()
                if node is not None and GROUP_KEY not in node.metadata:
                    node.metadata[GROUP_KEY] = where
                    nodes += [n for n, _ in node.next_functions]
        return out


class GroupTracker:
    """Stands in for `FlopCounterMode`'s module tracker, whose backward attribution relies
    on gradient hooks that frozen modules never fire (it then charges later backward ops
    to every module still open). Its `parents` name the group and phase of the op running:
    in forward, the innermost group module running; in backward, the group whose forward
    made the autograd node running; a module forward inside backward is a recomputation.
    It reads torch internals (`torch._C._current_graph_task_id`, `_current_autograd_node`,
    the counter's `mod_tracker`) as torch 2.14 has them: another torch may need changes."""

    def __init__(self, groups: dict):
        self.groups, self.running = groups, []

    @property
    def parents(self) -> set[str]:
        if torch._C._current_graph_task_id() == -1:
            phase, where = "forward", self.running[-1] if self.running else OTHER
        elif self.running:
            phase, where = "recompute", self.running[-1]
        else:
            node = torch._C._current_autograd_node()
            phase, where = "backward", node.metadata.get(GROUP_KEY, OTHER) if node else OTHER
        return {"Global", f"{where[0]}|{phase}|{where[1]}"}

    def _enter(self, module, args) -> None:
        if module in self.groups:
            self.running.append(self.groups[module])

    def _leave(self, module, args, output) -> None:
        # always called, also when checkpointing stops a recomputation early by raising
        if module in self.groups:
            self.running.pop()

    def __enter__(self):
        self.hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
            torch.nn.modules.module.register_module_forward_hook(self._leave, always_call=True),
        ]
        self.tagging = _TagNodes(self)
        self.tagging.__enter__()
        return self

    def __exit__(self, *exc):
        self.tagging.__exit__(None, None, None)
        for hook in self.hooks:
            hook.remove()


def count_step(model, trainer, batch, groups: dict) -> dict[tuple[str, str], float]:
    """FLOPs per (group, phase) of one micro-batch's training step, at the real depth."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    counter.mod_tracker = GroupTracker(groups)  # see GroupTracker
    labelled = (batch["labels"] != IGNORE_INDEX).sum()
    with counter:
        trainer.training_step(model, batch, num_items_in_batch=labelled)
    model.zero_grad(set_to_none=True)
    flops = defaultdict(float)
    for key, ops in counter.get_flop_counts().items():
        if key != "Global":
            group, phase, scale = key.split("|")
            flops[group, phase] += sum(ops.values()) * float(scale)
    return flops


def mean_length_batch(dataset, micro_batch: int) -> list[dict]:
    """`micro_batch` samples of the length nearest the stage's mean (equal lengths where
    there are: no padding)."""
    lengths = dataset.token_lengths()
    mean = statistics.mean(lengths)
    shared = [n for n in set(lengths) if lengths.count(n) >= micro_batch] or lengths
    nearest = min(shared, key=lambda n: (abs(n - mean), n))
    order = sorted(range(len(lengths)), key=lambda i: (abs(lengths[i] - nearest), i))
    return [dataset[i] for i in order[:micro_batch]]


def measured_model(model_dir: Path, full, args, checkpointing: bool) -> tuple:
    """(the measured model with LoRA, its `module_groups`)."""
    model = load_model(model_dir, "none", args.dtype, "sdpa", checkpointing)
    model = attach_lora(model, **LORA)
    groups = module_groups(
        model, full.text_config.num_hidden_layers, full.vision_config.num_hidden_layers
    )
    return model, groups


def stage_trainer(model, stage: str, args, out: Path) -> CurriculumTrainer:
    """The training code's trainer at config.yaml's settings of `stage`."""
    targs = training_arguments(out, CONFIG[stage], TRAINING, {"dtype": args.dtype})
    targs = dataclasses.replace(targs, eval_strategy="no", save_strategy="no")
    return CurriculumTrainer(model=model, args=targs, metrics=MetricsLog(out, 0, 0))


def totals(flops: dict[tuple[str, str], float]) -> dict[str, float]:
    """FLOPs per (group, phase) as `TOTALS`: each group's forward and backward, all
    groups' recompute, and everything executed."""
    lines = {g: flops[g, "forward"] + flops[g, "backward"] for g in GROUPS}
    lines["recompute"] = sum(flops[g, "recompute"] for g in GROUPS)
    lines["executed"] = sum(lines.values())
    return lines


def measure(model_dir: Path, batches: dict, full, args, out: Path) -> dict:
    """(stage, checkpointing) -> (FLOPs per (group, phase) of one optimizer step, the
    formula's model FLOPs of that step); `batches`: stage -> (micro-batch, its lengths)."""
    text_layers = full.text_config.num_hidden_layers
    results = {}
    for checkpointing in (False, True):
        model, groups = measured_model(model_dir, full, args, checkpointing)
        lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for stage, (batch, lengths) in batches.items():
            trainer = stage_trainer(model, stage, args, out)
            per_step = CONFIG[stage]["grad_accum"]  # micro-batches of one optimizer step
            flops = count_step(model, trainer, batch, groups)
            formula = model_flops(
                full, lengths * per_step,
                int((batch["labels"] != IGNORE_INDEX).sum()) * per_step,
                visual_flops(full, batch) * per_step,
                lora_params * text_layers // TEXT_LAYERS,  # LoRA sits in every layer alike
            )  # fmt: skip
            step = defaultdict(float, {key: value * per_step for key, value in flops.items()})
            results[stage, checkpointing] = step, formula
            del trainer
        del model
    return results


def typical_clips(clips: ClipTrees, counts) -> dict[int, int]:
    """For each question count, the clip of that many questions whose tokens as trees are
    nearest the mean of all such clips (the first of equals)."""
    tokens = clips.token_counts()
    chosen = {}
    for count in counts:
        alike = [c for c, n in enumerate(clips.questions) if n == count]
        if not alike:
            raise SystemExit(f"no synthetic clip of {count} questions: raise --clips")
        mean = statistics.mean(tokens[c] for c in alike)
        chosen[count] = min(alike, key=lambda c: (abs(tokens[c] - mean), c))
    return chosen


def layout_clips(processor, paths: dict) -> dict[int, tuple[list[dict], list[dict]]]:
    """Question count -> (a typical clip's stage-1 questions as encoded, its trees)."""
    stage1 = stage_dataset(processor, paths, "stage1")
    questions = ClipTrees(stage1)
    clips = {}
    for count, clip in typical_clips(questions, questions_per_clip()).items():
        samples = [stage1.builder.encode(row) for row in questions.rows(clip)]
        clips[count] = samples, clip_trees(samples, CONFIG["stage1"]["max_seq_len"])
    return clips


def measure_layouts(model_dir: Path, clips: dict, pad, full, args, out: Path) -> tuple:
    """(layout ("separate", "tree") -> group (`TOTALS`) -> stage 1's FLOPs per question,
    with config.yaml's gradient checkpointing; (the separate samples' shapes counted, all
    their shapes): `lone_counts`). `clips`: question count -> (the clip's encoded
    questions, its trees), weighted by `questions_per_clip`."""
    model, groups = measured_model(model_dir, full, args, CONFIG["model"]["gradient_checkpointing"])
    trainer = stage_trainer(model, "stage1", args, out)
    shares = questions_per_clip()
    summed = {"separate": defaultdict(float), "tree": defaultdict(float)}
    questions = [sample for samples, _ in clips.values() for sample in samples]
    alone, counted = lone_counts(questions, lambda s: count_step(model, trainer, pad([s]), groups))
    for count, (samples, trees) in clips.items():
        for sample in samples:
            for key, value in alone[lone_shape(sample)].items():
                summed["separate"][key] += shares[count] * value
        for key, value in count_step(model, trainer, pad([trees]), groups).items():
            summed["tree"][key] += shares[count] * value
    per_clip = sum(shares[count] * count for count in clips)
    per_question = {layout: {line: value / per_clip for line, value in totals(flops).items()}
                    for layout, flops in summed.items()}  # fmt: skip
    return per_question, (counted, len(alone))


def lone_shape(sample: dict) -> tuple[int, int, int]:
    """(tokens, labelled tokens, tiles): all that a lone sample's FLOPs depend on."""
    labelled = int((sample["labels"] != IGNORE_INDEX).sum())
    return len(sample["input_ids"]), labelled, len(sample["pixel_values"])


def lone_counts(samples: list[dict], count) -> tuple[dict, int]:
    """(shape (`lone_shape`) -> FLOPs per (group, phase) of a sample of that shape counted
    alone, for each of `samples`' shapes; how many shapes `count` counted).

    Op by op, a lone sample's counted FLOPs are its frames' (the same tiles for all), its
    T tokens' (matmuls), its causal attention's T(T+1)/2 query-key pairs' or its k
    labelled tokens' (the head's): each count is a + b·T + c·T² + d·k. Five shapes are
    counted (the fewest and most tokens, the fewest and most labelled, the median, then
    the quartiles where those coincide); the others follow from them by least squares,
    when those five fit it to rounding. Else every shape is counted."""
    first = {lone_shape(s): s for s in reversed(samples)}
    shapes = sorted(first)
    by_labels = sorted(shapes, key=lambda s: (s[1], s))
    spread = [shapes[0], shapes[-1], by_labels[0], by_labels[-1],
              *(shapes[len(shapes) * q // 4] for q in (2, 1, 3))]  # fmt: skip
    counts = {shape: count(first[shape]) for shape in list(dict.fromkeys(spread))[:5]}
    counted = len(counts)
    keys = sorted({key for flops in counts.values() for key in flops})
    centre = statistics.mean(t for t, _, _ in shapes)  # for the fit's conditioning

    def basis(of: list) -> np.ndarray:
        return np.array([[1.0, t - centre, (t - centre) ** 2, k] for t, k, _ in of])

    known = basis(list(counts))
    measured = np.array([[flops[key] for key in keys] for flops in counts.values()])
    fit, _, rank, _ = np.linalg.lstsq(known, measured, rcond=None)
    exact = (len(counts) > 4 and rank == 4 and len({tiles for *_, tiles in shapes}) == 1
             and np.allclose(known @ fit, measured, rtol=1e-9, atol=1.0))  # fmt: skip
    for shape in shapes:
        if shape in counts:
            continue
        if exact:
            counts[shape] = dict(zip(keys, (basis([shape]) @ fit)[0], strict=True))
        else:
            counts[shape] = count(first[shape])
    return counts, counted if exact else len(shapes)


def clip_shape(samples: list[dict], trees: list[dict]) -> str:
    """A clip's tokens in both layouts, for the output."""
    labelled = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in samples)
    parts = []
    for tree in trees:
        branches = torch.bincount(tree[BRANCH])
        parts.append(f"{len(tree['input_ids'])} tokens (a prefix of {int(branches[0])}, "
                     f"branches of {', '.join(map(str, branches[1:].tolist()))})")  # fmt: skip
    return (
        f"{len(samples)} questions ({labelled} labelled tokens): "
        f"{len(trees)} tree{'s' * (len(trees) > 1)} of {'; '.join(parts)}, or "
        f"samples of {', '.join(str(len(s['input_ids'])) for s in samples)}"
    )


def print_tables(results: dict) -> None:
    print("stage | checkpointing | " + " | ".join(GROUPS) +
          " | recompute | executed | model | executed/model")  # fmt: skip
    for (stage, checkpointing), (flops, formula) in results.items():
        lines = totals(flops)
        cells = [f"{lines[line] / 1e12:.4g}" for line in TOTALS] + [f"{formula / 1e12:.4g}"]
        print(" | ".join([stage, CHECKPOINTING[checkpointing], *cells,
                          f"{lines['executed'] / formula:.3f}"]))  # fmt: skip
    print("stage | checkpointing | group | " + " | ".join(PHASES))
    for (stage, checkpointing), (flops, _) in results.items():
        for group in GROUPS:
            cells = [f"{flops[group, p] / 1e12:.4g}" for p in PHASES]
            print(" | ".join([stage, CHECKPOINTING[checkpointing], group, *cells]))


def print_layouts(per_question: dict, clips: dict, counted: tuple[int, int]) -> None:
    shares = questions_per_clip()
    print(f"# stage1 as trees beside separate samples, TFLOP per question "
          f"({CHECKPOINTING[CONFIG['model']['gradient_checkpointing']]}): one clip of each "
          f"count, weighted {', '.join(f'{n}: {p:.3f}' for n, p in shares.items())} (mean "
          f"{sum(n * p for n, p in shares.items()):.1f} questions a clip); a tree's masked "
          f"attention counts its full L x L square (a dense kernel computes every pair of a "
          f"float mask), a sample's causal attention T(T+1)/2 pairs")  # fmt: skip
    for samples, trees in clips.values():
        print(f"# {clip_shape(samples, trees)}")
    fitted = "" if counted[0] == counted[1] else ", the others fitted (`lone_counts`)"
    print(f"# the separate samples: {counted[0]} of their {counted[1]} shapes counted{fitted}")
    print("stage1 per question | separate | tree | separate/tree")
    for line in TOTALS:
        separate, tree = per_question["separate"][line], per_question["tree"][line]
        ratio = f"{separate / tree:.2f}x" if tree else "-"
        print(f"{line} | {separate / 1e12:.4g} | {tree / 1e12:.4g} | {ratio}")


def run(args, workdir: Path) -> None:
    architecture = "tiny" if args.tiny else "internvl3-8b"
    paths = write_clips(workdir / "clips", args.clips, seed=0, shared_frames=True)
    model_dir = workdir / f"model-{architecture}-measured-{args.dtype}"
    if not model_dir.exists():
        build_random_internvl(
            model_dir, conversation_texts([paths["stage2"]]), measured_architecture(architecture),
            vocab_size=8000, dtype=getattr(torch, args.dtype),
        )  # fmt: skip
    processor = load_processor(model_dir)
    full = internvl_config(architecture, processor)  # the real depth, for scale and formula
    pad = collator(CONFIG["training"]["padding"], processor.tokenizer.pad_token_id)
    print(f"# {time.strftime('%Y-%m-%d')}, CPU ({platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {architecture} width with {TEXT_LAYERS} text and "
          f"{VISION_LAYERS} vision layers scaled to {full.text_config.num_hidden_layers} and "
          f"{full.vision_config.num_hidden_layers}, {args.dtype}, TFLOP per optimizer "
          f"step")  # fmt: skip
    batches = {}
    for stage in args.stages:
        samples = mean_length_batch(stage_dataset(processor, paths, stage),
                                    CONFIG[stage]["batch_size"])  # fmt: skip
        batches[stage] = pad(samples), [len(s["input_ids"]) for s in samples]
        labelled = [int((s["labels"] != IGNORE_INDEX).sum()) for s in samples]
        print(f"# {stage}: micro-batches of {len(samples)} samples of "
              f"{', '.join(str(len(s['input_ids'])) for s in samples)} tokens "
              f"({', '.join(map(str, labelled))} labelled), {len(samples[0]['pixel_values'])} "
              f"tiles each, {CONFIG[stage]['grad_accum']} a step")  # fmt: skip
    print_tables(measure(model_dir, batches, full, args, workdir / "out"))

    if "stage1" in args.stages:
        clips = layout_clips(processor, paths)
        per_question, counted = measure_layouts(model_dir, clips, pad, full, args, workdir / "out")
        print_layouts(per_question, clips, counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keeps the random model between runs")
    parser.add_argument("--clips", type=int, default=400, help="synthetic clips for the mean")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--dtype", default=CONFIG["model"]["dtype"])
    parser.add_argument("--tiny", action="store_true", help="tiny model, float32 (tests)")
    args = parser.parse_args()
    if args.tiny:
        args.dtype, args.clips = "float32", 40
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.workdir:
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="flops-") as tmp:  # the model is 3 GB
            run(args, Path(tmp))
    print(f"# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
