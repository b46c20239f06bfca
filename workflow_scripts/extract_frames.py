"""Snakemake adapter: extract one shard's frames and write its record index."""

from robovqa_ft.core.logs import log_to
from robovqa_ft.data.frames import extract_shard

with log_to(snakemake.log[0]):
    extract_shard(
        shard_path=snakemake.input.shard,
        shard=snakemake.wildcards.shard,
        images_dir=snakemake.params.images_dir,
        staging_dir=snakemake.params.staging_dir,
        index_path=snakemake.output.index,
        frame_size=snakemake.params.frame_size,
        frames_per_clip=snakemake.params.frames_per_clip,
        jpeg_quality=snakemake.params.jpeg_quality,
    )
