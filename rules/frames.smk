# One job per shard, so that a cluster executor can fan the extraction out.
# Frames go to results/data/images/<video_id>/ (shared by both stages); the
# declared output is the shard's per-record index, written last.
rule extract_frames:
    input:
        # Only its own shard: a new shard in the manifest must not redo the others.
        shard=shard_file,
    output:
        index="results/data/clips/{split}/{shard}.jsonl",
    log:
        "logs/extract_frames/{split}/{shard}.log",
    benchmark:
        "benchmarks/extract_frames/{split}/{shard}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        images_dir="results/data/images",
        staging_dir="results/data/.staging",
        frame_size=FRAME_SIZE,
        frames_per_clip=config["frames_per_clip"],
        jpeg_quality=config["jpeg_quality"],
    script:
        "../workflow_scripts/extract_frames.py"
