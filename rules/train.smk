# The curriculum: stage1 from the base model, stage2 from the stage-1 adapter (a fresh
# optimizer and schedule), and the ablation stage2_only from the base model.
# Checkpoints live in results/checkpoints/<run>/, a param rather than an output:
# Snakemake deletes a failed job's outputs, and a crash must cost minutes, not days.


rule build_tiny_model:
    input:
        JSONL_OUTPUTS["stage1_train"],
        JSONL_OUTPUTS["stage2_train"],
    output:
        directory(TINY_MODEL),
    log:
        "logs/build_tiny_model/build_tiny_model.log",
    conda:
        "../envs/train.yaml"
    params:
        family=config["tiny_model"]["family"],
        image_size=config["tiny_model"]["image_size"],
        vocab_size=config["tiny_model"]["vocab_size"],
        seed=config["training"]["seed"],
    script:
        "../workflow_scripts/build_tiny_model.py"


rule train:
    input:
        unpack(training_inputs),
    output:
        adapter=directory("results/{run}/adapter"),
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    wildcard_constraints:
        run="|".join(TRAINED),
    retries: 2  # a crash resumes from the newest checkpoint by itself
    conda:
        "../envs/train.yaml"
    # per process: its data workers and its loop
    threads: TRAIN_GPUS * max(2, config["training"]["dataloader_workers"] + 1)
    resources:
        gpu=TRAIN_GPUS,  # one process per GPU; the default profile declares one GPU
        gpu_asked=TRAIN_GPUS,
    # Only what shapes the weights is a param (a change re-runs training); the script
    # reads the bookkeeping keys (save/eval cadence, workers, memory cap, GPU count)
    # from the config.
    params:
        run_dir="results/{run}",
        checkpoint_dir="results/checkpoints/{run}",
        images_dir="results/data/images",
        model=shaping_settings("model", model_settings()),
        lora=config["lora"],
        stage=lambda wildcards: config[run_stage(wildcards.run)],
        training=shaping_settings("training", config["training"]),
    script:
        "../workflow_scripts/train.py"
