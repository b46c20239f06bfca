"""What a running training shows of itself, from rank 0 alone: its curves in TensorBoard
(`results/<run>/tensorboard/`, so that `tensorboard --logdir results` shows every run
side by side), the heartbeat that `robovqa-status` reads
(`results/<run>/heartbeat.json`), and a progress line in the log at each logging step.

Events are written with tensorboardX, never torch's `SummaryWriter` (nor the Trainer's
own TensorBoard integration, which takes torch's first): that one goes through
`tensorboard.compat`, which imports the real TensorFlow where it is installed (it is,
for the data rules), and TensorFlow must not share a process with torch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar
from transformers import TrainerCallback
from transformers.integrations.integration_utils import rewrite_logs

from robovqa_ft.core.files import atomic_open, remove_stale_parts, write_json_atomic
from robovqa_ft.core.runs import EVENTS_DIR, HEARTBEAT, read_heartbeat
from robovqa_ft.core.space import named_if_full
from robovqa_ft.core.text import duration
from robovqa_ft.data.tfrecord import CorruptShardError, iter_tfrecord
from robovqa_ft.training import ranks

log = logging.getLogger(__name__)

TENSORBOARD = "tensorboard"  # the training.report_to entry written here
EVENTS_GLOB = "events.out.tfevents.*"
KEPT = "the curves up to here are kept; a rerun resumes from the last complete checkpoint"


def trainer_integrations(report_to: list[str]) -> list[str]:
    """The `training.report_to` entries that the Trainer's own integrations serve: all
    but TensorBoard, which `TensorBoardCurves` writes without TensorFlow."""
    return [name for name in report_to if name != TENSORBOARD]


class TensorBoardCurves(TrainerCallback):
    """Every number the Trainer logs (the project's figures included, added where it
    logs), as a TensorBoard scalar at its step, named as the Trainer's integration names
    them (train/loss, eval/loss, …), on disk at each log so that the curves are live.

    Written by tensorboardX's synchronous `EventsWriter`: its `SummaryWriter` writes from
    a thread through a bounded queue, where a failed write (a full disk) is lost without
    a word and, once the queue is full, blocks the training for good.
    """

    def __init__(self, run_dir: Path, resumed_step: int):
        self.log_dir, self.resumed_step = Path(run_dir) / EVENTS_DIR, resumed_step
        self.writer: EventsWriter | None = None
        # now, not when training begins: a run resumed at its last step trains no more
        if ranks.world().is_main:
            keep_events_up_to(self.log_dir, resumed_step)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.writer is not None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with named_if_full(self.log_dir, "the TensorBoard events", KEPT):
            # the pid: two attempts in one second would otherwise share a file name
            self.writer = EventsWriter(str(self.log_dir / "events"), f".{os.getpid()}")
            # A TensorBoard that already shows the steps this attempt logs again hides
            # them on this event (what tensorboardX's `purge_step` writes).
            start = SessionLog(status=SessionLog.START)
            self.writer.write_event(
                Event(step=self.resumed_step + 1, wall_time=time.time(), session_log=start)
            )
            self.writer.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is None:
            return
        now = time.time()
        with named_if_full(self.log_dir, "the TensorBoard events", KEPT):
            for tag, value in rewrite_logs(logs or {}).items():
                if isinstance(value, (int, float)):
                    self.writer.write_event(Event(step=state.global_step, wall_time=now,
                                                  summary=scalar(tag, value)))  # fmt: skip
            self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def keep_events_up_to(log_dir: Path, step: int) -> None:
    """Drop the events past `step` from the run's event files, as the metrics CSVs drop
    their rows: the resumed run logs those steps again, and without this every reader of
    the files but TensorBoard itself would see them twice. So goes a last record that a
    kill cut short. Each file is replaced whole, or left as it was."""
    for path in sorted(Path(log_dir).glob(EVENTS_GLOB)):
        remove_stale_parts(path)  # a rewrite a kill interrupted
        data = path.read_bytes()
        records = list(whole_records(path))
        kept = [stored for stored, payload in records if Event.FromString(payload).step <= step]
        if len(kept) < len(records) or sum(len(stored) for stored, _ in records) < len(data):
            with (
                named_if_full(path, "the TensorBoard events", KEPT),
                atomic_open(path, "wb") as out,
            ):
                out.writelines(kept)


def whole_records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(the record as stored, its payload) of each whole record of an event file (TFRecord
    framing, read and checked by tfrecord.py), up to a last one a kill cut short."""
    data = path.read_bytes()
    try:
        for offset, payload in iter_tfrecord(path):
            yield data[offset : offset + 16 + len(payload)], payload
    except CorruptShardError as error:
        if not error.problem.startswith("truncated"):
            raise  # not what a kill leaves: a damaged file, said as such


