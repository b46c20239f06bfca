"""The workflow's config, checked before any job: values read as the types the schema gives,
defaults filled, the schema validated and the checks that span keys made. Each mistake is one
line (`ConfigError`). Also the one table of bookkeeping keys (`BOOKKEEPING`, `READS`) and
how `grad_accum` divides over processes (`per_rank_accumulation`), which the config check
and the launcher share. The Snakefile imports this module: no torch, transformers or
TensorFlow (nor jsonschema, until a config is checked).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

if TYPE_CHECKING:
    import jsonschema

SCHEMA = "config/schema.yaml"  # in the workflow's folder

# Model type (config.json) -> whether its samples can share a row under `packed` padding.
# robovqa_ft.training.families.FAMILIES is the truth, but it imports torch; a test compares the two.
FAMILY_PACKS = {"internvl": True, "qwen2_5_vl": False, "qwen3_vl": False}
# tiny_model.family: the families the workflow can build a tiny model of (model.name "tiny")
TINY_FAMILIES = ("internvl", "qwen3_vl")
# model.frames_as: the frames as the family's video input, or each its own image (Qwen-VL)
FRAMES_AS = ("video", "images")
TINY_TILE_PROBLEM = (
    "tiny_model.image_size is InternVL's tile; a tiny Qwen3-VL takes the frames at their "
    "stored size (a token per 32 × 32 px of a frame pair): set it to null, and frame_size instead"
)
FOLDER_PREFIXES = ("/", "./", "../", "~")  # a model.name starting so is a folder, not a hub id
# stage1.layout: a clip's questions as one tree (one pass over its frames), or each
# question its own sample (the seed recipe's). Stage 2 has one sample a clip already.
LAYOUTS = ("tree", "separate")
# The attention kernels that take a tree's 4-D mask (flash-attention cannot express one).
TREE_ATTENTION = ("sdpa", "eager")
# training.report_to beyond tensorboard (which needs nothing more): the Trainer's own
# integrations, by the module each needs. One not installed would fail only once the
# training job has loaded its model.
INTEGRATION_MODULES = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}

# Snakemake reads nested --config values, and PyYAML reads 1e-4, as strings.
_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_BOOLEANS = {"true": True, "false": False}
_NULLS = ("null", "~")


class ConfigError(ValueError):
    """A config mistake, as the one line that says which key, its value and what is allowed."""


def check_config(config: dict, workflow_dir: str | Path) -> None:
    """Coerce, fill with defaults and check `config` in place (a model folder given with ~
    is expanded); raise ConfigError on the first mistake."""
    # here, not at import: the jobs read the bookkeeping table below without jsonschema
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = yaml.safe_load((Path(workflow_dir) / SCHEMA).read_text())
    filled(config, schema, schema)
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(f"config error: {schema_error_line(error)} ({SCHEMA})")
    line = next(cross_key_errors(config), None)
    if line is not None:
        raise ConfigError(f"config error: {line}")
    model = config["model"]
    if model["name"].startswith("~"):  # transformers would read it as a hub id
        model["name"] = str(Path(model["name"]).expanduser())


def filled(value: Any, schema: dict, root: dict) -> Any:
    """`value` coerced to `schema`'s types, with the defaults of missing keys filled in
    (objects and lists are changed in place)."""
    schema = resolved(schema, root)
    value = coerced(value, schema)
    if isinstance(value, dict):
        for key, subschema in schema.get("properties", {}).items():
            if key not in value and "default" in resolved(subschema, root):
                value[key] = copy.deepcopy(resolved(subschema, root)["default"])
            if key in value:
                value[key] = filled(value[key], subschema, root)
    elif isinstance(value, list) and "items" in schema:
        value[:] = [filled(item, schema["items"], root) for item in value]
    return value


def resolved(schema: dict, root: dict) -> dict:
    """A subschema with the local definition it $refs merged in (its own keys win)."""
    if "$ref" not in schema:
        return schema
    target = root
    for part in schema["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**resolved(target, root), **{k: v for k, v in schema.items() if k != "$ref"}}


def coerced(value: Any, schema: dict) -> Any:
    """`value` as the type the schema asks for, where a string or a whole float says it."""
    types = schema.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    if isinstance(value, str) and "string" not in types:
        text = value.strip()
        if "boolean" in types and text.lower() in _BOOLEANS:
            return _BOOLEANS[text.lower()]
        if "null" in types and text.lower() in _NULLS:
            return None
        if types & {"integer", "number"} and _INTEGER.fullmatch(text):
            return int(text)
        if "number" in types and _NUMBER.fullmatch(text):
            return float(text)
        if "integer" in types and _NUMBER.fullmatch(text):
            value = float(text)  # 1e3: an integer if it is whole, below
    if isinstance(value, float) and value.is_integer() and "integer" in types:
        return int(value)
    return value


def schema_error_line(error: jsonschema.ValidationError) -> str:
    """What a schema error says, without the schema and the config it was found in."""
    path, value, kind = list(error.absolute_path), error.instance, error.validator
    allowed = error.validator_value
    if kind == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        key = next(k for k in value if k not in known)
        where = f"in {key_path(path)}" if path else "at the top level"
        return (
            f"{key_path([*path, key])} = {shown(value[key])} is not a setting; "
            f"those {where} are {', '.join(known)}"
        )
    if kind == "required":
        key = next(k for k in allowed if k not in value)
        return f"{key_path([*path, key])} is missing and has no default"
    what = {
        "enum": lambda: "is not one of " + ", ".join(str(x) for x in allowed),
        "type": lambda: "is not " + " or ".join(_TYPE_NAMES.get(t, t) for t in _listed(allowed)),
        "minimum": lambda: f"must be at least {allowed}",
        "exclusiveMinimum": lambda: f"must be more than {allowed}",
        "maximum": lambda: f"must be at most {allowed}",
        "exclusiveMaximum": lambda: f"must be less than {allowed}",
        "minLength": lambda: (
            "must not be empty" if allowed == 1 else f"is under {allowed} characters"
        ),
        "minItems": lambda: f"must have at least {allowed} items",
        "maxItems": lambda: f"must have at most {allowed} items",
    }.get(kind, lambda: f"is not valid: {' '.join(error.message.split())}")()
    return f"{key_path(path)} = {shown(value)} {what}"


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a section (a mapping)",
    "array": "a list",
}


def _listed(value: str | list) -> list:
    return [value] if isinstance(value, str) else value


def key_path(parts: list) -> str:
    """stage1.scheduler, demo.frame_size[0]."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "the config"


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cross_key_errors(config: dict) -> Iterator[str]:
    """The mistakes the schema cannot see, each as one line: they would otherwise surface
    only when a training job starts, or not at all."""
    gpus = config["training"]["gpus"]
    for stage in ("stage1", "stage2"):
        frames, accum = config[stage]["max_frames"], config[stage]["grad_accum"]
        if frames > config["frames_per_clip"]:
            yield (
                f"{stage}.max_frames = {frames} is more than frames_per_clip = "
                f"{config['frames_per_clip']}: a clip has no more frames to give"
            )
        try:
            per_rank_accumulation(accum, gpus)
        except ValueError:
            yield (
                f"{stage}.grad_accum = {accum} does not divide over training.gpus = {gpus}: "
                "the global batch (batch_size × grad_accum) stays the same on any GPU count"
            )
    if config["stage2"].get("layout", "separate") != "separate":
        yield ("stage2.layout = 'tree': stage 2 has one sample a clip already; only stage1 "
               "takes the tree layout")  # fmt: skip
    problem = tree_attention_problem(config["stage1"].get("layout", "separate"),
                                     config["model"]["attn_implementation"])  # fmt: skip
    if problem:
        yield problem
    for name in config["training"]["report_to"]:
        module = INTEGRATION_MODULES.get(name)
        if module and importlib.util.find_spec(module) is None:
            yield (
                f"training.report_to names {name}, which is not installed here: pip install "
                f"{module}, or leave it out (tensorboard needs nothing more)"
            )
    model = config["model"]
    family, problem = model_type(model["name"], model.get("revision"), config.get("tiny_model"))
    if problem:
        yield f"model.name = {shown(model['name'])} {problem}"
    elif family and family not in FAMILY_PACKS:
        yield (
            f"model.name = {shown(model['name'])} is a {family} model, not one of "
            f"{', '.join(FAMILY_PACKS)}"
        )
    elif family and frames_as_problem(family, model.get("frames_as", "video")):
        yield frames_as_problem(family, model.get("frames_as", "video"))
    tiny = config.get("tiny_model", {})
    if model["name"] == "tiny" and tiny.get("family") != "internvl" and tiny.get("image_size"):
        yield TINY_TILE_PROBLEM
    elif family and config["training"]["padding"] == "packed" and not FAMILY_PACKS[family]:
        packing = [name for name, packs in FAMILY_PACKS.items() if packs]
        yield (
            f"training.padding = 'packed' needs 1-D rotary positions ({', '.join(packing)}); "
            f"model.name = {shown(model['name'])} is {family}: use 'grouped' instead"
        )


