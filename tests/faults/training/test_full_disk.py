"""A full disk on the training side (issue 13, point 4): a run that would not fit is
refused before its first checkpoint, and a full disk while writing a checkpoint, the
metrics CSV or the adapter fails naming the path, keeps the last complete checkpoint as
the one resumed, publishes no partial adapter, and a rerun once space is freed ends on
the adapter of a run that never met one.

A full disk is a write that raises OSError(ENOSPC), injected at the write call itself
(mounting a small file system needs privileges CI may lack).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import peft.peft_model
import pytest
import torch
from training_helpers import adapter_weights, csv_rows, max_difference
from training_helpers import train_tiny as run

from robovqa_ft.core.space import DiskFullError, disk_full, is_disk_full, size_text
from robovqa_ft.training.checkpoints import (
    COMPLETE_MARKER,
    latest_complete_checkpoint,
    training_bytes,
)
from robovqa_ft.training.metrics import MetricsLog, _append
from robovqa_ft.training.model import attach_lora, load_model
from robovqa_ft.training.train import _also_logged_to

# One epoch of 6 steps, as a real run ends (on the epoch, not on a max_steps within it,
# from which a resumed Trainer takes one step more before it stops); checkpoints at
# steps 2, 4 and 6; no periodic evaluation, which no test here needs.
SETTINGS = {"data": "stage2", "max_steps": -1, "save_steps": 2, "eval_steps": 1000}


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def finished(tiny_setup, tmp_path_factory) -> Path:
    """The folder of the same run, never short of space."""
    out = tmp_path_factory.mktemp("finished")
    run(tiny_setup, out, **SETTINGS)
    return out


@pytest.fixture
def reference(finished) -> dict:
    return adapter_weights(finished / "adapter")


def assert_ends_like(out: Path, reference: dict, resumed: int) -> None:
    assert f"Resumed from checkpoint: step={resumed}" in (out / "training.log").read_text()
    assert max_difference(adapter_weights(out / "adapter"), reference) <= 1e-7
    assert [int(r["step"]) for r in csv_rows(out / "train_metrics.csv")] == [1, 2, 3, 4, 5, 6]


# --- before training starts -----------------------------------------------------------------


def test_what_a_run_still_writes_counts_the_checkpoints_already_there():
    # keep 3: three complete ones and the one being saved at once, then the adapter
    assert training_bytes(1000, keep=3, complete=0) == 4 * 12_000 + 4000
    assert training_bytes(1000, keep=3, complete=2) == 2 * 12_000 + 4000
    assert training_bytes(1000, keep=3, complete=3) == 12_000 + 4000
    assert training_bytes(1000, keep=None, complete=5) == 12_000 + 4000


def test_a_run_that_would_not_fit_is_refused_before_its_first_checkpoint(
    tiny_setup, tmp_path, monkeypatch
):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-3").mkdir(parents=True)  # of no known run: set aside at start
    trainable = sum(
        p.numel()
        for p in attach_lora(load_model(tiny_setup["model"], "none", "float32", "sdpa", False),
                             8, 16, 0.1).parameters()
        if p.requires_grad
    )  # fmt: skip
    needed = (3 + 1) * 12 * trainable + 4 * trainable  # save_total_limit 3, fp32, no complete
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=needed - 1))
    with pytest.raises(DiskFullError) as error:
        run(tiny_setup, tmp_path, save_total_limit=3, **SETTINGS)
    message = str(error.value)
    assert f"the checkpoints and adapter of run {tmp_path.name} ({trainable:,} trainable" in message
    assert f"it needs about {size_text(needed)}," in message and "rerun the same command" in message
    (aside,) = checkpoints.glob("stale-*")
    assert f"(the set-aside {aside} can go)" in message
    assert not list(checkpoints.glob("checkpoint-*"))
    assert not (tmp_path / "train_metrics.csv").exists()


# --- a checkpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize("write", ["optimizer", "completion marker"])
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_complete_one_to_resume(
    tiny_setup, tmp_path, monkeypatch, reference, write
):
    if write == "optimizer":  # the Trainer's torch.save of checkpoint-4/optimizer.pt
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if Path(f).name == "optimizer.pt" and Path(f).parent.name == "checkpoint-4":
                Path(f).write_bytes(b"the part of the optimizer's state that fitted")
                raise no_space()
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:  # the project's marker, once the Trainer has written everything else
        real_write = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == COMPLETE_MARKER and self.parent.name == "checkpoint-4":
                raise no_space()
            return real_write(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError) as error:
        run(tiny_setup, tmp_path, **SETTINGS)
    half = tmp_path / "checkpoints" / "checkpoint-4"
    assert error.value.filename == str(half)
    assert f"while writing a checkpoint {half} (" in str(error.value)
    assert "the last complete checkpoint stays the one a rerun resumes" in str(error.value)
    assert latest_complete_checkpoint(tmp_path / "checkpoints").name == "checkpoint-2"
    assert not (tmp_path / "adapter").exists()

    monkeypatch.undo()  # space freed
    run(tiny_setup, tmp_path, **SETTINGS)
    assert list((tmp_path / "checkpoints").glob("incomplete-*/checkpoint-4"))  # set aside
    assert_ends_like(tmp_path, reference, resumed=2)


def test_torch_and_safetensors_words_for_a_full_disk_are_recognised():
    # torch's zip writer and safetensors' Rust writer on a full disk: no errno
    zip_writer = "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
    assert is_disk_full(RuntimeError(zip_writer + "writing file data/0: file write failed"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"))
    rust = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert is_disk_full(Exception(f"Error while serializing: {rust}"))
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as quota:
            raise RuntimeError("saving failed") from quota
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(OSError(errno.ENOSPC, "write failed"))  # by its errno alone
    assert not is_disk_full(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


# --- the metrics CSV ------------------------------------------------------------------------


def test_a_full_disk_mid_row_of_the_metrics_fails_naming_them_and_the_rerun_drops_the_cut(
    tiny_setup, tmp_path, monkeypatch
):
    real_open = Path.open

    class CutAtStep3:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            if data.startswith("3,"):  # the row of step 3: part of it fits
                self.handle.write(data[:6])
                raise no_space()
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    def open_(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return CutAtStep3(handle) if self.name == "train_metrics.csv" and "a" in mode else handle

    monkeypatch.setattr(Path, "open", open_)
    metrics = tmp_path / "train_metrics.csv"
    with pytest.raises(DiskFullError) as error:
        run(tiny_setup, tmp_path, **{**SETTINGS, "max_steps": 4})
    assert f"while writing the metrics {metrics} (" in str(error.value)
    assert not metrics.read_text().endswith("\n"), "the row of step 3 was cut short"

    monkeypatch.undo()  # space freed
    run(tiny_setup, tmp_path, **{**SETTINGS, "max_steps": 4})
    rows = csv_rows(metrics)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and r["skipped_samples"] for r in rows), "no cut row kept"


def test_a_last_row_cut_short_is_dropped_even_where_it_reads_as_an_earlier_step(tmp_path):
    metrics = tmp_path / "train_metrics.csv"
    for step in range(1, 13):
        _append(metrics, MetricsLog.TRAIN, {"step": step, "loss": 1.0})
    with metrics.open("a") as handle:
        handle.write("1")  # step 13's row, cut after its first digit
    MetricsLog(tmp_path, resumed_step=12, eval_samples=0)
    assert [int(r["step"]) for r in csv_rows(metrics)] == list(range(1, 13))
    metrics.write_text("step,epo")  # even the header cut short
    MetricsLog(tmp_path, resumed_step=0, eval_samples=0)
    assert metrics.read_text() == ",".join(MetricsLog.TRAIN) + "\n"


# --- the adapter ----------------------------------------------------------------------------


def test_a_full_disk_while_saving_the_adapter_publishes_none_and_keeps_the_checkpoints(
    tiny_setup, tmp_path, monkeypatch, finished, reference
):
    # The finished run's folder before its adapter was saved: its trained checkpoints
    shutil.copytree(finished, tmp_path, ignore=shutil.ignore_patterns("adapter"),
                    dirs_exist_ok=True)  # fmt: skip
    real_save = peft.peft_model.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name.startswith(".adapter."):  # atomic_directory's folder
            Path(filename).write_bytes(b"the part of the adapter that fitted")
            raise no_space()
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)
    with pytest.raises(DiskFullError) as error:
        run(tiny_setup, tmp_path, **SETTINGS)
    adapter = tmp_path / "adapter"
    assert error.value.filename == str(adapter)
    assert f"while writing the adapter {adapter} (" in str(error.value)
    assert "the checkpoints are kept" in str(error.value)
    assert not adapter.exists() and not list(tmp_path.glob(".adapter.*"))
    assert latest_complete_checkpoint(tmp_path / "checkpoints").name == "checkpoint-6"

    monkeypatch.undo()  # space freed
    run(tiny_setup, tmp_path, **SETTINGS)
    assert_ends_like(tmp_path, reference, resumed=6)


# --- the run's own log ----------------------------------------------------------------------


def test_a_full_disk_under_the_training_log_does_not_replace_the_runs_error(tmp_path, monkeypatch):
    full = False
    real_open = logging.FileHandler._open

    class Buffered:
        """The log file's buffer takes the lines; flushing them finds no room."""

        def __init__(self, handle):
            self.handle = handle

        def flush(self):
            if full:
                raise no_space()
            self.handle.flush()

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: Buffered(real_open(self)))
    log = tmp_path / "training.log"
    with pytest.raises(DiskFullError), _also_logged_to(log):
        logging.getLogger("robovqa_ft").info("training")
        full = True
        logging.getLogger("robovqa_ft").info("a line that finds no room")
        raise disk_full(tmp_path / "checkpoints" / "checkpoint-2", "a checkpoint")
    assert "training" in log.read_text()
