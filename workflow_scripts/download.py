"""Snakemake adapter: resolve the source to shards and write the manifest."""

from robovqa_ft.core.logs import log_to
from robovqa_ft.data.bucket import prepare_source

with log_to(snakemake.log[0]):
    prepare_source(
        source=snakemake.params.source,
        manifest=snakemake.output.manifest,
        download_dir=snakemake.params.download_dir,
        workers=snakemake.config["download_workers"],  # bookkeeping: not a param
        demo=snakemake.params.demo,
        max_shards=snakemake.params.max_shards,
    )
