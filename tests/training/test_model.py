import json
import re

import bitsandbytes as bnb
import torch

from robovqa_ft.model import LORA_TARGET_MODULES, attach_lora, load_model


def test_lora_is_never_on_the_vision_tower_or_projector(tiny_setup, tmp_path):
    base = load_model(tiny_setup["model"], "none", "float32", "sdpa", False)
    linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    vision = [n for n in linear if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and not any(re.fullmatch(LORA_TARGET_MODULES, n) for n in vision)

    model = attach_lora(base, 8, 16, 0.0)
    wrapped = {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith("lora_A")}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {f"base_model.model.{n}" for n in linear
                if "language_model" in n and n.endswith(projections)}  # fmt: skip
    assert wrapped == expected and len(wrapped) == 2 * 7  # two layers, seven projections
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == LORA_TARGET_MODULES


def test_nf4_quantizes_the_language_model_only(tiny_setup):
    model = load_model(tiny_setup["model"], "nf4", "float32", "sdpa", True)
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and all("language_model" in n for n in four_bit)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    quant = model.model.language_model.layers[0].self_attn.q_proj.weight.quant_state
    assert quant.quant_type == "nf4" and quant.nested  # double quantization
