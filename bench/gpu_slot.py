"""The training-step benchmark (bench/train_step.py) as one command that fits a short
GPU slot: 15 minutes of device time in all, the machine's start included.

The slot's machine has its own python3 (3.12, torch 2.11, transformers 5.17, no
bitsandbytes, no package registry) and takes at most 64 MiB of files with a command. The
project's pins that it lacks travel as wheels in .whl/ (`make gpu-wheels`) and are
installed ahead of its own packages; the project runs from the working tree. The command,
for the device tool's `run` with carry [".whl"] and timeout_s 420:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 bench/gpu_slot.py --out $OUT --budget-seconds 300

What it does, each line appended to OUT/gpu_slot.md as it completes, and printed (the
traceback of any failure to OUT/gpu_slot_errors.txt):
  1. a header: date, device, Python, and each package's version and where it came from;
  2. a smoke run: the tiny Qwen3-VL's one setup first (its time also sizes what the
     InternVL run leaves it, 5. below), then every setup below on the tiny InternVL
     (seconds on a GPU); a setup that fails here is left out of the full-size run, so a
     broken path costs no 8B time;
  3. InternVL3-8B, the setups in `flop_order` (the seed's and bf16 LoRA, then the fewest
     counted executed FLOPs first; packing only with flash-attention 2), each built in memory on the GPU in bf16 with random weights (no 16 GB
     save and load; nf4 quantized where it sits, as `from_pretrained` would), prepared
     by the project's `prepare_model` and `attach_lora`; one warm-up and one timed step
     of 32 samples per stage, and for the two baselines a `stage1 tree` line: stage 1 as
     config.yaml lays it out, steps of whole clips of 32 questions as trees (train_step's
     docstring; a setup whose tree line failed in the smoke run keeps its other lines);
  4. the default it points to: the fewest seconds for a stage-1 plus a stage-2 step among
     the setups whose peak memory stays within 60 GB, so that it fits an 80 GB card;
  5. Qwen3-VL-8B (`random_model.QWEN3_VL_8B`, the published architecture) built the same
     way, after every InternVL model is freed (the two 8B models, 16 and 17.5 GB in bf16,
     are never held at once; its heading says what the GPU still holds): bf16 LoRA r 128
     on the language model (train_step's setup 3: gc on, sdpa, micro-batch 2, padding to
     the longest), the frames as one video at 2 frames a second (`families.family_of(
     "qwen3_vl", "video")`; 288 px frames, 81 tokens a frame pair), its stage 1, stage 2
     and stage 1 tree lines, counted as train_step counts InternVL's (its `step_flops`:
     the language terms of its text config and, from `visual_flops`, Qwen3-VL's own
     vision tower and mergers, for its MFU column).

The budget counts from the script's start: a setup starts only if the time left covers
the one before it, a running one ends once the time left would not cover another step as
long as its last, and a last line names what was not run; the exit status is 0. The
InternVL run ends early enough to leave Qwen3-VL-8B a minute, or twice its smoke run if
that is longer (a `kept` line says how long): after the two InternVL baselines, the
Qwen3-VL line comes before InternVL's other setups. `--only` picks setups of both models
(Qwen3-VL runs setup 3 alone); `--counted-order` prints both models' counts. Rehearsed on
a CPU with `--tiny` (tiny models, float32): `make rehearse-gpu-slot`.
"""  # noqa: E501 - the command above is one line, to be passed as it is

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from synthetic import STAGES, processor_for, write_clips
from train_step import (
    COLUMNS,
    LORA,
    TREES,
    Setup,
    device_peak,
    encode,
    free_memory,
    lora_parameters,
    setups,
    stage_lines,
    stage_samples,
    step_flops,
)
from transformers import AutoModelForImageTextToText
from transformers.quantizers import AutoHfQuantizer
from transformers.utils import is_flash_attn_2_available

