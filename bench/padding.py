"""Share of computed tokens that are real (not padding): pad-to-longest vs length-grouped
vs packed micro-batches, on stage-1 and stage-2 samples shaped like the real data.

Lengths come from the project's own `SampleBuilder.token_lengths` at InternVL3's real
frame cost (448 px tile = 256 image tokens, plus <img> and </img>), on synthetic clips
whose QA count per clip follows the real statistics (bench/synthetic.py). Batches
come from the training code's own orders: a seeded shuffle, or `StepSampler` with lengths.

Run: `make bench` (or `python bench/padding.py --help`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from synthetic import STAGES, processor_for, stage_dataset, write_clips

from robovqa_ft.training.steps import StepSampler

SAMPLES_PER_STEP = 32


def computed_tokens(lengths: list[int], order: list[int], micro_batch: int, padding: str) -> int:
    """Tokens the model computes over `order` cut into micro-batches."""
    total = 0
    for start in range(0, len(order), micro_batch):
        batch = [lengths[i] for i in order[start : start + micro_batch]]
        total += sum(batch) if padding == "packed" else max(batch) * len(batch)
    return total


def real_token_shares(lengths: list[int], micro_batch: int, seed: int) -> dict[str, float]:
    step = micro_batch * max(1, SAMPLES_PER_STEP // micro_batch)
    shuffled = list(StepSampler(len(lengths), step, seed))  # the training order
    orders = {
        "longest": shuffled,
        "grouped": list(StepSampler(len(lengths), step, seed, lengths)),
        "packed": shuffled,
    }
    return {
        padding: sum(lengths[i] for i in order)
        / computed_tokens(lengths, order, micro_batch, padding)
        for padding, order in orders.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=4000)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few clips, for the tests")
    args = parser.parse_args()
    if args.tiny:
        args.clips, args.micro_batches = 40, [2, 4]
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.clips} synthetic clips")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(tmp, args.clips, seed=args.seed, shared_frames=True)
        processor = processor_for(paths)
        print("stage | samples | tokens per sample: mean, min, max")
        lengths = {}
        for stage in STAGES:
            lengths[stage] = stage_dataset(processor, paths, stage).token_lengths()
            values = lengths[stage]
            print(f"{stage} | {len(values)} | {statistics.mean(values):.0f}, "
                  f"{min(values)}, {max(values)}")  # fmt: skip
    print("stage | micro-batch | padding | real-token share")
    for stage, values in lengths.items():
        for micro_batch in args.micro_batches:
            for padding, share in real_token_shares(values, micro_batch, args.seed).items():
                print(f"{stage} | {micro_batch} | {padding} | {share:.1%}")


if __name__ == "__main__":
    main()
