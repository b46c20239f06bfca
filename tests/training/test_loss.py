import pytest
import torch

from robovqa_ft.loss import labelled_token_losses, predicting_positions
from robovqa_ft.model import attach_lora, load_model, load_processor, model_family
from robovqa_ft.samples import IGNORE_INDEX, JsonlDataset, SampleBuilder, collator, split_counters


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


def test_predicting_positions_are_those_before_each_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7]])
    assert predicting_positions(labels).tolist() == [[False, True, True, False, True, False]]


@pytest.mark.parametrize("padding", ["longest", "packed"])
def test_labelled_losses_equal_the_models_full_logit_loss(tiny, padding):
    model, pad_id, samples = tiny
    batch, _ = split_counters(collator(padding, pad_id)(samples))
    heads = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: heads.append(out.shape)
    )
    with torch.no_grad():
        full = model(**batch).loss  # the model's own: every position's logits
        labelled = labelled_token_losses(model, batch)
    assert heads[0][:-1] == batch["input_ids"].shape  # full: (rows, length, vocab)

    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert heads[1] == (targets, heads[0][-1])  # the head ran on labelled positions only
    assert len(labelled.losses) == targets
    assert labelled.losses.dtype == torch.float32
    torch.testing.assert_close(labelled.losses.mean(), full, rtol=1e-6, atol=0)
    # each loss is its own token's: the labels at (rows, positions) are the targets
    expected = batch["labels"][labelled.rows, labelled.positions]
    assert (expected != IGNORE_INDEX).all()
    assert labelled.positions.min() >= 1


def test_per_sample_losses_of_a_padded_batch_are_each_samples_alone(tiny):
    model, pad_id, samples = tiny
    batch, _ = split_counters(collator("longest", pad_id)(samples))
    with torch.no_grad():
        together = labelled_token_losses(model, batch)
        for row, sample in enumerate(samples):
            alone, _ = split_counters(collator("longest", pad_id)([sample]))
            own = labelled_token_losses(model, alone).losses
            torch.testing.assert_close(together.losses[together.rows == row], own, rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
