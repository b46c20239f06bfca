"""The order of the training's steps: which samples make each optimizer step on which
process (`StepSampler`: a seeded shuffle an epoch, cut to whole steps, length-grouped on
lengths measured once a run), whether a checkpoint is the run's last, and the data
loader's workers, which leave SIGTERM to the trainer."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Sampler

from robovqa_ft.core.files import write_json_atomic
from robovqa_ft.training import ranks
from robovqa_ft.training.samples import JsonlDataset
from robovqa_ft.training.trees import ClipTrees

log = logging.getLogger(__name__)


class StepSampler(Sampler):
    """The training order: a fresh seeded shuffle each epoch, cut to whole optimizer steps.

    The remainder of fewer than one step is dropped, so every step holds `step_size`
    samples on one process or on eight (under DDP, accelerate would pad a short last step
    with start-of-epoch samples). The ranks deal the order's micro-batches round-robin
    (accelerate's `BatchSamplerShard`), so a step's samples are the same for any count.

    With `lengths` (training.padding "grouped"), each step's samples are sorted longest
    first, so its micro-batches hold similar lengths, and dealt in snake order so that no
    rank gets the longest micro-batch of every round. A step is still a random draw:
    sorting within whole steps (not across many, as transformers' `LengthGroupedSampler`
    does by default) keeps long planning questions from filling whole steps of their own.
    """

    def __init__(
        self,
        size: int,
        step_size: int,
        seed: int,
        lengths: list[int] | None = None,
        batch_size: int = 1,
        ranks: int = 1,
    ):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} samples")
        self.size, self.step_size, self.seed = size, step_size, seed
        self.lengths, self.batch_size, self.ranks = lengths, batch_size, ranks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.step_size * self.step_size

    @property
    def steps(self) -> int:
        return self.size // self.step_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()[: len(self)]
        for start in range(0, len(order), self.step_size):
            step = order[start : start + self.step_size]
            if self.lengths is not None:
                step = sorted(step, key=lambda i: -self.lengths[i])
                step = snake_order(step, self.batch_size, self.ranks)
            yield from step


def snake_order(step: list[int], batch_size: int, ranks: int) -> list[int]:
    """A step's samples re-laid so that dealing its micro-batches round-robin gives rank
    0 the first, 1 the second ... in even rounds and the reverse in odd ones."""
    micro = [step[i : i + batch_size] for i in range(0, len(step), batch_size)]
    rounds = [micro[i : i + ranks] for i in range(0, len(micro), ranks)]
    dealt = [r[::-1] if j % 2 else r for j, r in enumerate(rounds)]
    return [i for round_ in dealt for batch in round_ for i in batch]


class ClipStepSampler(Sampler):
    """Stage 1's tree layout: steps of whole clips, each micro-batch a tuple of clips.

    A fresh seeded order of the clips each epoch is cut into `steps` steps (the epoch's
    questions over `step_questions`, so the step count, and the learning-rate schedule,
    is about the separate layout's, and the same every epoch): a clip goes to the step
    its first question would fall in, so every clip, and every question, is trained
    exactly once an epoch. Each step's clips are dealt, balanced by tokens (heaviest clip
    first, to the lightest), to the `ranks` and then to each rank's share of the
    `micro_batches`, which the ranks take round-robin: the same number on every rank, and
    a step's clips the same on any rank count. A micro-batch left without a clip (a step
    of fewer clips than micro-batches, as the seed recipe's 16 micro-batches of 2 and its
    ~9 clips a step) is an empty tuple: the collator's one-token stand-in, which teaches
    nothing.
    """

    def __init__(
        self,
        questions: list[int],
        tokens: list[int],
        step_questions: int,
        micro_batches: int,
        seed: int,
        ranks: int = 1,
    ):
        if len(tokens) != len(questions):
            raise ValueError(f"{len(tokens)} token counts for {len(questions)} clips")
        self.questions, self.tokens, self.seed = questions, tokens, seed
        self.micro_batches, self.ranks = micro_batches, ranks
        self.steps = sum(questions) // step_questions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.questions), generator=generator).tolist()
        total, before = sum(self.questions), 0
        steps: list[list[int]] = [[] for _ in range(self.steps)]
        for clip in order:
            steps[min(before * self.steps // total, self.steps - 1)].append(clip)
            before += self.questions[clip]
        for clips in steps:
            yield from self.balanced(clips)

    def balanced(self, clips: list[int]) -> list[tuple[int, ...]]:
        """`clips` dealt to the ranks, then each rank's to its micro-batches, heaviest
        first to the lightest, in the order the ranks take them round-robin."""
        per_rank = self.micro_batches // self.ranks
        mine = [self._deal(group, per_rank) for group in self._deal(clips, self.ranks)]
        return [tuple(mine[rank][k]) for k in range(per_rank) for rank in range(self.ranks)]

    def _deal(self, clips: list[int], bins: int) -> list[list[int]]:
        dealt: list[list[int]] = [[] for _ in range(bins)]
        load = [0] * bins
        for clip in sorted(clips, key=lambda c: -self.tokens[c]):
            lightest = load.index(min(load))
            dealt[lightest].append(clip)
            load[lightest] += self.tokens[clip]
        return dealt


def training_order(
    train_set: JsonlDataset | ClipTrees,
    stage: dict,
    training: dict,
    checkpoint_dir: Path,
    current: str,
) -> StepSampler | ClipStepSampler:
    """The sampler of whole optimizer steps; for length grouping, with the samples' token
    lengths, measured once per run (`measured_once`). Trees (`ClipTrees`) are dealt by
    clip, with their token counts measured the same way."""
    me = ranks.world()
    step = stage["batch_size"] * stage["grad_accum"]
    if isinstance(train_set, ClipTrees):
        largest = max(range(len(train_set)), key=lambda c: train_set.questions[c])
        if train_set.questions[largest] > step:
            raise ValueError(
                f"clip {train_set.clips[largest]} has {train_set.questions[largest]} "
                f"questions, more than a step's {step} (batch_size × grad_accum): a step of "
                "stage1.layout 'tree' holds whole clips; make the step at least that, or "
                "use stage1.layout 'separate'"
            )
        tokens = measured_once(checkpoint_dir, "tree_tokens", current, train_set.token_counts,
                               f"{len(train_set)} clips' tokens as trees, to balance "
                               "micro-batches")  # fmt: skip
        sampler = ClipStepSampler(train_set.questions, tokens, step, stage["grad_accum"],
                                  training["seed"], me.size)  # fmt: skip
        if sampler.steps == 0:
            raise ValueError(
                f"{sum(train_set.questions)} training questions are fewer than one optimizer "
                f"step (batch_size {stage['batch_size']} × grad_accum {stage['grad_accum']})"
            )
        log.info("Each epoch is %d steps of whole clips, %.1f questions a step on average "
                 "(%d clips, %d questions)", sampler.steps, sum(train_set.questions) /
                 sampler.steps, len(train_set), sum(train_set.questions))  # fmt: skip
        return sampler
    lengths = None
    if training["padding"] == "grouped":
        lengths = measured_once(checkpoint_dir, "token_lengths", current,
                                train_set.token_lengths, f"{len(train_set)} samples' token "
                                "lengths for length grouping")  # fmt: skip
    sampler = StepSampler(
        len(train_set), step, training["seed"], lengths, stage["batch_size"], me.size
    )
    if sampler.steps == 0:
        raise ValueError(
            f"{len(train_set)} training samples are fewer than one optimizer step "
            f"(batch_size {stage['batch_size']} × grad_accum {stage['grad_accum']})"
        )
    if len(sampler) < len(train_set):
        log.info(
            "Each epoch is %d whole steps of %d samples: the last %d samples of each "
            "epoch's shuffle are left out", sampler.steps, step, len(train_set) - len(sampler),
        )  # fmt: skip
    return sampler


def measured_once(
    checkpoint_dir: Path, name: str, current: str, measure: Callable[[], list[int]], what: str
) -> list[int]:
    """`measure()`, run by rank 0 once per run (its fingerprint `current`) and kept beside
    its checkpoints as `<name>-<fingerprint>.json` (an older run's deleted); every rank
    reads it."""
    path = checkpoint_dir / f"{name}-{current[:16]}.json"
    if ranks.world().is_main and not path.exists():
        log.info("Measuring %s", what)
        write_json_atomic(path, measure())
        for old in checkpoint_dir.glob(f"{name}-*.json"):
            if old != path:
                old.unlink()
    else:
        log.info("%s: from %s", what, path)
    ranks.barrier()
    return json.loads(path.read_text())


def finished_at(checkpoint: Path) -> bool:
    """Whether `checkpoint` is of the run's last step, by the Trainer's own count."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"]


def workers_ignore_sigterm(loader):
    """A scheduler signals every process of the job, DataLoader workers too, whose death
    would crash the step before the training could save: they leave SIGTERM to it (and
    end with it)."""
    base = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper iterates this
    base.worker_init_fn = partial(_ignore_sigterm, base.worker_init_fn)
    return loader


def _ignore_sigterm(then, worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if then is not None:
        then(worker_id)
