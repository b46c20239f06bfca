"""Which GPUs a job may use: concurrent jobs on one machine get disjoint devices.

Snakemake only counts the `gpu` resource; it never says which device a job should use
(every job would see GPU 0). A job that asks for N GPUs takes N of the machine's (or of
those a scheduler gave it) under one `flock` per device, which a dead job releases with
its file descriptors, and sees only them through `CUDA_VISIBLE_DEVICES`.
Free of torch: CUDA must not start before `CUDA_VISIBLE_DEVICES` is set.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 60


def machine_gpus() -> list[str]:
    """The devices this job may choose from: those of `CUDA_VISIBLE_DEVICES` (a
    scheduler's or the user's choice), else every GPU `nvidia-smi` lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    # "GPU 3: <name> (UUID: ...)"; indented MIG lines below a GPU are not devices of their own
    return re.findall(r"^GPU (\d+):", listed.stdout, flags=re.MULTILINE)


def default_lock_dir() -> Path:
    """Per machine (node-local /tmp). Under SLURM, per job: its devices are its own, and
    two jobs on one node may both see theirs as device 0."""
    if "ROBOVQA_GPU_LOCK_DIR" in os.environ:
        return Path(os.environ["ROBOVQA_GPU_LOCK_DIR"])
    job = os.environ.get("SLURM_JOB_ID")
    return Path("/tmp/robovqa_ft-gpu-locks") / (f"slurm-{job}" if job else "local")


def _try_lock(path: Path):
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until released)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None


@contextmanager
def allocated_gpus(
    count: int,
    devices: list[str] | None = None,
    lock_dir: Path | str | None = None,
    poll_seconds: float = 2.0,
) -> Iterator[list[str]]:
    """Hold `count` of `devices` (default: `machine_gpus()`) and set `CUDA_VISIBLE_DEVICES`
    to them for this process and its children; waits while other jobs hold too many.

    On a machine without GPUs this holds nothing and yields [] (training on the CPU).
    """
    devices = machine_gpus() if devices is None else devices
    if not devices:
        yield []
        return
    if count > len(devices):
        raise RuntimeError(
            f"this job asks for {count} GPUs but only {len(devices)} are visible "
            f"({','.join(devices)}): lower the job's gpu resource"
        )
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    waited_since, last_report = time.monotonic(), 0.0
    with ExitStack() as held:
        # All or nothing: two jobs each holding part of what they need would wait forever.
        while True:
            attempt, chosen, holders = ExitStack(), [], {}
            for device in devices:
                handle, holder = _try_lock(lock_dir / f"gpu-{device}.lock")
                if handle is None:
                    holders[device] = holder
                    continue
                attempt.callback(handle.close)
                chosen.append(device)
                if len(chosen) == count:
                    break
            if len(chosen) == count:
                held.enter_context(attempt)
                break
            attempt.close()
            if time.monotonic() - last_report >= WAIT_LOG_SECONDS:
                busy = "; ".join(f"GPU {d}: {h}" for d, h in holders.items())
                log.warning(
                    "waiting for %d free GPUs (%.0f s so far); in use: %s",
                    count, time.monotonic() - waited_since, busy,
                )  # fmt: skip
                last_report = time.monotonic()
            time.sleep(poll_seconds)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        log.info("GPUs for this job: %s (of %s)", ",".join(chosen), ",".join(devices))
        try:
            yield chosen
        finally:
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous
