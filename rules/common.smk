from robovqa_ft.bucket import read_manifest, source_folders
from robovqa_ft.jsonl import jsonl_paths

JSONL_OUTPUTS = jsonl_paths("results/data")
FRAME_SIZE = (config["frame_size"], config["frame_size"])


wildcard_constraints:
    split="train|val",
    shard="[^/]+",


def shards(wildcards):
    """The manifest's shards; known only once the download checkpoint has run."""
    return read_manifest(checkpoints.download.get().output.manifest)


def shard_file(wildcards):
    for shard in shards(wildcards):
        if (shard.split, shard.shard) == (wildcards.split, wildcards.shard):
            return shard.path
    raise ValueError(
        f"shard {wildcards.split}/{wildcards.shard} is not in the manifest"
    )


def shard_indexes(wildcards):
    return [f"results/data/clips/{s.split}/{s.shard}.jsonl" for s in shards(wildcards)]


def demo_settings():
    """Only a demo source depends on the demo settings."""
    return config["demo"] if config["source"] == "demo" else {}
