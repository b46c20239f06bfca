"""Load the vision-language model and its processor, and put LoRA on its language model only.

What differs between the model families (how frames reach the model, which modules stay
unquantized) is `families.py`'s.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from robovqa_ft.training.families import Family, model_family
from robovqa_ft.training.ranks import world

log = logging.getLogger(__name__)

# Full module paths: a bare list of names would also hit the vision tower's projections.
LORA_TARGET_MODULES = (
    r".*language_model\.layers\.\d+\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def load_processor(name_or_path: str | Path, revision: str | None = None) -> Any:
    return AutoProcessor.from_pretrained(name_or_path, revision=revision)


def resolved_revision(name_or_path: str | Path, revision: str | None) -> str | None:
    """The hub commit that `revision` (a commit, tag or branch; None: the default branch)
    of model `name_or_path` is now, so that a job loads one commit throughout and a moved
    branch is seen (the training fingerprint holds it). None for a local folder: its files
    are what they are. Asked of the hub, or, offline, read from the local cache."""
    if Path(name_or_path).expanduser().is_dir():
        return None
    name = str(name_or_path)
    try:
        return HfApi().model_info(name, revision=revision).sha
    except Exception as error:  # offline, unreachable, or no such model or revision
        cached = try_to_load_from_cache(name, "config.json", revision=revision or "main")
        if isinstance(cached, str):
            return Path(cached).parent.name  # .../snapshots/<commit>/config.json
        raise ValueError(
            f"model {name} at revision {revision or 'main'} is neither reachable on the hub "
            f"({type(error).__name__}: {error}) nor in the local Hugging Face cache: check "
            "model.name and model.revision, or download it first (hf download "
            f"{name}{f' --revision {revision}' if revision else ''})"
        ) from error


def load_model(
    name_or_path: str | Path,
    quantization: str,
    dtype: str,
    attn_implementation: str,
    gradient_checkpointing: bool,
    max_memory_gb: float | None = None,
    revision: str | None = None,
) -> Any:
    """The base model, frozen, on this process's GPU if there is one, ready for LoRA.

    `quantization`: "nf4" (QLoRA: the language model's linear layers in 4-bit NF4 with
    double quantization, computing in `dtype`; vision tower, projector and head kept in
    `dtype`) or "none". `revision`: the hub commit, tag or branch (None: the default).
    """
    family = model_family(name_or_path, revision)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "attn_implementation": attn_implementation,
        "revision": revision,
    }
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(family, getattr(torch, dtype))
    elif quantization != "none":
        raise ValueError(f"quantization {quantization!r} is not 'nf4' or 'none'")
    if torch.cuda.is_available():
        # By local rank: under torchrun each process has its own GPU of the job's.
        device = world().local_rank
        kwargs["device_map"] = {"": device}
        if max_memory_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, max_memory_gb * 2**30 / total), device
            )
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    return prepare_model(model, quantization, gradient_checkpointing)


def nf4_config(family: Family, dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's quantization: NF4 with double quantization, computing in `dtype`, for the
    language model's linear layers only."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=list(family.keep_unquantized),
    )


def prepare_model(model: Any, quantization: str, gradient_checkpointing: bool) -> Any:
    """Freeze a loaded model and set it up so that a step computes only what LoRA on the
    language model needs (also for evaluation, which must see training's precision).

    - The vision encoder (tower and projector) runs without autograd: nothing trainable
      sits before it, so its backward, and any recomputation of it, could change no
      gradient. Gradient checkpointing is the language model's alone.
    - Under nf4 the unquantized weights stay in the compute dtype, as loaded, and only
      the norms go to fp32 (QLoRA's practice; peft's `prepare_model_for_kbit_training`
      would upcast vision, projector, embeddings and head too: 2.8 GB more at 8B). A
      norm's output keeps its input's dtype, so the residual stream stays in bf16.
      (peft keeps the LoRA weights themselves in fp32.)
    """
    model.requires_grad_(False)
    inner = model.model  # InternVLModel, Qwen2_5_VLModel, Qwen3VLModel
    for name in ("get_image_features", "get_video_features"):
        if hasattr(inner, name):
            setattr(inner, name, torch.no_grad()(getattr(inner, name)))
    if quantization == "nf4":
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and any(
                p.is_floating_point() for p in module.parameters(recurse=False)
            ):
                module.float()
                module.register_forward_hook(_output_in_input_dtype, with_kwargs=True)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad.
        inner.language_model.activation_checkpointing_enable({"use_reentrant": False})
        inner.language_model.disable_input_require_grads()  # see attach_lora
    return model


def _output_in_input_dtype(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    given = next((x for x in (*args, *kwargs.values()) if torch.is_tensor(x)), None)
    if given is None:
        return output
    if torch.is_tensor(output):
        return output.to(given.dtype)
    if isinstance(output, tuple):
        return tuple(x.to(given.dtype) if torch.is_tensor(x) else x for x in output)
    return output


def check_adapter(
    adapter_dir: str | Path, model_name: str | Path, r: int | None = None, alpha: int | None = None
) -> None:
    """Refuse, from its files alone (so before any model loads), an adapter trained on
    another model than `model_name`, whose weights would not fit it; and, given the
    config's LoRA `r` and `alpha` (an adapter to train on), one of another rank or alpha,
    which peft would keep, so that the config would misstate the run."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter folder: it has no {path.name}")
    saved = json.loads(path.read_text(encoding="utf-8"))
    trained_on = saved.get("base_model_name_or_path")
    if trained_on is not None and not _same_model(trained_on, model_name):
        raise ValueError(
            f"adapter {adapter_dir} was trained on {trained_on}, but model.name is "
            f"{model_name}: an adapter fits only its own model. Use one trained on "
            f"{model_name}, or set model.name to {trained_on}; if that is this model in "
            f"another place, set base_model_name_or_path in {path} to {model_name}"
        )
    if r is not None and (saved.get("r"), saved.get("lora_alpha")) != (r, alpha):
        raise ValueError(
            f"init adapter {adapter_dir} has LoRA r={saved.get('r')}, "
            f"alpha={saved.get('lora_alpha')}, but the config's lora section has r={r}, "
            f"alpha={alpha}: set lora.r and lora.alpha to the adapter's, or use an adapter "
            "trained with the config's"
        )


