"""Snakemake adapter: merge one run's adapter into the base model, on the CPU, and write
its model card."""

import os

# A CPU job asks for no GPU, so it takes none (a training may hold them); CUDA reads this
# when it starts, which nothing has made it do yet.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from robovqa_ft.logs import log_to  # noqa: E402
from robovqa_ft.merge import merge_run  # noqa: E402

with log_to(snakemake.log[0]):
    merge_run(
        adapter_dir=snakemake.input.adapter,
        eval_json=snakemake.input.eval,
        metadata_json=snakemake.input.metadata,
        out_dir=snakemake.output[0],
        model={**snakemake.config["model"], **snakemake.params.model},  # "tiny" resolved
        stages=snakemake.params.stages,
        training=snakemake.params.training,
        run=snakemake.wildcards.run,
    )