def tree_attention_problem(layout: str, attention: str) -> str | None:
    """Why `attention` cannot run stage 1's `layout`, or None."""
    if layout == "tree" and attention not in TREE_ATTENTION:
        return (f"stage1.layout = 'tree' needs an attention kernel that takes a 4-D mask "
                f"({', '.join(TREE_ATTENTION)}); model.attn_implementation is {attention}: "
                "use sdpa, or stage1.layout = 'separate'")  # fmt: skip
    return None


def frames_as_problem(family: str, frames_as: str) -> str | None:
    """Why a model of `family` (its model type) cannot take its frames `frames_as`, or None."""
    if frames_as not in FRAMES_AS:
        return f"model.frames_as = {frames_as!r} is not one of {', '.join(FRAMES_AS)}"
    if frames_as == "images" and family == "internvl":
        return ("model.frames_as = 'images' is for Qwen2.5-VL and Qwen3-VL; InternVL takes "
                "its frames as its own video prompt, one tile each: use 'video'")  # fmt: skip
    return None


def model_type(
    name: str, revision: str | None = None, tiny_model: dict | None = None
) -> tuple[str | None, str | None]:
    """(model_type, None) from the model's config.json (for "tiny", `tiny_model`'s family),
    (None, None) when a hub id is not in the local HF cache (the job downloads it and finds
    out), or (None, what is wrong)."""
    if name == "tiny":
        return (tiny_model or {}).get("family", TINY_FAMILIES[0]), None
    folder = Path(name).expanduser()
    if name.startswith(FOLDER_PREFIXES) and not folder.is_dir():
        return None, f"names a folder, {folder.absolute()}, that does not exist"
    if folder.is_dir():  # transformers reads a hub id as a folder too when there is one
        config_file = folder / "config.json"
        if not config_file.is_file():
            return None, "is a folder without config.json"
    else:
        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision or "main")
        except HFValidationError:
            return None, "is neither a folder nor a Hugging Face model id"
        if not isinstance(cached, str):
            return None, None
        config_file = Path(cached)
    try:
        return json.loads(config_file.read_text()).get("model_type"), None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"has a config.json that is not JSON ({config_file})"


