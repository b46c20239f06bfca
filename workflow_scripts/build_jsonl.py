"""Snakemake adapter: split by video and write both stages' JSONL and the metadata."""

from robovqa_ft.core.logs import log_to
from robovqa_ft.data.jsonl import build_jsonl, jsonl_paths

with log_to(snakemake.log[0]):
    build_jsonl(
        index_paths=snakemake.input,
        outputs={key: snakemake.output[key] for key in jsonl_paths()},
        metadata_path=snakemake.output.metadata,
        split=snakemake.params.split,
        val_ratio=snakemake.params.val_ratio,
        split_seed=snakemake.params.split_seed,
        subset_ratio=snakemake.params.subset_ratio,
        frames_per_clip=snakemake.params.frames_per_clip,
        frame_size=snakemake.params.frame_size,
        jpeg_quality=snakemake.params.jpeg_quality,
        source=snakemake.params.source,
        frame_rate=snakemake.params.frame_rate,
    )
