"""The merged model: the base with one run's LoRA adapter merged in, in Hugging Face format,
with its processor and a model card (README.md) that states the recipe and the run's
eval.json figures with their conditions.

A CPU job (`snakemake results/<run>/merged`). A QLoRA run's adapter was trained on the 4-bit
base; it is merged into the base reloaded unquantized, in the compute dtype, as peft
documents for 4-bit bases: a merge into 4-bit weights would round the sum back to NF4.

Free of torch at import: the workflow asks `merge_memory_mb` while it plans, and must not
load a deep-learning stack for that; the job's functions import their own.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

from huggingface_hub import (
    get_local_safetensors_metadata,
    try_to_load_from_cache,
)
from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

from robovqa_ft.core.files import atomic_directory
from robovqa_ft.core.space import named_if_full, require_free_space
from robovqa_ft.tools.model_card import base_license, model_card

log = logging.getLogger(__name__)

BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2}
# The merge job's own peak beside the weights: interpreter, torch, transformers, peft
# (0.85 GB measured for the tiny model's merge, 2026-12-02), with room.
RUNTIME_MB = 1500


def merge_memory_mb(adapter_dir: Path | str, name: str, revision: str | None, dtype: str) -> int:
    """The merge job's memory in MB: twice the merged weights (parameters × bytes of
    `dtype`), plus the runtime. Measured: the loaded weights once beside the runtime (a
    0.52 B-parameter bfloat16 InternVL peaked at 1.91 GB, 2026-12-02); twice leaves room
    for what loading can hold beside them (a weight converted from another dtype or
    layout, the mapped files). The parameters are counted from the base's safetensors
    headers, in its folder or the local Hugging Face cache, which the training filled.
    """
    if not Path(adapter_dir).exists():
        # Snakemake shows <TBD> for a resource whose input is missing, and asks again
        # once the job's inputs exist: by then the training has loaded the base.
        raise FileNotFoundError(errno.ENOENT, "not trained yet", str(adapter_dir))
    revision = revision or "main"
    folder = Path(name).expanduser()
    if not folder.is_dir():
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise _weights_missing(name, revision, "not in the local Hugging Face cache")
        folder = Path(cached).parent  # .../snapshots/<commit>/
    try:
        counts = get_local_safetensors_metadata(folder).parameter_count
    except (OSError, NotASafetensorsRepoError, SafetensorsParsingError) as error:
        raise _weights_missing(name, revision, str(error)) from error
    weights = sum(counts.values()) * BYTES_PER_WEIGHT[dtype]
    return math.ceil(2 * weights / 1e6) + RUNTIME_MB


def _weights_missing(name: str, revision: str, why: str) -> ValueError:
    return ValueError(
        f"the weights of model {name} (revision {revision}) are not on this machine "
        f"({why}), so the merge's memory cannot be counted: download them (hf download "
        f"{name} --revision {revision}) or give it with --set-resources merge:mem_mb=<MB>"
    )


def _read_json(path: Path | str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} cannot be read: {error}") from error


def merge_run(
    adapter_dir: Path | str,
    eval_json: Path | str,
    metadata_json: Path | str,
    out_dir: Path | str,
    model: dict,
    stages: dict[str, dict],
    training: dict,
    run: str,
) -> Path:
    """Write `out_dir`: the base of `model` (the config's model section) with `run`'s
    adapter merged in, in `model["dtype"]`, its processor, and README.md, the model card.
    `stages` holds the stage sections the run was trained with; the folder appears whole
    or not at all."""
    # the deep-learning stack, here and not at import (see the module's docstring)
    from peft import PeftModel

    from robovqa_ft.core.provenance import provenance
    from robovqa_ft.training.model import (
        check_adapter,
        load_model,
        load_processor,
        resolved_revision,
    )

    check_adapter(adapter_dir, model["name"])  # before anything loads
    evaluation = _read_json(eval_json, "eval.json")
    if evaluation.get("run") != run:
        raise ValueError(
            f"{eval_json} is the evaluation of run {evaluation.get('run')!r}, not of {run!r}: "
            "the card would state another model's figures"
        )
    metadata = _read_json(metadata_json, "the data's metadata")
    adapter = _read_json(Path(adapter_dir) / "adapter_config.json", "the adapter's config")
    revision = resolved_revision(model["name"], model.get("revision"))
    processor = load_processor(model["name"], revision=revision)
    # Unquantized whatever the run trained on; no forward pass runs here, and sdpa loads
    # on any machine (a flash kernel would need its GPU).
    base = load_model(model["name"], quantization="none", dtype=model["dtype"],
                      attn_implementation="sdpa", gradient_checkpointing=False,
                      revision=revision)  # fmt: skip
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    log.info("merged %s into %s (%s)", adapter_dir, model["name"], model["dtype"])
    out_dir = Path(out_dir)
    weights = sum(p.numel() * p.element_size() for p in merged.parameters())
    require_free_space(out_dir, weights, f"the merged model of run {run}")
    card = model_card(run, model, revision, adapter, stages, training, evaluation, metadata,
                      base_license(model["name"], revision), provenance(1, revision))  # fmt: skip
    with named_if_full(out_dir, "the merged model"), atomic_directory(out_dir) as folder:
        merged.save_pretrained(folder)
        processor.save_pretrained(folder)
        card.save(folder / "README.md")
    log.info("wrote %s (%.1f MB of weights)", out_dir, weights / 1e6)
    return out_dir