from robovqa_ft.training.families import FAMILIES, Family, family_of
from robovqa_ft.training.model import attach_lora, nf4_config, prepare_model
from robovqa_ft.training.random_model import (
    ARCHITECTURES,
    build_qwen3_vl_processor,
    conversation_texts,
    internvl_config,
    qwen3_vl_config,
)

# train_step's setups, by number: the seed's (1) and bf16 LoRA (3) first, the baselines
# every other is compared with; the rest in `flop_order`.
BASELINES = (1, 3)
DEFAULT_PEAK_GB = 60.0  # the default must fit an 80 GB card
FULL_SETUP_SECONDS = 60.0  # an 8B setup: built, two warm-up and two timed steps at least
PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "huggingface_hub",
            "safetensors", "bitsandbytes")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
    """A family the slot measures: its architectures (random_model's, "tiny" and `full`),
    processor, config, the setups it runs (train_step's numbers; None: every one) and how
    its samples are encoded (`family`, `frame_rate`: train_step's `stage_samples`)."""

    name: str
    full: str  # the full-size architecture
    family: Family
    make_processor: Callable[[dict, str], object]  # (clips' paths, architecture)
    make_config: Callable[[str, object], object]  # (architecture, processor)
    numbers: tuple[int, ...] | None = None
    frame_rate: float | None = None  # the stored frames' rate, for frames as a video

    def architecture(self, tiny: bool) -> str:
        return "tiny" if tiny else self.full


INTERNVL = Model(
    "InternVL", "internvl3-8b", FAMILIES["internvl"],
    lambda paths, architecture: processor_for(paths, ARCHITECTURES[architecture]["image_size"]),
    internvl_config,
)  # fmt: skip
QWEN3_VL = Model(
    "Qwen3-VL", "qwen3-vl-8b", family_of("qwen3_vl", "video"),
    lambda paths, _: build_qwen3_vl_processor(conversation_texts([paths["stage2"]]), 8000),
    qwen3_vl_config, numbers=(3,), frame_rate=2.0,
)  # fmt: skip
MODELS = (QWEN3_VL, INTERNVL)  # the smoke run's order; the full-size run's is InternVL first


def slot_setups(flash: bool, only: list[int] | None = None) -> list[tuple[int, Setup]]:
    """(number, setup) of train_step's setups, or of `only`'s, in that order."""
    chosen = setups(flash)
    return [(number, chosen[number - 1]) for number in only or range(1, len(chosen) + 1)]


def model_setups(
    model: Model, flash: bool, only: list[int] | None = None
) -> list[tuple[int, Setup]]:
    """`slot_setups` that `model` runs (its `numbers`, those of them in `only`)."""
    if model.numbers is None:
        return slot_setups(flash, only)
    numbers = [n for n in model.numbers if not only or n in only]
    return slot_setups(flash, numbers) if numbers else []


def flop_order(
    chosen: list[tuple[int, Setup]], config, samples: dict[str, list], per_step: int
) -> tuple[list[tuple[tuple[int, Setup], float]], list[tuple[tuple[int, Setup], float]]]:
    """(the setups to run, those left out), each with its counted executed FLOPs of a
    stage-1 plus a stage-2 step (train_step's `step_flops`, for the family of `config`;
    stage 1 in the separate layout, which every setup runs): the baselines first, then
    the fewest FLOPs first. Packing runs only with flash-attention 2, whose varlen kernel
    attends within each sample: under SDPA a packed micro-batch is one row with a dense
    block mask over all its samples (at stage 2, micro-batch 8, ~6x the attention of
    padding to the longest), the slowest way to spend the slot."""
    lora = lora_parameters(config, LORA["r"])
    counted = {
        number: sum(step_flops(config, setup, samples[stage], per_step, lora)[1]
                    for stage in STAGES)
        for number, setup in chosen
    }  # fmt: skip

    def rank(numbered: tuple[int, Setup]) -> tuple[int, float]:
        number = numbered[0]
        return (0, BASELINES.index(number)) if number in BASELINES else (1, counted[number])

    ordered = [((n, s), counted[n]) for n, s in sorted(chosen, key=rank)]
    dense = [o for o in ordered if o[0][1].padding == "packed" and o[0][1].attention == "sdpa"]
    return [o for o in ordered if o not in dense], dense


