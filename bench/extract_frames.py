"""Frame extraction throughput, measured side by side in one run.

1. Per frame, one core: the pipeline's `resize_jpeg` (DCT-domain `draft` + resize)
   against a plain decode-resize-encode loop, at the demo's frame size and at a
   large one where `draft` can act.
2. Whole shards through `extract_shard` (TFRecord read, proto decode, resize,
   write): one process doing two shards, against two processes doing one each.

Run: `make bench` (or `python bench/extract_frames.py --help`).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from robovqa_ft.data.demo_bucket import clip_frames, generate_demo_bucket, random_clip
from robovqa_ft.data.frames import extract_shard, resize_jpeg
from robovqa_ft.data.records import import_tensorflow


def plain_resize(data: bytes, size: tuple[int, int], quality: int) -> bytes:
    """The baseline: full decode, resize, encode."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def frames_per_second(fn, frames: list[bytes], size, quality, repeats: int) -> float:
    """Median over `repeats` passes of frames per second on this core."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for frame in frames:
            fn(frame, size, quality)
        rates.append(len(frames) / (time.perf_counter() - start))
    return statistics.median(rates)


def _extract(job: tuple[Path, Path, int]) -> int:
    shard, work, side = job
    summary = extract_shard(
        shard, shard.name, work / "images", work / "staging", work / f"{shard.name}.jsonl",
        (side, side), 16, 90,
    )  # fmt: skip
    return summary.clips * 16


def shard_rates(shards: list[Path], work: Path, side: int, repeats: int) -> tuple[float, float]:
    """Median frames/s of two shards done by one process, and by two processes at once."""
    serial, parallel = [], []
    with ProcessPoolExecutor(2, initializer=import_tensorflow) as pool:
        list(pool.map(_extract, [(s, work / "warm", side) for s in shards]))  # import TF in both
        for r in range(repeats):
            start = time.perf_counter()
            frames = sum(_extract((s, work / f"serial{r}", side)) for s in shards)
            serial.append(frames / (time.perf_counter() - start))
            start = time.perf_counter()
            frames = sum(pool.map(_extract, [(s, work / f"parallel{r}", side) for s in shards]))
            parallel.append(frames / (time.perf_counter() - start))
    return statistics.median(serial), statistics.median(parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=160, help="frames per per-frame pass")
    parser.add_argument("--clips", type=int, default=40, help="clips per shard (2 shards)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=288, help="output frame side (frame_size)")
    args = parser.parse_args()
    import_tensorflow()  # before timing, as in a job that has started
    size, rng = (args.side, args.side), random.Random(0)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Pillow {Image.__version__}"
    print(f"# {time.strftime('%Y-%m-%d')}, {machine}, output {args.side}x{args.side}")
    print("source size | pipeline frames/s/core | plain frames/s/core | ratio")
    for source in ((320, 240), (1280, 960)):
        frames = []
        while len(frames) < args.frames:
            frames += clip_frames(random_clip(rng), rng, source, 16)
        ours = frames_per_second(resize_jpeg, frames, size, 90, args.repeats)
        plain = frames_per_second(plain_resize, frames, size, 90, args.repeats)
        print(f"{source[0]}x{source[1]} | {ours:.0f} | {plain:.0f} | {ours / plain:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_demo_bucket(
            work / "bucket", clips=2 * args.clips, shards_per_split=2, frame_size=(320, 240),
            val_fraction=0,
        )  # fmt: skip
        shards = sorted((work / "bucket" / "train").iterdir())
        serial, parallel = shard_rates(shards, work, args.side, args.repeats)
        shutil.rmtree(work / "bucket")
    print("whole shards (320x240 source) | 1 process frames/s | 2 processes frames/s | scaling")
    print(f"extract_shard | {serial:.0f} | {parallel:.0f} | {parallel / serial:.2f}x")


if __name__ == "__main__":
    main()
