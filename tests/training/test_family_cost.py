"""bench/family_cost.py: the counted cost of each 8B family, at small scale (a few
synthetic clips), checked against what the project and torch do."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "training" / "fixtures" / "real_processors"
# Published parameter counts (the hub's model cards and safetensors totals).
PUBLISHED = {"InternVL3-8B-hf": 7.94e9, "Qwen2.5-VL-7B-Instruct": 8.29e9,
             "Qwen3-VL-8B-Instruct": 8.77e9}  # fmt: skip
QWEN = ("Qwen2.5-VL-7B", "Qwen3-VL-8B")


def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import family_cost

    return family_cost


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every column on 8 synthetic clips; the first clip of each question count among
    them and 3 stage-2 rows encoded in full, which must match the counts."""
    return bench().run(tmp_path_factory.mktemp("family_cost"), clips=8)


def test_the_table_has_a_column_per_family_and_a_cell_per_row(results):
    family_cost = bench()
    lines = family_cost.table(results)
    assert lines[0] == "| | " + " | ".join(c.label for c in family_cost.COLUMNS) + " |"
    assert len(lines) == 2 + len(family_cost.ROWS)
    assert all(line.count(" | ") == len(family_cost.COLUMNS) for line in lines[2:])
    for f in results.values():  # the counts were checked against encoded samples
        assert f["tokens"].checked["stage1"] >= 2 and f["tokens"].checked["stage2"] == 3


@pytest.mark.parametrize("model", QWEN)
def test_frames_as_one_video_cost_fewer_tokens_flops_and_hours_than_as_images(results, model):
    video, images = results[f"{model} video"], results[f"{model} images"]
    # the temporal patch takes the frames in pairs: half the image tokens, half the patches
    for stage in ("1", "2"):
        assert 2 * video[f"visual {stage}"] == images[f"visual {stage}"]
        assert 2 * video[f"patches {stage}"] == images[f"patches {stage}"]
    for figure in ("tokens 1 separate", "tokens 1 tree", "tokens 2", "flops 1 separate",
                   "flops 1 tree", "flops 2", "hours three", "activations"):  # fmt: skip
        assert video[figure] < images[figure], figure
    # the same questions and answers, whatever the frames
    assert video["labelled 1"] == images["labelled 1"]
    if model == "Qwen3-VL-8B":  # its video states each pair's time: text the images lack
        assert (
            video["frame tokens 1"] - video["visual 1"]
            > images["frame tokens 1"] - (images["visual 1"])
        )


def test_a_tree_counts_fewer_tokens_and_flops_a_question_than_separate_samples(results):
    for f in results.values():
        assert f["tokens 1 tree"] < f["tokens 1 separate"] / 2
        assert f["flops 1 tree"] < f["flops 1 separate"] / 2
        assert f["hours 1 tree"] < f["hours 1 separate"]


def test_internvl_is_counted_by_train_steps_own_formula_and_reproduces_its_step(results):
    family_cost = bench()
    from train_step import lora_parameters, model_flops, tile_flops

    f = results["InternVL3-8B"]
    config = f["config"]
    lora = lora_parameters(config, 128)
    frames = f["tokens"].frames["stage1"]
    lengths, labelled = [1_099] * 32, 11 * 32
    own = model_flops(config, lengths, labelled, 32 * frames["tiles"] * tile_flops(config), lora)
    assert family_cost.sample_flops(config, lengths, labelled, frames, lora) == own
    # its language terms alone (as every family's) and the frames
    language = model_flops(config, lengths, labelled, 0, lora)
    assert language + 32 * frames["flops"] == own
    assert f["vision 1"] == frames["flops"] == frames["tiles"] * tile_flops(config)
    # docs/performance.md §1: a stage-1 step of 32 × 1,099 tokens, 11 labelled, 4 tiles
    # each is 1.10 PFLOP (the `model` column of §5: 1,104 TFLOP)
    assert frames["tiles"] == 4
    assert own / 1e12 == pytest.approx(1_104, abs=1)


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_parameters_from_the_configs_and_the_formulas_weights_match_the_built_model(model):
    family_cost = bench()
    from train_step import language_sizes, vision_weights

    config = family_cost.load_config(FIXTURES / model)
    built = family_cost.meta_model(config)
    counts = family_cost.parameters(built)
    assert counts["total"] == pytest.approx(PUBLISHED[model], rel=0.02)
    assert counts["head"] > 0 and counts["other"] == 0  # untied, and nothing left ungrouped
    linear = family_cost.linear_weights(built)
    assert language_sizes(config)[0] == linear["language model"]
    assert config.text_config.hidden_size * config.text_config.vocab_size == linear["head"]
    if config.model_type != "internvl":
        weights = vision_weights(config)
        assert weights["blocks"] == linear["vision"]
        assert weights["mergers"] == linear["projector"]


def test_lora_count_is_what_peft_puts_on_the_language_model():
    family_cost = bench()
    from peft import LoraConfig, get_peft_model
    from train_step import lora_parameters

    from robovqa_ft.training.model import LORA_TARGET_MODULES

    config = family_cost.load_config(FIXTURES / "Qwen3-VL-8B-Instruct")  # 36 layers, GQA 4
    model = get_peft_model(family_cost.meta_model(config),
                           LoraConfig(r=128, target_modules=LORA_TARGET_MODULES))  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_parameters(config, 128)


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_activations_counted_a_layer_are_what_torch_keeps_for_its_backward(model):
    """One decoder layer of each family's own language model (small widths), LoRA from
    the project's target modules, forward under bf16 autocast with a 4-D mask, as a
    checkpointed layer recomputes for its backward: the bytes autograd saves that grow
    with the tokens (the layer's inputs, its mask and rotary tables, are the
    checkpoint's) equal `activation_bytes`'s layer, with the CPU's float dropout masks."""
    family_cost = bench()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from robovqa_ft.training.model import LORA_TARGET_MODULES

    text = family_cost.load_config(FIXTURES / model).text_config.to_dict()
    small = {key: value for key, value in text.items() if key != "layer_types"}
    small |= {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 1,
              "vocab_size": 128, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    config = type(family_cost.load_config(FIXTURES / model).text_config)(**small)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.language_model = AutoModel.from_config(config).to(torch.bfloat16)
    holder.requires_grad_(False)
    r, length = 16, 509
    get_peft_model(holder, LoraConfig(r=r, lora_alpha=32, lora_dropout=0.05,
                                      target_modules=LORA_TARGET_MODULES))  # fmt: skip
    saved, given = {}, set()

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def enter(module, args, kwargs):
        for value in (*args, *kwargs.values()):
            for tensor in value if isinstance(value, tuple) else (value,):
                if torch.is_tensor(tensor):
                    given.add(tensor.untyped_storage().data_ptr())
        hooks.__enter__()

    layer = holder.language_model.layers[0]
    layer.register_forward_pre_hook(enter, with_kwargs=True)
    layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    x = torch.randn(1, length, 512, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.zeros(1, 1, length, length, dtype=torch.bfloat16)
    mask.masked_fill_(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    holder.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        holder.language_model(inputs_embeds=x, attention_mask=mask)
    kept = sum(t.untyped_storage().nbytes() for p, t in saved.items()
               if p not in given and length in t.shape)  # fmt: skip
    counted = family_cost.activation_bytes(config, 1, length, 0, r, mask_bytes=4)["layer"]
    assert kept == counted
