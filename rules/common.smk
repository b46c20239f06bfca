from robovqa_ft.data.bucket import read_manifest, source_folders
from robovqa_ft.data.jsonl import jsonl_paths
from robovqa_ft.core.runs import RUNS, TRAINED, run_stage
from robovqa_ft.core.settings import shaping_settings

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


def asked_resource(rule_name, resource, default):
    """How much of `resource` is asked: `--set-resources` if it names it, else `default`."""
    overrides = workflow.resource_settings.overwrite_resources.get(rule_name)
    value = overrides.get(resource).value if overrides else None  # None if not named
    return default if value is None else value


# GPUs (= training processes) per training job. Snakemake caps `gpu` at --resources
# without a word; `gpu_asked` is never capped, so the job can tell and say so.
TRAIN_GPUS = asked_resource("train", "gpu", config["training"]["gpus"])


TINY_MODEL = "results/models/tiny"


wildcard_constraints:
    run="|".join(RUNS),


def model_settings():
    """The model section, with "tiny" resolved to the folder the demo builds, and the
    frames' rate (the frames' times, for a family that takes them as a video)."""
    name = config["model"]["name"]
    return {
        **config["model"],
        "name": TINY_MODEL if name == "tiny" else name,
        "frame_rate": config["frame_rate"],
    }


def report_settings():
    """The settings the ablation report states: those that shape its numbers."""
    sections = (
        "source",
        "frame_rate",
        "tiny_model",
        "model",
        "lora",
        "training",
        "stage1",
        "stage2",
        "evaluation",
    )
    return {
        key: (
            shaping_settings(key, config[key])
            if isinstance(config[key], dict)
            else config[key]
        )
        for key in sections
    }


def training_inputs(wildcards):
    stage = run_stage(wildcards.run)
    inputs = {
        "train": JSONL_OUTPUTS[f"{stage}_train"],
        "val": JSONL_OUTPUTS[f"{stage}_val"],
        "metadata": "results/data/metadata.json",  # the frames exist once this does
    }
    if config["model"]["name"] == "tiny":
        inputs["model"] = TINY_MODEL
    if wildcards.run == "stage2":
        inputs["init_adapter"] = "results/stage1/adapter"
    return inputs


def evaluation_inputs(wildcards):
    inputs = {
        "stage1_val": JSONL_OUTPUTS["stage1_val"],
        "stage2_val": JSONL_OUTPUTS["stage2_val"],
        "metadata": "results/data/metadata.json",
    }
    if config["model"]["name"] == "tiny":
        inputs["model"] = TINY_MODEL
    if wildcards.run != "base":
        inputs["adapter"] = f"results/{wildcards.run}/adapter"
    return inputs
