"""Which GPUs a job may use: concurrent jobs on one machine get disjoint devices.

Snakemake only counts the `gpu` resource; it never says which device a job should use
(every job would see GPU 0). A job that asks for N GPUs takes N of the machine's (or of
those a scheduler gave it) under one `flock` per device, which a dead job releases with
its file descriptors, and sees only them through `CUDA_VISIBLE_DEVICES`.
Free of torch: CUDA must not start before `CUDA_VISIBLE_DEVICES` is set. Whatever queries
CUDA first (bitsandbytes does at import, so peft does) fixes the process's device list, so
a GPU job chooses its devices before it imports anything that may (workflow_scripts/,
`ask`, the benchmarks), and `allocated_gpus` refuses to choose once CUDA has started.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 60


def machine_gpus() -> list[str]:
    """The devices this job may choose from: those of `CUDA_VISIBLE_DEVICES` (a
    scheduler's or the user's choice), else every GPU `nvidia-smi` lists, by UUID, else none.

    UUIDs, not nvidia-smi's numbers: nvidia-smi numbers GPUs in PCI bus order, CUDA by
    default fastest first, so "GPU 1" of one can be device 1 of the other or not; CUDA
    takes `CUDA_VISIBLE_DEVICES=GPU-<uuid>` and means the same card.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return gpu_uuids(listed.stdout)


def gpu_uuids(listing: str) -> list[str]:
    """The GPUs of `nvidia-smi -L`'s "GPU 3: <name> (UUID: GPU-…)" lines; the indented MIG
    lines below a GPU are not devices of their own."""
    return re.findall(r"^GPU \d+:.*\(UUID: (GPU-[0-9a-fA-F-]+)\)", listing, flags=re.MULTILINE)


def cuda_started() -> bool:
    """Whether this process has already asked CUDA for its devices: from then on it sees
    the devices that were visible then. torch records an initialisation, not a count or
    an availability check (which start the driver too); bitsandbytes makes those at
    import (and peft imports it), so its presence on a machine with CUDA counts."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return torch.cuda.is_initialized() or (
        "bitsandbytes" in sys.modules and torch.cuda.is_available()
    )


def default_lock_dir() -> Path:
    """Per machine (node-local /tmp). Under SLURM, per job: its devices are its own, and
    two jobs on one node may both see theirs as device 0."""
    if "ROBOVQA_GPU_LOCK_DIR" in os.environ:
        return Path(os.environ["ROBOVQA_GPU_LOCK_DIR"])
    job = os.environ.get("SLURM_JOB_ID")
    return Path("/tmp/robovqa_ft-gpu-locks") / (f"slurm-{job}" if job else "local")


SHARED_DIR_MODE = 0o1777  # like /tmp: every user of the node makes locks, none removes another's
SHARED_FILE_MODE = 0o666


def _shared_lock_dir(lock_dir: Path) -> None:
    """Make `lock_dir` and the folders above it that this makes usable by every user of the
    machine: two users' jobs on one node must see each other's locks."""
    made = [p for p in (lock_dir, *lock_dir.parents) if not p.exists()]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for folder in made:
        with contextlib.suppress(OSError):  # another user's job made it meanwhile
            folder.chmod(SHARED_DIR_MODE)  # the umask narrowed it
    if not os.access(lock_dir, os.W_OK | os.X_OK):
        owner = lock_dir.stat().st_uid
        raise PermissionError(
            f"the GPU lock folder {lock_dir} (of user id {owner}, mode "
            f"{stat.filemode(lock_dir.stat().st_mode)}) is not writable by this user: ask its "
            f"owner to run `chmod 1777 {lock_dir}`, or set ROBOVQA_GPU_LOCK_DIR to a folder "
            "shared by every user of these GPUs"
        )


def _open_lock(path: Path):
    """The lock file, opened for reading and writing: an existing one without O_CREAT
    (Linux's protected_regular refuses O_CREAT on another user's file in a sticky folder),
    else made readable and writable by every user."""
    # Never through a symbolic link: in a folder every user writes to, one could point
    # the holder's line at another user's file.
    for _ in range(2):
        try:
            return os.fdopen(os.open(path, os.O_RDWR | os.O_NOFOLLOW), "r+", encoding="utf-8")
        except FileNotFoundError:
            pass
        except PermissionError:  # another user's lock file from before it was shared
            read_only = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            return os.fdopen(read_only, encoding="utf-8")  # flock needs no write
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SHARED_FILE_MODE)
        except FileExistsError:
            continue  # another job made it between the two opens
        os.fchmod(fd, SHARED_FILE_MODE)  # the umask narrowed it
        return os.fdopen(fd, "r+", encoding="utf-8")
    raise OSError(errno.EAGAIN, "the lock file kept changing", str(path))


def _try_lock(path: Path, inheritable: bool):
    handle = _open_lock(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        return None, holder
    os.set_inheritable(handle.fileno(), inheritable)
    if handle.writable():  # who holds it, for a job that waits
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
    inheritable: bool = False,
) -> Iterator[list[str]]:
    """Hold `count` of `devices` (default: `machine_gpus()`) and set `CUDA_VISIBLE_DEVICES`
    to them for this process and its children; waits while other jobs hold too many.

    A count of 0 is a CPU job: it sees no GPU (a training may hold them all). With
    `inheritable`, the locks stay held across an exec (`main`). On a machine
    without GPUs this holds nothing and yields [] (training on the CPU). Once CUDA has
    started in this process the choice could not take effect: that is an error.
    """
    if cuda_started():
        raise RuntimeError(
            "CUDA started in this process before it chose its GPUs, so it would use GPU 0 "
            "whatever it locks: a GPU job must call allocated_gpus before importing anything "
            "that queries CUDA (peft and bitsandbytes do at import)"
        )
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [] if count == 0 else machine_gpus() if devices is None else devices
    if not devices:
        if count == 0:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            yield []
        finally:
            _restore(previous)
        return
    if count > len(devices):
        raise RuntimeError(
            f"this job asks for {count} GPUs but only {len(devices)} are visible "
            f"({','.join(devices)}): lower the job's gpu resource"
        )
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    _shared_lock_dir(lock_dir)
    waited_since, last_report = time.monotonic(), 0.0
    with ExitStack() as held:
        # All or nothing: two jobs each holding part of what they need would wait forever.
        while True:
            attempt, chosen, holders = ExitStack(), [], {}
            for device in devices:
                lock = lock_dir / f"gpu-{device.replace('/', '_')}.lock"
                handle, holder = _try_lock(lock, inheritable)
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
            _restore(previous)


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = previous


def main(argv: list[str] | None = None) -> None:
    """`robovqa-gpus N COMMAND...` (or `python -m robovqa_ft.core.devices`): COMMAND on N
    GPUs no job holds, as a Snakemake job would get them; the process becomes COMMAND,
    which holds the locks until it ends. For what runs outside the workflow on a shared
    machine (the GPU benchmarks)."""
    parser = argparse.ArgumentParser(prog="robovqa-gpus", description=main.__doc__)
    parser.add_argument("gpus", type=int, help="how many GPUs (0: none, a CPU command)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The locks stay open across the exec; a GPU job the command starts takes its devices
    # among these, under locks of its own (locking these again would wait on this one).
    within = default_lock_dir() / f"within-{os.getpid()}"
    with allocated_gpus(args.gpus, inheritable=True):
        os.environ["ROBOVQA_GPU_LOCK_DIR"] = str(within)
        os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    main()
