# The shard list is known only after listing the source, hence a checkpoint.
# Shards are stored under results/bucket/, which is not an output: Snakemake
# would delete it before a re-run, and a complete shard must never be fetched twice.
checkpoint download:
    input:
        source_folders(config["source"], "results/bucket"),
    output:
        manifest="results/data/shards.tsv",
    log:
        "logs/download/download.log",
    benchmark:
        "benchmarks/download/download.tsv"
    conda:
        "../envs/data.yaml"
    params:
        source=config["source"],
        download_dir="results/bucket",
        workers=config["download_workers"],
        demo=demo_settings(),
    script:
        "../workflow_scripts/download.py"