def versions() -> str:
    """Python and each package: its version and the folder it was imported from."""
    parts = [f"python {platform.python_version()} ({sys.executable})"]
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - an absent package is a finding
            parts.append(f"{name} absent ({type(error).__name__})")
            continue
        parts.append(f"{name} {module.__version__} ({Path(module.__file__).parents[1]})")
    return ", ".join(parts)


def keep_traceback(out: Path, what: str) -> None:
    """Beside the report, in gpu_slot_errors.txt: the slot's machine is gone afterwards."""
    with (out / "gpu_slot_errors.txt").open("a", encoding="utf-8") as errors:
        errors.write(f"{what}\n{traceback.format_exc()}\n")


def quantize_nf4(model, dtype: torch.dtype) -> None:
    """What `from_pretrained` does under load_model's nf4 settings, to weights already in
    memory: transformers' bitsandbytes quantizer swaps the linear layers for 4-bit ones,
    and each keeps its weight, quantized as it is moved to its device."""
    import bitsandbytes as bnb

    family = FAMILIES[model.config.model_type]
    quantizer = AutoHfQuantizer.from_config(nf4_config(family, dtype))
    weights = dict(model.named_parameters())
    device = next(iter(weights.values())).device
    quantizer.preprocess_model(model, device_map={"": device})
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = weights.pop(f"{name}.weight").data
            module.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, **module.weight.__dict__
            ).to(device)
            if module.bias is not None:
                bias = weights.pop(f"{name}.bias").data
                module.bias = torch.nn.Parameter(bias, requires_grad=False)
    del weights
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def build_model(config, setup: Setup, dtype: torch.dtype, device: str):
    """A random model of `config` (InternVL or Qwen3-VL) made on `device`, of the class
    `load_model` loads, prepared as it prepares a loaded one, with the run's LoRA."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            copy.deepcopy(config), dtype=dtype, attn_implementation=setup.attention
        )
    if setup.quantization == "nf4":
        quantize_nf4(model, dtype)
    model = prepare_model(model, setup.quantization, setup.gradient_checkpointing)
    return attach_lora(model, **LORA)


def frames_note(config, sample: dict) -> str:
    """How a stage-1 sample gives its frames: the tokens of each."""
    ids = sample["input_ids"]
    if config.model_type == "internvl":
        tiles = len(sample["pixel_values"])
        tokens = int((ids == config.image_token_id).sum())
        return f"a tile a frame, {tokens // max(tiles, 1)} tokens each"
    pairs = int(sample["video_grid_thw"][:, 0].sum())
    tokens = int((ids == config.video_token_id).sum())
    return f"frames as one video, {tokens // max(pairs, 1)} tokens a frame pair"


def run_phase(
    title: str,
    model: Model,
    chosen: list[tuple[int, Setup]],
    architecture: str,
    paths: dict,
    args,
    settings: argparse.Namespace,
    deadline: float,
    emit: Callable[[str], None],
    first_estimate: float = 0.0,
) -> tuple[dict[int, dict], list[tuple[int, Setup]]]:
    """Each setup of `chosen` on `model`'s `architecture` while the budget covers it:
    ({number: {stage: figures}}, the setups not run). The first starts only if
    `first_estimate` seconds are left. Each setup's model is freed before the next is
    built, and the last before this returns."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, settings.dtype)
    processor = model.make_processor(paths, architecture)
    config = model.make_config(architecture, processor)
    samples = stage_samples(paths, processor, settings.stages, settings.samples_per_step,
                            1 + settings.steps, any(s.trees for _, s in chosen), model.family,
                            model.frame_rate)  # fmt: skip
    _, peak = device_peak(args)
    held = (f", {torch.cuda.memory_allocated() / 1e9:.1f} GB held on the GPU before it"
            if device == "cuda" else "")  # fmt: skip
    emit(f"## {title}: {model.name} {architecture}, {settings.dtype}, built on {device}, "
         f"{settings.samples_per_step} samples a step, {settings.steps} timed, "
         f"{frames_note(config, samples[STAGES[0]][0])}{held}")  # fmt: skip
    ordered, dense = flop_order(chosen, config, samples, settings.samples_per_step)
    if not args.only:  # a stated order and choice are kept
        chosen = [setup for setup, _ in ordered]
        if dense:
            emit(
                "left out, packed under SDPA (a dense block mask over the whole row): "
                + "; ".join(f"setup {n} {flops / 1e12:.3g} TFLOP" for (n, _), flops in dense)
            )
    counts = "; ".join(f"setup {n} {flops / 1e12:.3g}" for (n, _), flops in ordered)
    emit(f"order (baselines, then by counted executed TFLOP of a stage-1 + stage-2 step): "
         f"{counts}")  # fmt: skip
    emit(COLUMNS)
    results: dict[int, dict] = {}
    estimate = first_estimate  # then the setup before's seconds
    for index, (number, setup) in enumerate(chosen):
        if deadline - time.monotonic() < estimate:
            return results, chosen[index:]
        start = time.monotonic()
        label = setup.label(settings.dtype)
        try:
            built_model = build_model(config, setup, dtype, device)
        except Exception as error:  # noqa: BLE001 - a setup that cannot be built is a result
            emit(f"all | {label} | cannot build: {type(error).__name__}: {error}")
            keep_traceback(args.out, f"{title}, {model.name} setup {number}: cannot build")
            free_memory()
            continue
        built = time.monotonic() - start
        figures = {}
        try:
            out = args.workdir / "trainer"
            for stage, r, line in stage_lines(setup, built_model, processor, samples, settings,
                                              out, peak, deadline):  # fmt: skip
                emit(line)
                figures[stage] = r
        except Exception as error:  # noqa: BLE001 - a setup that fails is a result
            emit(f"all | {label} | failed: {type(error).__name__}: {error}")
            keep_traceback(args.out, f"{title}, {model.name} setup {number}: failed")
        del built_model
        free_memory()
        if figures:
            results[number] = figures
        estimate = time.monotonic() - start
        emit(f"# {model.name} setup {number}: {estimate:.0f} s ({built:.0f} s to build); "
             f"{deadline - time.monotonic():.0f} s of the budget left")  # fmt: skip
    return results, []


