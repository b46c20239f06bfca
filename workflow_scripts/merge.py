"""Snakemake adapter: merge one run's adapter into the base model, on the CPU, and write
its model card."""

from robovqa_ft.core.devices import allocated_gpus
from robovqa_ft.core.logs import log_to

# A CPU job: it takes no GPU (a training may hold them all), chosen before the library
# is imported, since importing peft starts CUDA.
with log_to(snakemake.log[0]), allocated_gpus(0):
    from robovqa_ft.tools.merge import merge_run

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
