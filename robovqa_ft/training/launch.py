"""The training job's launcher: as many training processes as the job has GPUs.

One GPU trains in this process. More launch `torchrun --standalone` (DDP; gloo on a
machine without CUDA, which is how the tests run it), pass SIGTERM on to it (a
scheduler's preemption warning reaches this process), and return its exit status.
`python -m robovqa_ft.training.launch ARGS` is the entry point of each torchrun worker.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys

from robovqa_ft.core.devices import allocated_gpus
from robovqa_ft.core.settings import per_rank_accumulation

log = logging.getLogger(__name__)
# What each torchrun worker runs: this module (its name even when run as __main__).
WORKER_MODULE = __spec__.name


def check_given_gpus(given: int, asked: int) -> None:
    """Snakemake silently caps a job's resources at `--resources`: stop rather than train
    with fewer processes than asked."""
    if given < asked:
        raise SystemExit(
            f"this training asks for {asked} GPUs but Snakemake gave it {given} (capped by "
            f"--resources gpu={given}, e.g. from the profile): pass --resources gpu={asked} "
            f"or more, or ask for fewer with --set-resources train:gpu={given}"
        )


def train_job(processes: int, asked: int, threads: int, run: dict) -> None:
    """Train one run (`run`: the keyword arguments of `train.train_run`) on `processes`
    GPUs of its own (or CPU processes where there is no GPU)."""
    check_given_gpus(processes, asked)
    per_rank_accumulation(run["stage"]["grad_accum"], processes)  # before anything loads
    with allocated_gpus(processes):
        if processes == 1:
            from robovqa_ft.training.train import train_run

            train_run(**run)
            return
        code = run_torchrun(processes, threads, run)
    if code != 0:
        raise SystemExit(
            f"training processes ended with exit status {code} (their output: this job's log)"
        )


PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not dlopen


def _die_with_parent(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies, so that
    killing the launcher (even with SIGKILL) leaves no trainer behind."""
    parent = os.getppid()
    LIBC.prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signum)


def run_torchrun(processes: int, threads: int, run: dict) -> int:
    """`torchrun --standalone` with `processes` workers; its output goes where this
    process's stderr goes (the rule's log). Returns its exit status."""
    grace = run["training"]["stop_grace_seconds"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "--max-restarts=0",
        # Workers must finish their step and save before torchrun kills them.
        f"--shutdown-timeout={grace}",
        "-m", WORKER_MODULE, json.dumps(run, default=str),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
    log.info("Launching %d training processes with torchrun", processes)
    sys.stderr.flush()
    torchrun: subprocess.Popen | None = None
    stop = forwarded = False

    def forward(signum=None, frame=None):
        # Once: a second SIGTERM makes torchrun stop waiting for its workers to save, and
        # under SLURM it also gets the scheduler's own.
        nonlocal stop, forwarded
        stop = True
        if torchrun is not None and not forwarded:
            forwarded = True
            torchrun.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)  # before the start: none is lost
    try:
        torchrun = subprocess.Popen(
            command,
            env=env,
            stdout=sys.stderr,
            stderr=sys.stderr,
            preexec_fn=lambda: _die_with_parent(signal.SIGKILL),
        )
        if stop:  # it came while torchrun was starting
            forward()
        code = torchrun.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if forwarded:
        log.warning("SIGTERM was passed on to the training processes")
    return code


def _worker() -> None:
    """One torchrun worker: rank 0 logs what one process would; the others only warnings."""
    _die_with_parent(signal.SIGKILL)  # torchrun's workers run in sessions of their own
    from robovqa_ft.core.logs import PACKAGE_LOGGER, line_format
    from robovqa_ft.training.ranks import world
    from robovqa_ft.training.train import train_run

    rank = world().rank
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=line_format(rank),
    )
    logging.captureWarnings(True)
    run = json.loads(sys.argv[1])
    try:
        train_run(**run)
    except SystemExit:
        raise
    except BaseException:
        logging.getLogger(PACKAGE_LOGGER).exception("rank %d failed", rank)
        raise SystemExit(1) from None


if __name__ == "__main__":
    _worker()
