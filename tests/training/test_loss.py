import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from robovqa_ft.training.collate import collator, split_counters
from robovqa_ft.training.families import model_family
from robovqa_ft.training.loss import labelled_token_losses
from robovqa_ft.training.model import attach_lora, load_model, load_processor
from robovqa_ft.training.samples import IGNORE_INDEX, JsonlDataset, SampleBuilder


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    torch.manual_seed(0)
    model = attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False), 8, 16, 0)
    processor = load_processor(tiny_setup["model"])
    builder = SampleBuilder(
        processor, model_family(tiny_setup["model"]), tiny_setup["images"], 4, 512
    )
    samples = [s for s in JsonlDataset(tiny_setup["stage2_train"], builder, limit=4)]
    return model.eval(), processor.tokenizer.pad_token_id, samples


def assert_losses_are_the_full_logits_own(model, batch: dict) -> None:
    """Each labelled token's loss, in order, and where it sits, equal the cross-entropy of
    the model's full logits (every position's) at that token; the head ran on labelled
    positions only."""
    inputs = split_counters(batch)[0]
    labels = inputs.pop("labels")
    heads = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: heads.append(out.shape)
    )
    with torch.no_grad():
        full = model(**inputs).logits  # (rows, length, vocab)
        labelled = labelled_token_losses(model, batch)
    hook.remove()
    rows, predicting = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    targets = labels[rows, predicting + 1]
    expected = F.cross_entropy(full[rows, predicting].float(), targets, reduction="none")
    assert heads[1] == (len(targets), full.shape[-1])
    assert labelled.losses.dtype == torch.float32
    torch.testing.assert_close(labelled.losses, expected)
    assert labelled.rows.tolist() == rows.tolist()
    assert labelled.positions.tolist() == (predicting + 1).tolist()


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_labelled_losses_are_the_full_logits_own_token_by_token(tiny, padding):
    model, pad_id, samples = tiny
    batch = collator(padding, pad_id)(samples)
    assert_losses_are_the_full_logits_own(model, batch)
    with torch.no_grad():  # and their mean is the model's own loss
        own = model(**split_counters(batch)[0]).loss
        torch.testing.assert_close(labelled_token_losses(model, batch).losses.mean(), own)


# Text only: the head and the gather are what differ between the families.
QWEN = {
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                   {"rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                 {"rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1]}}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(QWEN))
def test_qwen_labelled_losses_are_the_full_logits_own_token_by_token(family):
    config_class, model_class, rope = QWEN[family]
    text = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, **rope}  # fmt: skip
    config = config_class(text_config=text, vision_config={"depth": 1, "hidden_size": 32,
                                                           "out_hidden_size": 32})  # fmt: skip
    torch.manual_seed(0)
    model = attach_lora(model_class(config), 8, 16, 0).eval()
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length, answer in ((14, (5, 9)), (9, (3, 9))):
        ids = torch.randint(10, 97, (length,), generator=generator)
        labels = torch.full((length,), IGNORE_INDEX)
        labels[slice(*answer)] = ids[slice(*answer)]
        samples.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                        "labels": labels, "dropped_turns": 0})  # fmt: skip
    assert_losses_are_the_full_logits_own(model, collator("longest", 0)(samples))


def test_per_sample_losses_of_a_padded_batch_are_each_samples_alone(tiny):
    model, pad_id, samples = tiny
    batch = collator("longest", pad_id)(samples)
    with torch.no_grad():
        together = labelled_token_losses(model, batch)
        for row, sample in enumerate(samples):
            own = labelled_token_losses(model, collator("longest", pad_id)([sample])).losses
            torch.testing.assert_close(together.losses[together.rows == row], own, rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
