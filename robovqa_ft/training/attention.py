"""Who attends to whom in a row that holds more than one causal sequence, and where each
token sits: the one mask builder of the project (packed rows and stage 1's trees), and
the model-side finish of a collated batch (the mask in the model's dtype, Qwen-VL's
3-D rotary positions).

A row is described per token by a `segment` (a packed row's samples or trees, laid end
to end) and a `branch` (0: a tree's shared prefix, or all of a plain sample; k: the
tree's k-th question). Token i sees token j when both are real, in the same segment,
j <= i, and j is in the prefix or in i's own branch. A padding token sees itself only,
or SDPA would softmax over nothing and return NaN for its row.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel

# Per-token keys of a collated batch that are the layout's, not model inputs: what the
# mask is made of, on the model's device (`model_inputs`).
SEGMENT = "segment"  # a packed row's samples or trees, 0, 1, ...; 0 in a padded row
BRANCH = "branch"  # 0 for a tree's prefix (and every token of a plain sample), k for branch k
REAL = "real_tokens_mask"  # (rows, length) bool: the tokens that are not padding


def visibility(segment: torch.Tensor, branch: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length) bool, True where query i may attend to key j; made in
    place, so that a long packed row holds about two L×L masks at once, not six."""
    length = segment.shape[1]
    seen = segment[:, :, None] == segment[:, None, :]
    seen &= torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    key_branch = branch[:, None, :]
    seen &= (key_branch == 0) | (key_branch == branch[:, :, None])
    seen &= real[:, :, None] & real[:, None, :]
    padding = ~real
    index = torch.arange(length, device=segment.device)
    seen[:, index, index] |= padding  # padding sees itself
    return seen[:, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility mask as the float mask that eager attention adds to its scores
    (it cannot take a bool one): 0 where seen, the dtype's minimum elsewhere."""
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)


def model_inputs(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs from a collated batch's (`collate.split_counters`): for rows of
    more than one sequence (trees, packed rows), the 4-D visibility mask made here, on the
    batch's device (bool for SDPA, additive in the model's dtype for eager), and for a
    model with 3-D rotary positions (Qwen-VL) the batch's 1-D positions made 3-D. Batches
    with a plain 2-D padding mask pass unchanged."""
    inputs = dict(inputs)
    segment, branch, real = (inputs.pop(k, None) for k in (SEGMENT, BRANCH, REAL))
    if real is None:
        return inputs
    base = extract_model_from_parallel(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft's
    mask = visibility(segment, branch, real)
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        mask = additive(mask, base.get_input_embeddings().weight.dtype)
    inputs["attention_mask"] = mask
    inner = base.model  # InternVLModel, Qwen2_5_VLModel, Qwen3VLModel
    if hasattr(inner, "get_rope_index"):
        inputs["position_ids"] = rope_positions(inner, inputs, real, branch)
    return inputs


def rope_positions(
    inner: Any, inputs: dict[str, Any], real: torch.Tensor, branch: torch.Tensor
) -> torch.Tensor:
    """Qwen-VL's (3, rows, length) rotary positions of rows that each hold one tree.

    The model's own `get_rope_index` places the row as one sequence: the prefix (with the
    frames' 3-D positions) and the first branch are where their separate sample has
    them, and each later branch, all text, sits further on by the branches before it. That
    offset is the row index less the tree's own position (`position_ids`: a branch
    continues from the prefix), subtracted from all three rows, which puts every branch
    where its separate sample has it: right after the prefix's largest position.
    Packed rows (several trees, each with frames) are refused for 3-D positions in the
    config check; not handled here.
    """
    tree = inputs["position_ids"]
    wanted = set(inspect.signature(inner.get_rope_index).parameters)
    given = {k: v for k, v in inputs.items() if k in wanted and k != "attention_mask"}
    rope, _ = inner.get_rope_index(**given, attention_mask=real.long())
    index = torch.arange(tree.shape[1], device=tree.device)[None]
    offset = torch.where(real & (branch > 0), index - tree, 0)
    return rope - offset[None].to(rope.dtype)
