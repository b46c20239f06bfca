"""Seconds per optimizer step of InternVL3-8B LoRA training, per configuration.

The full-size architecture (7.94B parameters, untied head) is built from its config with
random weights (nothing is downloaded), saved once, and loaded per configuration through
the project's own `load_model` and `attach_lora` (LoRA r 128 on the language model).
Samples are synthetic clips shaped like stage 1 (4 frames, one question, ~1.1k tokens)
and stage 2 (10 frames, the clip's 2-7 questions, ~2.8k tokens), encoded by the project's
`SampleBuilder`; steps run through its `CurriculumTrainer` and collators.

Per configuration and stage, one line: seconds per optimizer step of `--samples-per-step`
samples (median of the timed steps; the first step is a warm-up), real tokens/s, model
TFLOP/s, MFU, peak GPU memory, and the share of computed tokens that are real.

Model FLOPs per step (gradient-checkpointing recomputation not counted, as MFU requires):
  language model, per sample of T tokens: 4·N_lm·T (forward 2, input gradients 2; the
  frozen weights get no gradient) + 6·N_lora·T + attention 6·L·d·T² (causal: forward
  2·L·d·T², backward twice that); N_lm = the language model's matmul weights + head;
  vision tower and projector, frozen and before any LoRA, forward only, per tile:
  2·N_vit·P + 4·L_v·d_v·P² + 2·N_proj·P' (P = 1025 patches + class, P' = 256 tokens).
MFU = model FLOPs / (seconds per step × peak): 989 TFLOP/s dense bf16 for H100 SXM and
H200 (the nf4 path computes in bf16 too); `--peak-tflops` for any other device.

Run on a GPU: `python benchmarks/train_step.py --workdir /tmp/bench` (the random 8B
weights are written once to the workdir, 16 GB; `--only` and `--steps 1` shorten a run).
On a CPU: `--tiny`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from synthetic import CONFIG, STAGES, stage_dataset, write_clips
from torch.utils.data import Dataset
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import is_flash_attn_2_available

from robovqa_ft.model import attach_lora, load_model, load_processor
from robovqa_ft.random_model import build_random_internvl, conversation_texts
from robovqa_ft.samples import StepSampler, collator
from robovqa_ft.train import CurriculumTrainer, MetricsLog, training_arguments

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H100 PCIe": 756.0, "A100": 312.0}


@dataclasses.dataclass(frozen=True)
class Setup:
    quantization: str  # nf4 (QLoRA) or none (bf16 LoRA)
    gradient_checkpointing: bool
    attention: str  # sdpa or flash_attention_2
    micro_batch: int
    padding: str  # longest, grouped or packed

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
    return chosen


class Samples(Dataset):
    """Encoded samples held in memory: the step time is the GPU's, not the data path's
    (benchmarks/dataloader.py measures that)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class StepTimer(TrainerCallback):
    """Wall time and real/computed tokens of each optimizer step."""

    def __init__(self, metrics: MetricsLog):
        self.metrics, self.steps = metrics, []
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append((now - self.last, self.metrics.tokens, self.metrics.computed))
        self.metrics.tokens = self.metrics.computed = 0
        self.last = now


def model_flops(config, lengths: list[int], tiles: int, lora_params: int) -> float:
    """Model FLOPs of one optimizer step over samples of `lengths` tokens (module docstring)."""
    text, vision = config.text_config, config.vision_config
    d, layers = text.hidden_size, text.num_hidden_layers
    kv = text.num_key_value_heads * d // text.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * text.intermediate_size  # q,o + k,v + MLP
    n_lm = layers * per_layer + d * text.vocab_size  # + head
    dv, lv = vision.hidden_size, vision.num_hidden_layers
    n_vit = lv * (4 * dv * dv + 2 * dv * vision.intermediate_size)
    patches = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1
    projected = config.image_seq_length
    n_proj = 4 * dv * d + d * d  # 4096 -> 3584 -> 3584
    tokens = sum(lengths)
    language = (4 * n_lm + 6 * lora_params) * tokens + 6 * layers * d * sum(t * t for t in lengths)
    visual = tiles * (2 * n_vit * patches + 4 * lv * dv * patches**2 + 2 * n_proj * projected)
    return language + visual