def default_line(results: dict[int, dict], chosen: list[tuple[int, Setup]], dtype: str) -> str:
    """The fastest stage-1 plus stage-2 step among the setups within `DEFAULT_PEAK_GB`."""
    labels = dict(chosen)
    whole = {n: f for n, f in results.items() if all(f.get(s) for s in STAGES)}
    if not whole:
        return "default: none, no setup measured both stages"
    peaks = {n: max(f[s]["peak_gb"] or 0.0 for s in STAGES) for n, f in whole.items()}
    measured = all(f[s]["peak_gb"] is not None for f in whole.values() for s in STAGES)
    fits = {n: f for n, f in whole.items() if peaks[n] <= DEFAULT_PEAK_GB}
    if not fits:
        return f"default: none, every setup measured peaks above {DEFAULT_PEAK_GB:.0f} GB"
    seconds = {n: sum(f[s]["seconds"] for s in STAGES) for n, f in fits.items()}
    best = min(seconds, key=seconds.get)
    memory = f"peak {peaks[best]:.1f} GB" if measured else "peak memory not measured on a CPU"
    return (f"default: setup {best}, {labels[best].label(dtype)}: stage 1 + stage 2 = "
            f"{seconds[best]:.2f} s a step, {memory} (the fastest of {len(fits)} within "
            f"{DEFAULT_PEAK_GB:.0f} GB)")  # fmt: skip


