"""Data path throughput: samples/s per DataLoader worker for stage 1 and stage 2, through
the training code's own dataset and collator (JPEG decode, resize to the tile, normalize,
tokenize, label, collate), and where a sample's time goes.

The target (issue 5): one worker delivers at least twice what the GPU consumes at the
target step time, i.e. >= 25 stage-1 samples/s per worker. Image work runs in the
workers only; the main process just receives batches.

Run: `make bench` (or `python bench/dataloader.py --help`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from synthetic import STAGES, processor_for, stage_dataset, write_clips
from torch.utils.data import DataLoader, RandomSampler

from robovqa_ft.training.collate import collator
from robovqa_ft.training.samples import JsonlDataset

MICRO_BATCH = 2


def loader_rate(
    dataset: JsonlDataset, collate, workers: int, batches: int, seed: int, repeats: int
) -> float:
    """Median over `repeats` runs of samples/s over `batches` micro-batches, timed from the
    first batch (worker start-up excluded, as it happens once per run)."""
    return statistics.median(
        _loader_rate(dataset, collate, workers, batches, seed + r) for r in range(repeats)
    )


def _loader_rate(dataset: JsonlDataset, collate, workers: int, batches: int, seed: int) -> float:
    sampler = RandomSampler(  # whole shuffles, repeated as often as the batches need
        dataset, num_samples=(batches + 1) * MICRO_BATCH,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_size=MICRO_BATCH, sampler=sampler, num_workers=workers,
        collate_fn=collate, prefetch_factor=4,
    )  # fmt: skip
    iterator = iter(loader)
    next(iterator)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(iterator)["input_ids"])
    return samples / (time.perf_counter() - start)


def breakdown_ms(dataset: JsonlDataset, collate, count: int) -> dict:
    """Median milliseconds per sample of each part, in this process."""
    builder = dataset.builder
    decode, encode, collate_ms = [], [], []  # decode: frames only; encode: the whole sample
    for i in range(count):
        row = dataset.row(i)
        start = time.perf_counter()
        builder.frames(row)
        decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        samples = [builder.encode(row), builder.encode(dataset.row(i + 1))]
        encode.append((time.perf_counter() - start) / 2)
        start = time.perf_counter()
        collate(samples)
        collate_ms.append((time.perf_counter() - start) / 2)
    parts = {"decode": decode, "encode": encode, "collate": collate_ms}
    return {name: 1000 * statistics.median(values) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="micro-batches timed per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=448, help="tile side (InternVL3: 448)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny", action="store_true", help="a few clips and batches, for the tests"
    )
    args = parser.parse_args()
    if args.tiny:
        args.clips, args.batches, args.workers, args.image_size, args.repeats = 6, 3, [1], 56, 1
    torch.set_num_threads(1)  # as in a DataLoader worker
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.image_size} px tiles, 288 px frames, micro-batch {MICRO_BATCH}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(tmp, args.clips, seed=args.seed)
        processor = processor_for(paths, args.image_size)
        collate = collator("longest", processor.tokenizer.pad_token_id)
        print("stage | part | ms per sample (one process)")
        datasets = {}
        for stage in STAGES:
            datasets[stage] = stage_dataset(processor, paths, stage)
            parts = breakdown_ms(datasets[stage], collate, min(8, args.clips - 1))
            for part, ms in parts.items():
                print(f"{stage} | {part} | {ms:.1f}")
        print("stage | workers | samples/s | samples/s per worker")
        for stage, dataset in datasets.items():
            for workers in args.workers:
                rate = loader_rate(dataset, collate, workers, args.batches, args.seed, args.repeats)
                print(f"{stage} | {workers} | {rate:.1f} | {rate / workers:.1f}")


if __name__ == "__main__":
    main()
