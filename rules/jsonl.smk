# Both stages from one split by video: no val clip is ever trained on.
rule build_jsonl:
    input:
        shard_indexes,
    output:
        **JSONL_OUTPUTS,
        metadata="results/data/metadata.json",
    log:
        "logs/build_jsonl/build_jsonl.log",
    benchmark:
        "benchmarks/build_jsonl/build_jsonl.tsv"
    conda:
        "../envs/data.yaml"
    params:
        split=config["split"],
        val_ratio=config["val_ratio"],
        split_seed=config["split_seed"],
        subset_ratio=config["subset_ratio"],
        frames_per_clip=config["frames_per_clip"],
        frame_size=FRAME_SIZE,
        jpeg_quality=config["jpeg_quality"],
        source=config["source"],
        frame_rate=config["frame_rate"],
    script:
        "../workflow_scripts/build_jsonl.py"