def encode(paths: dict, processor, stage: str, count: int) -> list[dict]:
    dataset = stage_dataset(processor, paths, stage)
    return [dataset[i % len(dataset)] for i in range(count)]


def measure(setup: Setup, stage: str, model, processor, samples: list[dict], args, out: Path):
    """Time `args.steps` optimizer steps after one warm-up step; returns the figures."""
    stage_settings = {  # config.yaml's stage, with this setup's micro-batch
        **CONFIG[stage], "batch_size": setup.micro_batch,
        "grad_accum": args.samples_per_step // setup.micro_batch,
    }  # fmt: skip
    training = {"max_steps": 1 + args.steps, "logging_steps": 10**6, "eval_steps": 10**6,
                "save_steps": 10**6, "save_total_limit": 2, "seed": 0,
                "dataloader_workers": 0, "hang_timeout_minutes": 30}  # fmt: skip
    model_settings = {"dtype": args.dtype}
    targs = training_arguments(out, stage_settings, training, model_settings)
    targs = dataclasses.replace(targs, eval_strategy="no", save_strategy="no", disable_tqdm=True)
    trainer = CurriculumTrainer(
        model=model, args=targs, train_dataset=Samples(samples),
        data_collator=collator(setup.padding, processor.tokenizer.pad_token_id),
    )  # fmt: skip
    if setup.padding == "grouped":
        lengths = [len(s["input_ids"]) for s in samples]
        trainer.train_sampler = StepSampler(len(lengths), args.samples_per_step, 0, lengths)
    trainer.metrics = MetricsLog(out, 0, 0)
    timer = StepTimer(trainer.metrics)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # one line per setup, printed below
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer.last = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    timed = timer.steps[1:]
    seconds = statistics.median(t for t, _, _ in timed)
    real = sum(r for _, r, _ in timed) / len(timed)
    computed = sum(c for _, _, c in timed) / len(timed)
    # Steps draw their samples at random: count the FLOPs of the average step.
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = model_flops(
        model.config, [len(s["input_ids"]) for s in samples],
        sum(len(s["pixel_values"]) for s in samples), lora_params,
    ) * args.samples_per_step / len(samples)  # fmt: skip
    del trainer
    return {"seconds": seconds, "tokens_per_s": real / seconds, "tflops": flops / seconds / 1e12,
            "peak_gb": peak, "real_share": real / computed}  # fmt: skip


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
    count = args.samples_per_step * (1 + args.steps)
    samples = {stage: encode(paths, processor, stage, count) for stage in args.stages}

    flash = is_flash_attn_2_available()
    name, peak = device_peak(args)
    print(f"# {time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, "
          f"{architecture}, {args.samples_per_step} samples per step, "
          f"flash-attn {'installed' if flash else 'not installed'}")  # fmt: skip
    print("stage | quantization | gradient checkpointing | attention | micro-batch | padding | "
          "s/step | tokens/s | TFLOP/s | MFU | peak GB | real tokens")  # fmt: skip
    chosen = setups(flash)
    for number, setup in enumerate(chosen, 1):
        if args.only and number not in args.only:
            continue
        try:
            model = load_model(model_dir, setup.quantization, args.dtype, setup.attention,
                               setup.gradient_checkpointing)  # fmt: skip
            model = attach_lora(model, r=128, alpha=256, dropout=0.05)
        except Exception as error:  # noqa: BLE001 - a setup that cannot load is a result
            print(f"all | {setup.label(args.dtype)} | cannot load: {type(error).__name__}: {error}")
            continue
        for stage in args.stages:
            r = None
            try:
                r = measure(setup, stage, model, processor, samples[stage], args, workdir / "out")
            except torch.OutOfMemoryError:
                print(f"{stage} | {setup.label(args.dtype)} | out of memory", flush=True)
            # outside the except clause, whose traceback still holds the Trainer
            model.zero_grad(set_to_none=True)
            free_memory()
            if r is None:
                continue
            mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
            memory = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
            figures = [f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.3g}",
                       mfu, memory, f"{r['real_share']:.1%}"]  # fmt: skip
            print(" | ".join([stage, setup.label(args.dtype), *figures]), flush=True)
        del model
        free_memory()


if __name__ == "__main__":
    main()