def _same_model(trained_on: str, configured: str | Path) -> bool:
    """The same name, or two folders of one architecture (a model copied elsewhere)."""
    if trained_on == str(configured):
        return True
    configs = [Path(name) / "config.json" for name in (trained_on, configured)]
    if not all(config.is_file() for config in configs):
        return False
    ignored = ("_name_or_path", "transformers_version")
    first, second = (
        {k: v for k, v in json.loads(c.read_text(encoding="utf-8")).items() if k not in ignored}
        for c in configs
    )
    return first == second


def attach_lora(
    model: Any, r: int, alpha: int, dropout: float, init_adapter: str | Path | None = None
) -> PeftModel:
    """LoRA on the language model's linear layers: fresh, or continued from `init_adapter`."""
    if init_adapter is not None:
        log.info("LoRA continued from %s (trainable)", init_adapter)
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_MODULES
        )
        peft_model = get_peft_model(model, config)
    # transformers and peft make the embeddings' outputs require grad under checkpointing,
    # which only reentrant checkpointing needs: the first layer would compute input
    # gradients for nothing.
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.disable_input_require_grads()
    return peft_model


def training_precision(dtype: str) -> AbstractContextManager:
    """Autocast to `dtype` on a GPU, as the Trainer trains (`bf16`/`fp16`); nothing on a CPU."""
    if torch.cuda.is_available() and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return nullcontext()


def on_device(inputs: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`, the rest as it is."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()
    }
