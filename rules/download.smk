# The shard list is known only after listing the source, hence a checkpoint. Its
# inputs are a local source's split folders (a shard added or removed changes their
# time stamp, and the listing is redone); a gs:// listing is redone only when asked
# (`--forcerun download`): a dry run stays offline. download_workers is bookkeeping,
# read by the script.
# Shards are stored under results/bucket/, which is not an output: Snakemake
# would delete it before a re-run, and a complete shard must never be fetched twice.
checkpoint download:
    input:
        source_folders(config["source"]),
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
        demo=demo_settings(),
        max_shards=config["max_shards"],
    script:
        "../workflow_scripts/download.py"