def names(chosen: list[tuple[int, Setup]], dtype: str) -> str:
    return "; ".join(f"setup {n} ({s.label(dtype)})" for n, s in chosen) or "none"


def model_names(lineups: list[tuple[Model, list[tuple[int, Setup]]]], dtype: str) -> str:
    """`names` of each model's setups, after its name."""
    return "; ".join(f"{m.name} {names(c, dtype)}" for m, c in lineups if c) or "none"


def main() -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_slot")),
                        help="folder for gpu_slot.md ($OUT where set)")  # fmt: skip
    parser.add_argument("--budget-seconds", type=float, default=300)
    parser.add_argument("--workdir", type=Path, help="for the clips (by default a temporary one)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--only", type=int, nargs="+", help="these setups (train_step's numbers)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model in float32 (CPU)")
    parser.add_argument("--counted-order", action="store_true",
                        help="print the full-size order and FLOP counts only")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu_slot-") as scratch:
        args.workdir = args.workdir or Path(scratch)
        if args.counted_order:
            print_counted_order(args)
        else:
            run_slot(args, started)


def print_counted_order(args) -> None:
    """The full-size run's order, with and without flash-attention 2, from the FLOP count
    alone, for each model: samples are encoded, no model is built (seconds on a CPU)."""
    paths = write_clips(args.workdir / "clips", 24, seed=0, shared_frames=True)
    per_step = 16 if args.tiny else 32
    for model in (INTERNVL, QWEN3_VL):
        architecture = model.architecture(args.tiny)
        processor = model.make_processor(paths, architecture)
        config = model.make_config(architecture, processor)
        samples = {stage: encode(paths, processor, stage, 2 * per_step, model.family,
                                 model.frame_rate) for stage in STAGES}  # fmt: skip
        print(f"{model.name} {architecture}, {per_step} samples a step; counted executed "
              f"TFLOP of a stage-1 + stage-2 step")  # fmt: skip
        for flash in (False, True):
            chosen = model_setups(model, flash)
            ordered, dense = flop_order(chosen, config, samples, per_step)
            print(f"flash-attention 2 {'installed' if flash else 'absent'}:")
            for (number, setup), flops in ordered:
                print(f"  setup {number} ({setup.label('bfloat16')}): {flops / 1e12:,.0f}")
            for (number, setup), flops in dense:
                print(f"  left out: setup {number} ({setup.label('bfloat16')}): "
                      f"{flops / 1e12:,.0f}")  # fmt: skip


def vetted(
    model: Model,
    chosen: list[tuple[int, Setup]],
    results: dict[int, dict],
    dtype: str,
    emit: Callable[[str], None],
) -> list[tuple[int, Setup]]:
    """The setups of `chosen` that measured both stages in the smoke run, each without
    its tree line where that failed; a line names those left out."""
    passed = [(n, s) for n, s in chosen
              if all(results.get(n, {}).get(stage) for stage in STAGES)]  # fmt: skip
    if failed := [(n, s) for n, s in chosen if (n, s) not in passed]:
        emit(f"left out, failed in the smoke run: {model.name} {names(failed, dtype)}")
    if no_trees := [(n, s) for n, s in passed if s.trees and not results[n].get(TREES)]:
        emit(f"left out, the {TREES} line failed in the smoke run: "
             f"{model.name} {names(no_trees, dtype)}")  # fmt: skip
        passed = [(n, dataclasses.replace(s, trees=False) if (n, s) in no_trees else s)
                  for n, s in passed]  # fmt: skip
    return passed


