# Every trained run, and the untrained base model as a reference row.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        eval="results/{run}/eval.json",
        predictions="results/{run}/predictions.jsonl",
        losses="results/{run}/val_losses.jsonl",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    conda:
        "../envs/train.yaml"
    threads: max(2, config["evaluation"]["dataloader_workers"] + 1)
    resources:
        gpu=1,
    # Only what shapes the numbers is a param; the script reads the bookkeeping keys
    # (batch of prompts, workers, attention kernel, memory cap) from the config.
    params:
        images_dir="results/data/images",
        model=shaping_settings("model", model_settings()),
        # what an answer format and a val set take of each stage: not its hyperparameters
        stages={
            stage: {key: config[stage][key] for key in ("max_frames", "max_seq_len")}
            for stage in ("stage1", "stage2")
        },
        evaluation=shaping_settings("evaluation", config["evaluation"]),
    script:
        "../workflow_scripts/evaluate.py"


# `snakemake ablation_report`: the curriculum against stage-2-only, base model beside.
rule ablation_report:
    input:
        evals=expand("results/{run}/eval.json", run=RUNS),
        predictions=expand("results/{run}/predictions.jsonl", run=RUNS),
        losses=expand("results/{run}/val_losses.jsonl", run=RUNS),
        metadata="results/data/metadata.json",
        # other training seeds' evaluations, each in a --directory of its own
        pooled=expand(
            "{directory}/results/{run}/eval.json",
            directory=config["report"]["pool"],
            run=RUNS,
        ),
    output:
        report="results/ablation/report.md",
        table="results/ablation/table.csv",
        curves="results/ablation/loss_curves.png",
        scores="results/ablation/scores.png",
    log:
        "logs/ablation_report/ablation_report.log",
    conda:
        "../envs/train.yaml"
    params:
        settings=report_settings(),
        runs=RUNS,
        timings={run: f"benchmarks/train/{run}.tsv" for run in TRAINED},
        pool=config["report"]["pool"],
    script:
        "../workflow_scripts/ablation_report.py"
