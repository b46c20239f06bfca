"""What the training loop does around each step, as Trainer callbacks: a checkpoint on a
timer and on SIGTERM, marked complete only once written (and rotated); a refusal to save
non-finite weights; the sampler's epoch set at each epoch."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from robovqa_ft.core.space import named_if_full
from robovqa_ft.training import ranks
from robovqa_ft.training.checkpoints import (
    COMPLETE_MARKER,
    rotate_checkpoints,
)
from robovqa_ft.training.steps import ClipStepSampler, StepSampler

log = logging.getLogger(__name__)

KEPT_ON_FULL_CHECKPOINT = "the last complete checkpoint stays the one a rerun resumes"


class CrashSafety(TrainerCallback):
    """Marks finished checkpoints, saves every `save_every_minutes`, and on SIGTERM.

    Under DDP the ranks agree: a save or a stop wanted by any rank happens on every rank
    at the same step, and rank 0 marks a checkpoint complete only once every rank has
    written its part of it.
    """

    def __init__(self, checkpoint_dir: Path, save_every_minutes: float, keep: int | None = None):
        self.checkpoint_dir, self.keep = checkpoint_dir, keep
        self.interval = save_every_minutes * 60
        self.last_save = time.monotonic()
        self.terminated = self.stopped = False
        self.previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.terminated = True

    def on_step_end(self, args, state, control, **kwargs):
        due = time.monotonic() - self.last_save >= self.interval
        terminated, due = ranks.highest([self.terminated, due])
        if terminated:
            self.stopped = True  # agreed by every rank, unlike `terminated`
            log.warning("stopping at step %d, after saving a checkpoint", state.global_step)
            control.should_save = control.should_training_stop = True
        elif due:
            control.should_save = True

    def on_save(self, args, state, control, model=None, **kwargs):
        # The Trainer calls this on every rank right after that rank's part of the save.
        # Every rank holds the same weights, so all of them refuse a non-finite one alike.
        refuse_non_finite(state, model)
        ranks.barrier()
        if ranks.world().is_main:
            folder = self.checkpoint_dir / f"checkpoint-{state.global_step}"
            files = sorted(p.name for p in folder.iterdir())
            with named_if_full(folder, "a checkpoint", KEPT_ON_FULL_CHECKPOINT):
                (folder / COMPLETE_MARKER).write_text(
                    time.strftime("%Y-%m-%d %H:%M:%S\n") + "".join(f"{f}\n" for f in files)
                )
            log.info("checkpoint saved: step=%d", state.global_step)
            # The project rotates, not the Trainer: after the marker, complete ones only.
            rotate_checkpoints(self.checkpoint_dir, self.keep)
        self.last_save = time.monotonic()


class SamplerEpoch(TrainerCallback):
    """Gives the sampler its epoch at each epoch's start, from the step count: on a
    mid-epoch resume under DDP the Trainer's own `set_epoch` does not reach a sampler
    inside accelerate's skip and shard wrappers, and would replay epoch 0's order."""

    def __init__(self, sampler: StepSampler | ClipStepSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(state.global_step // self.sampler.steps)


def refuse_non_finite(state: Any, model: Any) -> None:
    """Stop before a checkpoint of non-finite loss or weights is marked complete: resuming
    it could only repeat the divergence."""
    losses = [row["loss"] for row in state.log_history if "loss" in row]
    weights = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    bad_loss = bool(losses) and not math.isfinite(losses[-1])
    bad_weights = any(not torch.isfinite(p).all() for p in weights)
    if bad_loss or bad_weights:
        what = "the loss is" if bad_loss else "the LoRA weights are"
        raise FloatingPointError(
            f"step {state.global_step}: {what} not finite; checkpoint-"
            f"{state.global_step} is not marked complete, and a rerun resumes from the last "
            "complete one: lower the learning rate or check the data of this step"
        )