class Heartbeat(TrainerCallback):
    """`heartbeat.json` in the run folder, replaced whole at the start, at each log and
    save, and at the end: where the status command reads a run's step, total, losses,
    throughput and ETA, while it trains, from another node, or after it crashed. Also
    the log's progress line at each logging step (step, total, ETA)."""

    def __init__(self, run_dir: Path, resumed_step: int):
        self.path = Path(run_dir) / HEARTBEAT
        self.resumed_step = resumed_step
        if ranks.world().is_main:  # what a killed write left, though none may follow
            remove_stale_parts(self.path)
        self.started: float | None = None
        self.beat = {
            "run": Path(run_dir).name, "host": socket.gethostname(), "pid": os.getpid(),
            "resumed_step": resumed_step, "step": resumed_step, "total_steps": None,
            "loss": None, "loss_step": None, "val_loss": None, "val_step": None,
            "samples_per_s": None, "tokens_per_s": None, "eta_seconds": None,
            "last_checkpoint_step": None, "last_checkpoint_time": None,
            "started": None, "updated": None, "updated_at": None, "longest_gap_seconds": 0.0,
        }  # fmt: skip
        # What the attempt before this one had seen up to the checkpoint resumed: the
        # val loss comes only every eval_steps.
        before = read_heartbeat(run_dir) or {}
        for value, at in (("loss", "loss_step"), ("val_loss", "val_step"),
                          ("last_checkpoint_time", "last_checkpoint_step")):  # fmt: skip
            if isinstance(before.get(at), int) and before[at] <= resumed_step:
                self.beat[value], self.beat[at] = before.get(value), before[at]

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.started = time.time()
            self.beat.update(started=self.started, total_steps=state.max_steps)
            self._write()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        logs, beat, step = logs or {}, self.beat, state.global_step
        if "loss" in logs:
            beat.update(loss=logs["loss"], loss_step=step, samples_per_s=logs.get("samples_per_s"),
                        tokens_per_s=logs.get("tokens_per_s"))  # fmt: skip
        if "eval_loss" in logs:
            beat.update(val_loss=logs["eval_loss"], val_step=step)
        beat["step"] = step
        done = step - self.resumed_step
        if done > 0 and self.started is not None and beat["total_steps"]:
            # this attempt's pace, its evaluations and saves included
            beat["eta_seconds"] = (time.time() - self.started) / done * (beat["total_steps"] - step)
        self._write()
        if "loss" in logs:
            log.info("%s", progress_line(beat))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # after CrashSafety marked it complete
            self.beat.update(step=state.global_step, last_checkpoint_step=state.global_step,
                             last_checkpoint_time=time.time())  # fmt: skip
            self._write()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.beat.update(step=state.global_step, eta_seconds=0.0)
            self._write()

    def _write(self) -> None:
        now = time.time()
        if self.beat["updated"] is not None:
            gap = now - self.beat["updated"]
            self.beat["longest_gap_seconds"] = max(self.beat["longest_gap_seconds"], gap)
        self.beat["updated"] = now
        self.beat["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
        with named_if_full(self.path, "the heartbeat", KEPT):
            write_json_atomic(self.path, self.beat)


def progress_line(beat: dict) -> str:
    """step 40/100 (40%): loss 4.981, val loss 5.012 (step 40), 12.3 samples/s, ETA 5m12s"""
    step, total = beat["step"], beat["total_steps"]
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%): loss {beat['loss']:.4g}"]
    if beat["val_loss"] is not None:
        parts.append(f"val loss {beat['val_loss']:.4g} (step {beat['val_step']})")
    if beat["samples_per_s"] is not None:
        parts.append(f"{beat['samples_per_s']:.3g} samples/s")
    if beat["eta_seconds"] is not None:
        parts.append(f"ETA {duration(beat['eta_seconds'])}")
    return ", ".join(parts)
