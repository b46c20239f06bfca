"""Snakemake adapter: train one run (stage1, stage2 or stage2_only), resuming if it can."""

from robovqa_ft.logs import log_to
from robovqa_ft.train import train_run

with log_to(snakemake.log[0]):
    train_run(
        train_jsonl=snakemake.input.train,
        val_jsonl=snakemake.input.val,
        images_dir="results/data/images",
        adapter_dir=snakemake.output.adapter,
        run_dir=snakemake.params.run_dir,
        checkpoint_dir=snakemake.params.checkpoint_dir,
        model=snakemake.params.model,
        lora=snakemake.params.lora,
        stage=snakemake.params.stage,
        training=snakemake.params.training,
        init_adapter=snakemake.input.get("init_adapter"),
    )
