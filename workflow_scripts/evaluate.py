"""Snakemake adapter: evaluate one run (or the base model) on both val sets, on a GPU
of its own."""

from robovqa_ft.core.devices import allocated_gpus
from robovqa_ft.core.logs import log_to

# The GPU is chosen before the library is imported: importing peft starts CUDA
# (bitsandbytes asks it for its devices), which then sees every GPU, whatever was locked.
with log_to(snakemake.log[0]), allocated_gpus(snakemake.resources.gpu):
    from robovqa_ft.evaluation.evaluate import evaluate_run

    evaluate_run(
        adapter_dir=snakemake.input.get("adapter"),
        val_jsonl={"stage1": snakemake.input.stage1_val, "stage2": snakemake.input.stage2_val},
        images_dir=snakemake.params.images_dir,
        outputs=dict(snakemake.output.items()),
        model={**snakemake.config["model"], **snakemake.params.model},  # "tiny" resolved
        stages=snakemake.params.stages,
        evaluation={**snakemake.config["evaluation"], **snakemake.params.evaluation},
        run=snakemake.wildcards.run,
    )