def per_rank_accumulation(grad_accum: int, processes: int) -> int:
    """Micro-batches each process accumulates so that the global batch stays
    batch_size × grad_accum whatever the process count."""
    if grad_accum % processes:
        raise ValueError(
            f"grad_accum {grad_accum} does not divide over {processes} processes: the global "
            f"batch (batch_size × grad_accum) must stay the same, so use a process count that "
            f"divides {grad_accum}, or change grad_accum"
        )
    return grad_accum // processes


# The one table of bookkeeping keys: settings that change how a job is watched, saved,
# sped up or scheduled, never what it writes. No job has one in its params and no
# training fingerprint holds one, so changing it after a complete run plans nothing (the
# scripts read them from the config). The GPU count is one: the global batch stays
# batch_size × grad_accum on any count. By config section; TOP_LEVEL holds the keys at
# the top of the config. Every other key shapes the outputs of the jobs that read it
# (`READS`) and reaches their params, and the training fingerprint where it reads it.
TOP_LEVEL = ""


BOOKKEEPING = {
    TOP_LEVEL: {"download_workers"},
    "training": {"logging_steps", "eval_steps", "eval_clips", "save_steps",
                 "save_every_minutes", "save_total_limit", "dataloader_workers", "gpus",
                 "hang_timeout_minutes", "stop_grace_seconds", "report_to"},
    "model": {"max_memory_gb", "attn_implementation", "gradient_checkpointing"},
    "evaluation": {"generation_batch_size", "dataloader_workers"},
}  # fmt: skip


# What each job reads of the config: whole sections, or "key" for a top-level key. The
# frames and the split reach training through the data's metadata.json.
READS = {
    "download": ["source", "download_workers", "demo", "max_shards"],
    "extract_frames": ["frame_size", "frames_per_clip", "jpeg_quality"],
    "build_jsonl": ["split", "val_ratio", "split_seed", "subset_ratio", "frames_per_clip",
                    "frame_size", "jpeg_quality", "source", "frame_rate"],
    "build_tiny_model": ["tiny_model", "training"],
    "train": ["model", "frame_rate", "lora", "training", "stage1", "stage2", "evaluation"],
    "evaluate": ["model", "frame_rate", "stage1", "stage2", "evaluation"],
    "merge": ["model", "frame_rate", "training", "stage1", "stage2"],
    "ablation_report": ["source", "frame_rate", "tiny_model", "model", "lora", "training",
                        "stage1", "stage2", "evaluation", "report"],
}  # fmt: skip


def shaping_settings(section: str, values: dict) -> dict:
    """The part of a config section that shapes the trained weights."""
    shaping = {k: v for k, v in values.items() if k not in BOOKKEEPING.get(section, ())}
    # Padding and packing see the same samples in the same order, to float rounding;
    # only length grouping changes the order.
    if section == "training" and shaping.get("padding") in ("longest", "packed"):
        del shaping["padding"]
    return shaping