def run_slot(args, started: float) -> None:
    """The header, the smoke run, the full-size run and the default, within the budget."""
    deadline = started + args.budget_seconds
    args.out.mkdir(parents=True, exist_ok=True)
    report = (args.out / "gpu_slot.md").open("w", encoding="utf-8")

    def emit(line: str) -> None:
        report.write(line + "\n")
        report.flush()
        print(line, flush=True)

    name, peak = device_peak(args)
    flash = is_flash_attn_2_available()
    emit(f"# gpu_slot {time.strftime('%Y-%m-%d %H:%M %Z')}, {name}, "
         f"torch's CUDA {torch.version.cuda}, peak {peak or 'unknown'} TFLOP/s, "
         f"flash-attn {'installed' if flash else 'absent'}, {versions()}")  # fmt: skip
    lineups = [(model, model_setups(model, flash, args.only)) for model in MODELS]
    try:
        importlib.import_module("bitsandbytes")
    except Exception as error:  # noqa: BLE001 - then the nf4 setups cannot run
        emit(f"nf4: absent, bitsandbytes not installed ({type(error).__name__}: {error}); "
             "fetch_gpu_wheels.sh carries its wheel while the 64 MiB allow it")  # fmt: skip
        keep_traceback(args.out, "import bitsandbytes")
        lineups = [(m, [(n, s) for n, s in c if s.quantization != "nf4"]) for m, c in lineups]
    lineups = [(model, chosen) for model, chosen in lineups if chosen]

    paths = write_clips(args.workdir / "clips", 24, seed=0, shared_frames=True)
    dtype = "float32" if args.tiny else "bfloat16"
    smoke = argparse.Namespace(samples_per_step=8, steps=1, dtype=dtype, stages=STAGES)
    passed, skipped, smoke_seconds = [], [], {}
    for model, chosen in lineups:
        start = time.monotonic()
        results, not_run = run_phase("smoke", model, chosen, "tiny", paths, args, smoke,
                                     deadline, emit)  # fmt: skip
        smoke_seconds[model.name] = time.monotonic() - start
        passed.append((model, chosen, results))
        skipped.append((model, not_run))
    if any(not_run for _, not_run in skipped) or time.monotonic() > deadline:
        emit(f"skipped, the budget spent: {model_names(skipped, dtype)}; the full-size run")
        passed = []
    full = argparse.Namespace(samples_per_step=16 if args.tiny else 32, steps=1,
                              dtype=dtype, stages=STAGES)  # fmt: skip
    # InternVL first, then what it leaves time for; an 8B setup is built (seconds) and runs
    # two warm-up and two timed steps: a minute at the least, however fast the smoke went.
    first = 0.0 if args.tiny else FULL_SETUP_SECONDS
    full_run = sorted(((m, vetted(m, c, r, dtype, emit)) for m, c, r in passed),
                      key=lambda entry: entry[0] is not INTERNVL)  # fmt: skip
    for index, (model, chosen) in enumerate(full_run):
        if not chosen:
            continue
        later = [m for m, c in full_run[index + 1 :] if c]
        kept = sum(max(first, 2 * smoke_seconds[m.name]) for m in later)
        if kept:
            emit(f"# {kept:.0f} s of the budget kept for {' and '.join(m.name for m in later)}")
        results, not_run = run_phase("full size", model, chosen, model.architecture(args.tiny),
                                     paths, args, full, deadline - kept, emit,
                                     first)  # fmt: skip
        if not_run:
            leaving = f", less {kept:.0f} s kept for {' and '.join(m.name for m in later)}"
            emit(f"skipped, the time left{leaving if later else ''} below the setup before's: "
                 f"{model.name} {names(not_run, dtype)}")  # fmt: skip
        if model.numbers is None:  # a choice among every setup
            emit(default_line(results, chosen, dtype))
    emit(f"# done in {time.monotonic() - started:.0f} s of a {args.budget_seconds:.0f} s budget")
    report.close()


if __name__ == "__main__":
    main()
