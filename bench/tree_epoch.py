"""A stage-1 epoch of the demo's tiny model on the demo's data, in the tree layout against
the separate one, side by side: wall time of `train_run`, the workflow's own (loading
the model, measuring the token counts, one epoch, saving the adapter), and what the
model computed (tokens through the language model, frames through the vision tower),
counted by collating each run's epoch order with the training's collator.

The two layouts alternate (separate, tree, separate, ...) so that a slow spell of the
machine hits both; medians of `--repeats`. Needs the demo's data and tiny model
(`make demo`, or `--directory` another workflow folder that ran the demo config).

Before it, how `ClipStepSampler` deals steps of whole clips at the real data's scale
(no model: 20,000 clips of 2 + Binomial(5, 0.32) questions, 1,050 + 75 a question
tokens): the micro-batches left without a clip (each a one-token stand-in) and how
evenly the ranks are loaded (the mean over steps of the ranks' tokens over the ranks ×
the heaviest rank's), for one GPU and eight at a few step sizes.

Run: `python bench/tree_epoch.py` (part of `make bench`; about 2 minutes on 2 cores;
`--deal-only` for the dealing table alone, seconds).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml
from snakemake.utils import update_config
from synthetic import CONFIG

from robovqa_ft.training.collate import collator
from robovqa_ft.training.families import model_family
from robovqa_ft.training.model import load_processor
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder
from robovqa_ft.training.steps import ClipStepSampler, StepSampler
from robovqa_ft.training.train import train_run
from robovqa_ft.training.trees import ClipTrees

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("separate", "tree")


def demo_config() -> dict:
    """config.yaml with config/demo.yaml over it, merged as Snakemake merges them."""
    config = copy.deepcopy(CONFIG)
    update_config(config, yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    return config


def settings(config: dict, layout: str) -> dict:
    """The demo's stage-1 run, one epoch, without periodic val losses or checkpoints."""
    stage = {**config["stage1"], "epochs": 1, "layout": layout}
    training = {**config["training"], "max_steps": -1, "eval_steps": 10**6,
                "save_steps": 10**6, "save_every_minutes": 10**6, "report_to": []}  # fmt: skip
    return {"model": config["model"], "lora": config["lora"], "stage": stage,
            "training": training}  # fmt: skip


def computed(data: Path, model: Path, config: dict, layout: str) -> dict[str, int]:
    """Tokens and frames the epoch's micro-batches hold, as the training collates them."""
    processor = load_processor(model)
    stage = config["stage1"]
    builder = SampleBuilder(processor, model_family(model), data / "images",
                            stage["max_frames"], stage["max_seq_len"])  # fmt: skip
    dataset = JsonlDataset(data / "stage1" / "train.jsonl", builder)
    collate = collator(config["training"]["padding"], processor.tokenizer.pad_token_id)
    if layout == "tree":
        dataset = ClipTrees(dataset)
        order = list(ClipStepSampler(dataset.questions, dataset.token_counts(),
                                     stage["batch_size"] * stage["grad_accum"],
                                     stage["grad_accum"], config["training"]["seed"]))  # fmt: skip
        batches = [collate([dataset[clips]]) for clips in order]
    else:
        step = stage["batch_size"] * stage["grad_accum"]
        order = list(StepSampler(len(dataset), step, config["training"]["seed"]))
        batches = [collate([dataset[i] for i in order[s : s + stage["batch_size"]]])
                   for s in range(0, len(order), stage["batch_size"])]  # fmt: skip
    return {"questions": sum(b["samples"] for b in batches),
            "tokens": sum(b["computed_tokens"] for b in batches),
            "frames": sum(len(b.get("pixel_values", ())) for b in batches)}  # fmt: skip


def deal_table() -> None:
    binomial = torch.distributions.Binomial(5, torch.tensor(0.32))
    torch.manual_seed(0)
    questions = (2 + binomial.sample((20_000,))).int().tolist()
    tokens = [1050 + 75 * q for q in questions]
    print("| GPUs | batch_size × grad_accum | questions a step | micro-batches without a clip "
          "| rank load efficiency |")  # fmt: skip
    print("|---|---|---|---|---|")
    for ranks, batch_size, accum in ((1, 2, 16), (1, 4, 8), (8, 2, 16), (8, 4, 16), (8, 8, 16)):
        sampler = ClipStepSampler(questions, tokens, batch_size * accum, accum, 0, ranks)
        micro = list(sampler)
        empty, efficiency = 0, []
        for k in range(sampler.steps):
            step = micro[k * accum : (k + 1) * accum]
            empty += sum(not batch for batch in step)
            loads = [sum(tokens[c] for b in step[r::ranks] for c in b) for r in range(ranks)]
            efficiency.append(sum(loads) / (ranks * max(loads)))
        print(f"| {ranks} | {batch_size} × {accum} | {sum(questions) / sampler.steps:.1f} | "
              f"{empty / len(micro):.1%} | {statistics.mean(efficiency):.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directory", type=Path, default=ROOT / "demo",
                        help="a folder that ran the demo config (default: demo/)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deal-only", action="store_true", help="the dealing table alone")
    args = parser.parse_args()
    deal_table()
    if args.deal_only:
        return
    data, model = (
        args.directory / "results" / "data",
        args.directory / "results" / "models" / "tiny",
    )
    if not (data / "stage1" / "train.jsonl").is_file() or not model.is_dir():
        raise SystemExit(f"no demo data or tiny model under {args.directory}: run `make demo`")
    config = demo_config()
    config["model"] = {**config["model"], "name": str(model)}
    seconds: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for layout in LAYOUTS:
                out = Path(tmp) / f"{layout}-{repeat}"
                start = time.perf_counter()
                train_run(data / "stage1" / "train.jsonl", data / "stage1" / "val.jsonl",
                          data / "images", out / "adapter", out, out / "checkpoints",
                          data_metadata=data / "metadata.json",
                          **settings(config, layout))  # fmt: skip
                seconds[layout].append(time.perf_counter() - start)
    counts = {layout: computed(data, model, config, layout) for layout in LAYOUTS}
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}; {args.repeats} epochs each, "
          "alternating")  # fmt: skip
    print(
        "| layout | questions | tokens computed | frames encoded | train_run wall time (median) |"
    )
    print("|---|---|---|---|---|")
    for layout in LAYOUTS:
        c = counts[layout]
        print(f"| {layout} | {c['questions']:,} | {c['tokens']:,} | {c['frames']:,} | "
              f"{statistics.median(seconds[layout]):.1f} s |")  # fmt: skip
    s, t = counts["separate"], counts["tree"]
    print(f"tree / separate: {s['tokens'] / t['tokens']:.2f}× fewer tokens, "
          f"{s['frames'] / t['frames']:.2f}× fewer frames, "
          f"{statistics.median(seconds['separate']) / statistics.median(seconds['tree']):.2f}× "
          "faster epoch")  # fmt: skip


if __name__ == "__main__":
    main()
