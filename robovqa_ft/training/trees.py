"""Stage 1's one-pass layout (`stage1.layout: tree`): a clip's questions as one tree.

Every stage-1 question of a clip is asked about the same frames. A tree lays out the
tokens the clip's encoded questions share once (system prompt, user header, the frames'
image tokens and any common question text: their longest common prefix), then each
question's own continuation as a branch. With the visibility mask of `attention.py`
(each branch sees the prefix and itself, never another branch) and each branch's
positions continuing from the prefix, every question's logits, loss and gradient are
those of its separate sample, while the vision tower and the language model run the
prefix once.

Trees are built from `SampleBuilder.encode`'s samples, so the prompt, the frames and the
labels are exactly a separate sample's. A clip whose tree would pass `max_seq_len` gets
several trees, each with the prefix; a question that does not fit alone is skipped, as
in the separate layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from robovqa_ft.core.settings import LAYOUTS, tree_attention_problem
from robovqa_ft.training.attention import BRANCH
from robovqa_ft.training.samples import IGNORE_INDEX, JsonlDataset


def check_layout(stage: dict, attention: str) -> None:
    """Before any work: a layout that is not one, or a tree with an attention kernel that
    cannot take its mask."""
    layout = stage.get("layout", "separate")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    problem = tree_attention_problem(layout, attention)
    if problem:
        raise ValueError(problem)


def shared_prefix(samples: list[dict]) -> int:
    """How many leading tokens a tree of `samples` shares: their longest common prefix,
    stopped a token before the first that any of them labels, so that the prefix's last
    logit predicts no label (each branch predicts its own, from its own tokens: two
    questions alike up to the answer still differ in their branches)."""
    ids = [s["input_ids"] for s in samples]
    shortest = min(len(x) for x in ids)
    first_label = min(int((s["labels"] != IGNORE_INDEX).nonzero()[0, 0]) for s in samples)
    stack = torch.stack([x[:shortest] for x in ids])
    differs = (stack != stack[0]).any(dim=0).nonzero()
    common = int(differs[0, 0]) if len(differs) else shortest
    # a branch's first token is never a label: the token before it is the prefix's, which
    # in the row sits right before the first branch only
    return min(common, first_label - 1)


def build_tree(samples: list[dict]) -> dict[str, Any]:
    """One tree of the encoded questions of one clip (their frames the same): per-token
    tensors as prefix then branches, the visual inputs once, `position_ids` continuing
    from the prefix in each branch, `BRANCH` (0 the prefix, k the k-th question), and
    counts: `questions`, `dropped_turns` and `prefix_tokens_saved`."""
    prefix = shared_prefix(samples)
    length = len(samples[0]["input_ids"])
    tree: dict[str, Any] = {}
    for key, first in samples[0].items():
        if key == "dropped_turns":
            continue
        if first.dim() == 1 and len(first) == length:  # per token
            tree[key] = torch.cat([first[:prefix], *(s[key][prefix:] for s in samples)])
        else:  # the frames: the same in every sample
            tree[key] = first
    branches = [len(s["input_ids"]) - prefix for s in samples]
    tree["position_ids"] = torch.cat(
        [torch.arange(prefix), *(torch.arange(prefix, prefix + n) for n in branches)]
    )
    tree[BRANCH] = torch.cat(
        [torch.zeros(prefix, dtype=torch.long),
         *(torch.full((n,), k + 1) for k, n in enumerate(branches))]
    )  # fmt: skip
    tree["questions"] = len(samples)
    tree["dropped_turns"] = sum(s["dropped_turns"] for s in samples)
    tree["prefix_tokens_saved"] = prefix * (len(samples) - 1)
    return tree


def clip_trees(samples: list[dict | None], max_seq_len: int) -> list[dict | None]:
    """The trees of one clip's encoded questions, in order, each at most `max_seq_len`
    tokens (a question is added to the current tree while the tree still fits, else it
    opens the next); a None (a question whose first answer does not fit) stays a None,
    counted as skipped by the collator."""
    trees: list[dict | None] = [None] * sum(s is None for s in samples)
    group: list[dict] = []
    for sample in (s for s in samples if s is not None):
        if group and _tree_length([*group, sample]) > max_seq_len:
            trees.append(build_tree(group))
            group = []
        group.append(sample)
    if group:
        trees.append(build_tree(group))
    return trees


def _tree_length(samples: list[dict]) -> int:
    prefix = shared_prefix(samples)
    return prefix + sum(len(s["input_ids"]) - prefix for s in samples)


def by_clip(dataset: JsonlDataset, indices: list[int] | None = None) -> dict[str, list[int]]:
    """The dataset's rows (all, or those of `indices`) by clip (`video_id`), in the order
    each clip is first seen."""
    wanted = None if indices is None else set(indices)
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(dataset.rows()):
        if wanted is None or index in wanted:
            groups.setdefault(row["video_id"], []).append(index)
    return groups


class ClipTrees(Dataset):
    """A stage-1 JSONL file by clip: item `i` is the trees of the i-th clip (first seen
    order in the file); a tuple of clip indices (a micro-batch, `steps.ClipStepSampler`)
    gives all their trees. `questions` counts each clip's lines."""

    def __init__(self, dataset: JsonlDataset):
        self.dataset = dataset
        groups = by_clip(dataset)
        self.clips, self.members = list(groups), list(groups.values())
        self.questions = [len(m) for m in self.members]

    def __len__(self) -> int:
        return len(self.members)

    def rows(self, clip: int) -> list[dict]:
        return [self.dataset.row(i) for i in self.members[clip]]

    def __getitem__(self, clips: int | tuple[int, ...]) -> list[dict | None]:
        if isinstance(clips, int):
            clips = (clips,)
        builder = self.dataset.builder
        trees: list[dict | None] = []
        for clip in clips:
            samples = [builder.encode(row) for row in self.rows(clip)]
            trees += clip_trees(samples, builder.max_seq_len)
        return trees

    def token_counts(self, chunk: int = 2048) -> list[int]:
        """Each clip's tokens as trees, from the text alone, in one pass over the file: its
        questions' lengths (`SampleBuilder.token_lengths`) less, for all but one, what
        they share (their common text and their frames). For balancing micro-batches:
        it ignores the split of a tree longer than `max_seq_len`, where an estimate
        serves."""
        builder = self.dataset.builder
        clip_of = {index: clip for clip, members in enumerate(self.members) for index in members}
        total, frame_tokens = [0] * len(self), [0] * len(self)
        shared: list[list[int] | None] = [None] * len(self)

        def add(rows: list[tuple[int, dict]]) -> None:
            texts = builder.text_tokens([row for _, row in rows])
            for (index, _), (ids, frames) in zip(rows, texts, strict=True):
                clip = clip_of[index]
                total[clip] += builder.length_of(ids, frames)
                frame_tokens[clip] = frames
                shared[clip] = ids if shared[clip] is None else _common(shared[clip], ids)

        rows: list[tuple[int, dict]] = []
        for index, row in enumerate(self.dataset.rows()):
            rows.append((index, row))
            if len(rows) == chunk:
                add(rows)
                rows = []
        if rows:
            add(rows)
        counted = zip(total, shared, frame_tokens, self.questions, strict=True)
        return [t - (len(s or []) + f) * (q - 1) for t, s, f, q in counted]


def _common(a: list[int], b: list[int]) -> list[int]:
    """The longest common prefix of two token lists."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]
