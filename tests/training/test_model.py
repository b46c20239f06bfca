import json
import re
from functools import partial

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from robovqa_ft.training.collate import pad_batch, split_counters
from robovqa_ft.training.families import FAMILIES, model_family
from robovqa_ft.training.loss import labelled_token_losses
from robovqa_ft.training.model import LORA_TARGET_MODULES, attach_lora, load_model, load_processor
from robovqa_ft.training.samples import JsonlDataset, SampleBuilder


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


def _step_gradients(model, batch, full_logits: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training loss on `batch`: the project's, or the model's
    own loss over full logits (as before this change)."""
    model.zero_grad(set_to_none=True)
    if full_logits:
        model(**split_counters(batch)[0]).loss.backward()
    else:
        labelled_token_losses(model, batch).losses.mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch(tiny_setup, rows: int = 3) -> dict:
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    dataset = JsonlDataset(tiny_setup["stage2_train"], builder, limit=rows)
    return pad_batch([dataset[i] for i in range(rows)], processor.tokenizer.pad_token_id)


def _seed_recipe_model(tiny_setup, quantization: str, checkpointing: bool):
    """The model as the code before this change prepared it: peft's kbit preparation (or
    checkpointing of every sub-model), which lets backward reach the vision tower."""
    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=list(FAMILIES["internvl"].keep_unquantized),
        )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(tiny_setup["model"], **kwargs)
    model.requires_grad_(False)
    if quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model, checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


class CallCounts:
    """Forward and backward calls of every submodule of `root` that holds weights itself
    (a linear layer, a norm, an embedding), by name."""

    def __init__(self, root: torch.nn.Module, prefix: str):
        self.forward: dict[str, int] = {}
        self.backward: dict[str, int] = {}
        for name, module in root.named_modules(prefix=prefix):
            if not list(module.parameters(recurse=False)):
                continue
            self.forward[name] = self.backward[name] = 0
            module.register_forward_hook(partial(self._count, self.forward, name))
            module.register_full_backward_hook(partial(self._count, self.backward, name))

    @staticmethod
    def _count(counts, name, *args):
        counts[name] += 1


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_vision_encoder_runs_forward_only_and_lora_gradients_are_unchanged(
    tiny_setup, quantization, checkpointing
):
    torch.manual_seed(0)
    batch = _batch(tiny_setup)
    old = get_peft_model(  # as attach_lora did: the old preparation's hooks stay
        _seed_recipe_model(tiny_setup, quantization, checkpointing),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES),
    )
    torch.manual_seed(0)
    base = load_model(tiny_setup["model"], quantization, "float32", "sdpa", checkpointing)
    new = attach_lora(base, 8, 16, 0.0)
    lora = {k: v for k, v in old.state_dict().items() if "lora_" in k}
    assert not new.load_state_dict(lora, strict=False).unexpected_keys  # the same LoRA init
    old.train(), new.train()
    inner = new.base_model.model.model
    vision = CallCounts(inner.vision_tower, "vision_tower")
    projector = CallCounts(inner.multi_modal_projector, "multi_modal_projector")
    language = CallCounts(inner.language_model.layers[0].mlp.down_proj.base_layer, "down")
    old_vision = CallCounts(old.base_model.model.model.vision_tower, "vision_tower")

    expected, got = _step_gradients(old, batch, full_logits=True), _step_gradients(new, batch)

    assert expected.keys() == got.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    for counts in (vision, projector):
        assert set(counts.forward.values()) == {1}  # once each, never recomputed
        assert set(counts.backward.values()) == {0}
    assert language.backward["down"] == 1  # the hooks do see backward where it runs
    assert language.forward["down"] == (2 if checkpointing else 1)  # recomputed
    if checkpointing:  # what the old preparation did, and this one no longer does
        assert max(old_vision.backward.values()) > 0


def test_nf4_keeps_the_unquantized_weights_in_the_compute_dtype(tiny_setup):
    model = load_model(tiny_setup["model"], "nf4", "bfloat16", "sdpa", True)
    model = attach_lora(model, 8, 16, 0.0)
    dtypes: dict[str, set] = {"norm": set(), "lora": set(), "other": set()}
    for name, param in model.named_parameters():
        if "lora_" in name:
            dtypes["lora"].add(param.dtype)
        elif "norm" in name:
            dtypes["norm"].add(param.dtype)
        elif param.dtype != torch.uint8:  # not the 4-bit weights
            dtypes["other"].add(param.dtype)
    assert dtypes == {"norm": {torch.float32}, "lora": {torch.float32},
                      "other": {torch.bfloat16}}  # fmt: skip
    inner = model.base_model.model
    for module in (inner.lm_head, inner.model.multi_modal_projector, inner.model.vision_tower,
                   inner.model.language_model.embed_tokens):  # fmt: skip
        assert {p.dtype for n, p in module.named_parameters() if "norm" not in n} == {
            torch.bfloat16
        }

    # The residual stream stays in bf16: fp32 norms hand their output on in bf16.
    streams = []
    for layer in inner.model.language_model.layers:
        layer.register_forward_hook(
            lambda m, a, out: streams.append(out[0].dtype if isinstance(out, tuple) else out.dtype)
        )
    losses = labelled_token_losses(model.train(), _batch(tiny_setup, rows=2)).losses
    losses.mean().backward()
    assert streams and set(streams) == {torch.bfloat16}
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_no_gradient_is_computed_for_the_first_layers_frozen_inputs(tiny_setup, quantization):
    base = load_model(tiny_setup["model"], quantization, "float32", "sdpa", True)
    model = attach_lora(base, 8, 16, 0.0).train()
    embeddings = []
    base.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embeddings.append(out.requires_grad)
    )
    labelled_token_losses(model, _batch(tiny_setup, rows=1)).losses.mean().backward()
    assert embeddings == [False]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
