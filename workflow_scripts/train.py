"""Snakemake adapter: train one run (stage1, stage2 or stage2_only) on the job's GPUs,
resuming if it can."""

from robovqa_ft.core.logs import log_to
from robovqa_ft.training.launch import train_job

config, params = snakemake.config, snakemake.params
with log_to(snakemake.log[0]):
    train_job(
        processes=snakemake.resources.gpu,
        asked=snakemake.resources.gpu_asked,
        threads=snakemake.threads,
        run={
            "train_jsonl": snakemake.input.train,
            "val_jsonl": snakemake.input.val,
            "images_dir": params.images_dir,
            "adapter_dir": snakemake.output.adapter,
            "run_dir": params.run_dir,
            "checkpoint_dir": params.checkpoint_dir,
            "model": {**config["model"], **params.model},  # params.model has "tiny" resolved
            "lora": params.lora,
            "stage": params.stage,
            "training": config["training"],
            "init_adapter": snakemake.input.get("init_adapter"),
            "data_metadata": snakemake.input.metadata,
            "val_seed": config["evaluation"]["seed"],
        },
    )
