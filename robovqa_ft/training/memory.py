"""The training run's memory guard: stop with a checkpoint before the trainer takes more
memory than `model.max_memory_gb`. Where the GPU shares the host's memory (DGX Spark) an
over-budget run does not fail, it thrashes and hangs; elsewhere it dies of an
out-of-memory error mid-step and loses every step since the last checkpoint. It watches
what would run out (`memory_reading`): on a GPU of its own, what a step's tensors took,
not the freed blocks torch's allocator keeps cached and gives back before it would fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from robovqa_ft.core.files import write_json_atomic
from robovqa_ft.training import ranks
from robovqa_ft.training.checkpoints import latest_complete_checkpoint

log = logging.getLogger(__name__)

GB = 2**30  # as model.py reads max_memory_gb for the CUDA cap
# A step's growth seen so far is no bound on the next one's (a longer batch, the
# allocator's rounding): the headroom is never less than this share of the limit.
HEADROOM_FLOOR = 0.02
# Blocks are rounded up and split, and a freed one may fit no later request: a step can
# need this share more of the allocator's cap than its peak of allocated memory.
FRAGMENTATION_MARGIN = 0.10
_STATUS = Path("/proc/self/status")
STOPPED_FILE = "memory_guard.json"  # beside the checkpoints: the last stop, for a retry
_CLEAR_REFS = Path("/proc/self/clear_refs")
_highest_step_peak = 0  # bytes: the allocator's peaks that the guard's resets cleared


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


@dataclass(frozen=True)
class Reading:
    """What the guard watches: its name, for the messages, its measure in GB, and the
    share more that a step may need beyond what it measures (`FRAGMENTATION_MARGIN` for
    the allocator's peak: the limit caps the allocator, not the tensors)."""

    name: str
    measure: Callable[[], float]
    margin: float = 0.0


def memory_reading() -> Reading:
    """What would run out first on this process's machine.

    On the CPU: the host's peak resident memory since the last measure. On a GPU that
    shares the host's memory: CUDA's reserved memory and the host's resident memory,
    added, since the driver takes CUDA's memory outside the process's resident pages,
    both come out of the one memory, and blocks the allocator keeps cached are as gone to
    the host as blocks in use. On a GPU with its own memory: the most the step's tensors
    took (the allocator's peak since the last measure), plus `FRAGMENTATION_MARGIN`. Not
    what the allocator reserves: it keeps freed blocks up to its cap (`load_model` sets it
    at the limit) and frees them before it would fail, so with batches of varying shapes
    its reserve climbs to the cap in a healthy run.
    """
    if not torch.cuda.is_available():
        return Reading("host resident memory", host_memory_gb)
    if unified_memory():
        return Reading("host resident + CUDA reserved memory", _reserved_and_resident_gb)
    return Reading("CUDA peak allocated memory per step", _step_peak_gb, FRAGMENTATION_MARGIN)


def _reserved_and_resident_gb() -> float:
    return torch.cuda.memory_reserved() / GB + host_memory_gb()


def _step_peak_gb() -> float:
    """The allocator's peak since the last call; then a new peak."""
    global _highest_step_peak
    peak = torch.cuda.max_memory_allocated()
    _highest_step_peak = max(_highest_step_peak, peak)
    torch.cuda.reset_peak_memory_stats()
    return peak / GB


def cuda_peak_allocated_gb() -> float:
    """torch's `max_memory_allocated` since the process started, in GB, though the guard
    resets the allocator's peak at each step; 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0.0
    return max(_highest_step_peak, torch.cuda.max_memory_allocated()) / GB


class MemoryGuard(TrainerCallback):
    """Measures the trainer's memory at each step's end against `model.max_memory_gb`
    (`memory_reading`, chosen once: on a GPU with its own memory the step's peak of
    allocated memory plus a fragmentation margin, on one that shares the host's memory
    CUDA's reserved plus the host's resident memory, on the CPU the host's peak resident
    memory), with a headroom of the largest growth from one step's end to the next seen
    so far (at least `HEADROOM_FLOOR` of the limit):

    - measured at or over the limit: the step crossed it (on a GPU with its own memory
      `load_model` also caps CUDA's allocations at the limit, so there a step that crossed
      it died of an out-of-memory error, and this one came within the fragmentation
      margin of it). The job stops at once, non-zero, and saves nothing: saving takes
      more memory still, and on a shared-memory machine the process may already be
      swapping. A rerun resumes from the last checkpoint.
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
        reading: Reading | None = None,
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
        self.reading = reading or memory_reading()
        log.info(
            "memory guard: %s against model.max_memory_gb = %g GB", self.reading.name, self.limit
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if self.limit is not None:
            self.reading.measure()  # the peak of loading the model is no step's

    def on_step_end(self, args, state, control, **kwargs):
        if self.limit is None:
            return
        measured = self.reading.measure()
        if self.previous is not None:
            self.growth = max(self.growth, measured - self.previous)
        self.previous = measured
        current, growth = ranks.highest([measured, self.growth])
        # The step crossed the limit only if what it measured did; the margin is for the
        # next step's planning (a step at 95% of the allocator's cap finished fine).
        needed = current * (1 + self.reading.margin)
        headroom = max(growth, HEADROOM_FLOOR * self.limit)
        step = state.global_step
        if current >= self.limit:
            last = latest_complete_checkpoint(self.checkpoint_dir)
            resume = f"a rerun resumes from {last.name}" if last else "no checkpoint yet"
            message = (
                f"step {step}: {self.reading.name} reached {current:.2f} GB, over "
                f"model.max_memory_gb = {self.limit:g} GB, within this step; stopped without "
                f"saving ({resume} in {self.checkpoint_dir}). {self._what_to_lower()}"
            )
            log.error("memory guard: %s", message)
            self._remember(message)
            raise SystemExit(message)
        if needed + headroom >= self.limit and step < state.max_steps:
            margin = self.reading.margin
            with_margin = (
                f" ({needed:.2f} GB with {margin:.0%} for fragmentation)" if margin else ""
            )
            self.stop_message = (
                f"step {step}: {self.reading.name} reached {current:.2f} GB"
                f"{with_margin if margin else ''} of "
                f"model.max_memory_gb = {self.limit:g} GB, and the next step could add "
                f"{headroom:.2f} GB; saved "
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
