"""The training run's memory guard: stop with a checkpoint before the trainer takes more
memory than `model.max_memory_gb`. Where the GPU shares the host's memory (DGX Spark) an
over-budget run does not fail, it thrashes and hangs; elsewhere it dies of an
out-of-memory error mid-step and loses every step since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import resource
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback

from robovqa_ft import ranks
from robovqa_ft.checkpoints import latest_complete_checkpoint
from robovqa_ft.files import write_json_atomic

log = logging.getLogger(__name__)

GB = 2**30  # as model.py reads max_memory_gb for the CUDA cap
# A step's growth seen so far is no bound on the next one's (a longer batch, the
# allocator's rounding): the headroom is never less than this share of the limit.
HEADROOM_FLOOR = 0.02
_STATUS = Path("/proc/self/status")
STOPPED_FILE = "memory_guard.json"  # beside the checkpoints: the last stop, for a retry
_CLEAR_REFS = Path("/proc/self/clear_refs")


def refuse_a_repeat(checkpoint_dir: Path, limit: float | None, fingerprint: str) -> None:
    """Stop before anything loads when the guard stopped this run's last attempt and the
    limit is no higher (nor the run changed): the step it stopped before would cross it.
    A higher limit, or another configuration, forgets that stop."""
    path = Path(checkpoint_dir) / STOPPED_FILE
    if not path.exists():
        return
    stopped = json.loads(path.read_text())
    same_run = stopped["fingerprint"] == fingerprint
    if same_run and limit is not None and limit <= stopped["limit"]:
        raise SystemExit(
            f"the memory guard stopped the last attempt: {stopped['message']} Not tried "
            f"again at model.max_memory_gb = {limit:g} GB (delete {path} to try anyway)"
        )
    if ranks.world().is_main:
        path.unlink(missing_ok=True)


def unified_memory() -> bool:
    """Whether this process's GPU shares the host's memory, as CUDA's `integrated` says
    (DGX Spark's GB10, Jetson). GH200's GPU has HBM of its own: not integrated."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_properties(torch.cuda.current_device()).is_integrated


def host_memory_gb() -> float:
    """The most resident memory this process has held since the last call, in GB.

    Linux's high-water mark (VmHWM), reset after reading, so that a step's peak counts even
    when the step freed it before its end. Where the mark cannot be reset, or there is no
    /proc (macOS), the peak since the process started: never less than the truth.
    """
    if not _STATUS.exists():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
        return peak / (GB if sys.platform == "darwin" else GB / 1024)
    kilobytes = int(re.search(r"^VmHWM:\s*(\d+) kB", _STATUS.read_text(), re.MULTILINE)[1])
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")  # the mark starts again from the current resident size
    return kilobytes * 1024 / GB


def memory_in_use_gb(unified: bool) -> float:
    """What the guard watches, in GB.

    On a GPU with its own memory: what torch's CUDA allocator holds (`memory_reserved`; it
    keeps freed blocks, so at a step's end it holds at least that step's peak). On the CPU:
    the host's peak resident memory since the last call. On a GPU that shares the host's
    memory: both, added, since the driver takes CUDA's memory outside the process's
    resident pages, and both come out of the one memory.
    """
    if not torch.cuda.is_available():
        return host_memory_gb()
    reserved = torch.cuda.memory_reserved() / GB
    return reserved + host_memory_gb() if unified else reserved


def _watched(unified: bool) -> str:
    if not torch.cuda.is_available():
        return "host resident memory"
    return "host resident + CUDA reserved memory" if unified else "CUDA reserved memory"


class MemoryGuard(TrainerCallback):
    """Measures the trainer's memory at each step's end (`memory_in_use_gb`) against
    `model.max_memory_gb`, with a headroom of the largest growth from one step's end to
    the next seen so far (at least `HEADROOM_FLOOR` of the limit):

    - measured at or over the limit: the step crossed it (on a GPU with its own memory
      `load_model` also caps CUDA's allocations at the limit, so there an overshoot is a
      CUDA out-of-memory error within the step instead). The job stops at once, non-zero,
      and saves nothing: saving takes more memory still, and on a shared-memory machine
      the process may already be swapping. A rerun resumes from the last checkpoint.
    - within the headroom of it: the next step could cross it. A checkpoint is saved at
      this step, training stops, and `stop_message` (for a SystemExit) says what to lower.
      Not on the last step: no step follows it.

    The first step's rise above the loaded model (optimizer state, activations, the
    allocator's pools) is set-up, not growth. Only the trainer process counts, not its
    DataLoader workers. Under DDP the highest measurement and headroom of any rank decide
    on every rank, so that they save and stop together. With no limit it does nothing.
    """

    def __init__(
        self,
        model: dict,
        stage: dict,
        checkpoint_dir: Path,
        fingerprint: str = "",
        measure: Callable[[], float] | None = None,
    ):
        self.limit = model.get("max_memory_gb")
        self.checkpointing = model.get("gradient_checkpointing", True)
        self.stage, self.checkpoint_dir = stage, Path(checkpoint_dir)
        self.fingerprint = fingerprint
        self.previous: float | None = None
        self.growth = 0.0
        self.stop_message: str | None = None
        if self.limit is None:
            log.info("model.max_memory_gb is not set: no memory guard")
            return
        unified = unified_memory()
        self.watched = _watched(unified)
        self.measure = measure or partial(memory_in_use_gb, unified)
        log.info("memory guard: %s against model.max_memory_gb = %g GB", self.watched, self.limit)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.limit is not None:
            self.measure()  # the peak of loading the model is no step's

    def on_step_end(self, args, state, control, **kwargs):
        if self.limit is None:
            return
        current = self.measure()
        if self.previous is not None:
            self.growth = max(self.growth, current - self.previous)
        self.previous = current
        current, growth = ranks.highest([current, self.growth])
        headroom = max(growth, HEADROOM_FLOOR * self.limit)
        step = state.global_step
        if current >= self.limit:
            last = latest_complete_checkpoint(self.checkpoint_dir)
            resume = f"a rerun resumes from {last.name}" if last else "no checkpoint yet"
            message = (
                f"step {step}: {self.watched} reached {current:.2f} GB, over "
                f"model.max_memory_gb = {self.limit:g} GB, within this step; stopped without "
                f"saving ({resume} in {self.checkpoint_dir}). {self._what_to_lower()}"
            )
            log.error("memory guard: %s", message)
            self._remember(message)
            raise SystemExit(message)
        if current + headroom >= self.limit and step < state.max_steps:
            self.stop_message = (
                f"step {step}: {self.watched} reached {current:.2f} GB of model.max_memory_gb "
                f"= {self.limit:g} GB, and the next step could add {headroom:.2f} GB; saved "
                f"checkpoint-{step} in {self.checkpoint_dir} and stopped. "
                f"{self._what_to_lower()}"
            )
            log.warning("memory guard: %s", self.stop_message)
            self._remember(self.stop_message)
            control.should_save = control.should_training_stop = True

    def _remember(self, message: str) -> None:
        """For the next attempt (`refuse_a_repeat`): Snakemake's retries, or the same
        command run again, would take the same step with the same limit."""
        if ranks.world().is_main:
            write_json_atomic(self.checkpoint_dir / STOPPED_FILE, {
                "limit": self.limit, "fingerprint": self.fingerprint, "message": message,
            })  # fmt: skip

    def _what_to_lower(self) -> str:
        """What the user can change: bookkeeping settings resume the run, shaping ones (the
        stage section) start it anew."""
        stage = self.stage
        batch, accum = stage["batch_size"], stage["grad_accum"]
        resumes = "raise model.max_memory_gb"
        if not self.checkpointing:
            resumes += " or set model.gradient_checkpointing: true"
        return (
            f"To resume from the last checkpoint, {resumes}. Or lower the stage's "
            f"micro-batch batch_size (now {batch}; raise grad_accum, now {accum}, to keep "
            f"the global batch of {batch * accum}), max_frames (now {stage['max_frames']}) "
            f"or max_seq_len (now {stage['max_seq_len']}): that changes the run, which then "
            "starts from step 0."
        )
