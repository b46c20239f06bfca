"""Stand-ins for the SLURM commands that snakemake-executor-plugin-slurm calls, for tests.

Each command (`sbatch`, `srun`, `sacct`, ...) is a small script beside this file that calls
`main()`, which dispatches on the name it was called by. Every call is appended to
`$STANDIN_SLURM_DIR/calls.jsonl` (its argv, and the job it ran in), so that a test can
assert what the plugin submitted. `sbatch` runs the job at once, on this machine, in the
background, with the environment a SLURM job would have; `sacct`/`squeue` report its state
from its exit status; `srun` runs its one task in place, with the step's environment.
Standard library only: they run under whichever `python3` is first on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

CLUSTER = "standin"
PARTITIONS = ("test", "gpu")  # the first is the default one, starred by sinfo
FINISHED = {"COMPLETED", "FAILED", "CANCELLED"}


def state_dir() -> Path:
    # Not SLURM_*: the jobstep plugin strips those from the job step's environment.
    folder = os.environ.get("STANDIN_SLURM_DIR")
    if not folder:
        sys.exit("slurm stand-in: set STANDIN_SLURM_DIR to a folder for its records")
    (Path(folder) / "jobs").mkdir(parents=True, exist_ok=True)
    return Path(folder)


@contextlib.contextmanager
def locked(path: Path):
    """Exclusive use of `path` across processes: the plugin submits from two threads."""
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield handle


def record_call(command: str, argv: list[str]) -> None:
    entry = {"command": command, "argv": argv, "job_id": os.environ.get("SLURM_JOB_ID")}
    with locked(state_dir() / "calls.jsonl") as handle:
        handle.write(json.dumps(entry) + "\n")


def job_file(job_id: str) -> Path:
    return state_dir() / "jobs" / f"{job_id}.json"


def read_job(job_id: str) -> dict:
    return json.loads(job_file(job_id).read_text())


def write_job(job: dict) -> None:
    temporary = job_file(job["id"]).with_suffix(".tmp")
    temporary.write_text(json.dumps(job))
    temporary.replace(job_file(job["id"]))  # sacct never reads half a record


def update_job(job_id: str, **changes) -> dict:
    """Apply `changes` (values, or functions of the old value) to the job's record."""
    with locked(state_dir() / "jobs.lock"):
        job = read_job(job_id)
        job.update({k: v(job[k]) if callable(v) else v for k, v in changes.items()})
        write_job(job)
    return job


def all_jobs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((state_dir() / "jobs").glob("*.json"))]


def new_job_id() -> str:
    with locked(state_dir() / "next_job_id") as handle:
        handle.seek(0)
        job_id = int(handle.read().strip() or 1000) + 1
        handle.seek(0)
        handle.truncate()
        handle.write(str(job_id))
    return str(job_id)


class Parser(argparse.ArgumentParser):
    """Fails the way SLURM's commands do: a message on stderr and exit status 1, so that
    an option the stand-in does not know is an error rather than silently ignored."""

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message}\n")


# --- sbatch ---------------------------------------------------------------------------


def sbatch_parser() -> Parser:
    parser = Parser(prog="sbatch", allow_abbrev=False)
    flag = {"action": "store_true"}
    parser.add_argument("--parsable", **flag)
    parser.add_argument("--requeue", **flag)
    parser.add_argument("--no-requeue", **flag)
    parser.add_argument("-J", "--job-name")
    parser.add_argument("-o", "--output")
    parser.add_argument("--export")
    parser.add_argument("--comment")
    parser.add_argument("-A", "--account")
    parser.add_argument("-p", "--partition")
    parser.add_argument("-M", "--clusters")
    parser.add_argument("-t", "--time")
    parser.add_argument("-C", "--constraint")
    parser.add_argument("-q", "--qos")
    parser.add_argument("--reservation")
    parser.add_argument("-x", "--exclude")
    parser.add_argument("--mem", type=int)
    parser.add_argument("--mem-per-cpu", type=int)
    parser.add_argument("--mem-per-gpu")
    parser.add_argument("-N", "--nodes", type=int)
    parser.add_argument("-n", "--ntasks", type=int)
    parser.add_argument("--ntasks-per-node", type=int)
    parser.add_argument("--ntasks-per-gpu", type=int)
    parser.add_argument("-c", "--cpus-per-task", type=int)
    parser.add_argument("--cpus-per-gpu", type=int)
    parser.add_argument("-G", "--gpus")
    parser.add_argument("--gres")
    parser.add_argument("--signal")
    parser.add_argument("-D", "--chdir")
    parser.add_argument("--wrap")
    parser.add_argument("script", nargs="?")
    return parser


def gpu_count(gpus: str | None) -> int:
    """`--gpus=N` or `--gpus=MODEL:N`."""
    return int(gpus.rsplit(":", 1)[-1]) if gpus else 0


def batch_environment(job_id: str, args: argparse.Namespace) -> dict[str, str]:
    """What SLURM adds to the (exported) environment of a batch job."""
    cpus = args.cpus_per_task or 1
    if args.cpus_per_gpu and args.gpus:
        cpus = args.cpus_per_gpu * gpu_count(args.gpus)
    env = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOBID": job_id,
        "SLURM_JOB_NAME": args.job_name or "sbatch",
        "SLURM_JOB_ACCOUNT": args.account or "",
        "SLURM_JOB_PARTITION": args.partition or PARTITIONS[0],
        "SLURM_CLUSTER_NAME": CLUSTER,
        "SLURM_SUBMIT_DIR": os.getcwd(),
        "SLURM_SUBMIT_HOST": socket.gethostname(),
        "SLURM_JOB_NODELIST": socket.gethostname(),
        "SLURM_NODELIST": socket.gethostname(),
        "SLURMD_NODENAME": socket.gethostname(),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_CPUS_ON_NODE": str(cpus),
        "SLURM_JOB_CPUS_PER_NODE": str(cpus),
        "SLURM_NTASKS": str(args.ntasks or 1),
        "SLURM_NPROCS": str(args.ntasks or 1),
    }
    if args.cpus_per_task:
        env["SLURM_CPUS_PER_TASK"] = str(args.cpus_per_task)
    if args.cpus_per_gpu:
        env["SLURM_CPUS_PER_GPU"] = str(args.cpus_per_gpu)
    if args.mem:
        env["SLURM_MEM_PER_NODE"] = str(args.mem)
    if args.mem_per_cpu:
        env["SLURM_MEM_PER_CPU"] = str(args.mem_per_cpu)
    if args.gpus:
        # Set only when --gpus was given; the jobstep plugin reads it to tell a GPU job.
        env["SLURM_GPUS"] = args.gpus
        env.update(gpu_environment(gpu_count(args.gpus)))
    return env


def gpu_environment(count: int) -> dict[str, str]:
    """A node that confines a job to its GPUs numbers them from 0 for the job."""
    devices = ",".join(str(i) for i in range(count))
    return {"SLURM_GPUS_ON_NODE": str(count), "SLURM_JOB_GPUS": devices,
            "CUDA_VISIBLE_DEVICES": devices}  # fmt: skip


def sbatch(argv: list[str]) -> int:
    args = sbatch_parser().parse_args(argv)
    if args.script and args.wrap:
        return fail("sbatch", "script arguments not permitted with --wrap option")
    if args.wrap is not None:
        script = f"#!/bin/sh\n# This script was created by sbatch --wrap.\n\n{args.wrap}\n"
    elif args.script:
        script = Path(args.script).read_text()  # /dev/stdin with --pass-command-as-script
    else:
        script = sys.stdin.read()
    if not script.startswith("#!"):
        return fail("sbatch", "This does not look like a batch script.")
    if args.account and args.account not in known_accounts():
        return fail("sbatch", "Batch job submission failed: Invalid account or partition")
    if args.partition and args.partition not in PARTITIONS:
        return fail("sbatch", "Batch job submission failed: Invalid partition name specified")
    if args.export not in (None, "ALL"):
        return fail("sbatch", "the stand-in only exports the whole environment")

    job_id = new_job_id()
    workdir = Path(args.chdir or os.getcwd())
    output = (args.output or "slurm-%j.out").replace("%j", job_id)
    job = {
        "id": job_id,
        "name": args.job_name or "sbatch",
        "comment": args.comment,
        "argv": argv,
        "state": "PENDING",
        "exit_code": None,
        "output": str(workdir / output),
        "workdir": str(workdir),
        "script": script,
        "steps": 0,
    }
    write_job(job)
    # The job runs in a session of its own, as under slurmstepd, and outlives this call.
    subprocess.Popen(
        [sys.executable, __file__, "run-batch-job", job_id],
        env={**os.environ, **batch_environment(job_id, args)},
        cwd=workdir,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(job_id if args.parsable else f"Submitted batch job {job_id}")
    return 0


def run_batch_job(job_id: str) -> int:
    """The batch step: the script under /bin/sh, its output to --output, then its state."""
    job = update_job(job_id, state="RUNNING", pid=os.getpid())
    script = state_dir() / "jobs" / f"{job_id}.sh"
    script.write_text(job["script"])
    Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
    with open(job["output"], "w", encoding="utf-8") as output:
        code = subprocess.call(["/bin/sh", str(script)], stdout=output, stderr=output)
    if read_job(job_id)["state"] != "CANCELLED":
        update_job(job_id, state="COMPLETED" if code == 0 else "FAILED", exit_code=code)
    return 0


# --- srun -----------------------------------------------------------------------------


def srun_parser() -> Parser:
    parser = Parser(prog="srun", allow_abbrev=False)
    parser.add_argument("-n", "--ntasks", type=int, default=1)
    parser.add_argument("-N", "--nodes", type=int, default=1)
    parser.add_argument("-c", "--cpus-per-task", type=int)
    parser.add_argument("--cpus-per-gpu", type=int)
    parser.add_argument("-G", "--gpus")
    parser.add_argument("--cpu-bind")
    parser.add_argument("--mem-per-cpu", type=int)
    parser.add_argument("-J", "--job-name")
    parser.add_argument("--jobid")
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    return parser


def srun(argv: list[str]) -> int:
    args = srun_parser().parse_args(argv)
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return fail("srun", "the stand-in runs job steps only inside a job (SLURM_JOB_ID)")
    if args.ntasks != 1 or args.nodes != 1:
        return fail("srun", "the stand-in runs one task on one node")
    if not args.command:
        return fail("srun", "no command given")
    step = update_job(job_id, steps=lambda count: count + 1)["steps"] - 1
    env = {
        **os.environ,
        "SLURM_STEP_ID": str(step),
        "SLURM_STEPID": str(step),
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    if args.cpus_per_task:
        env["SLURM_CPUS_PER_TASK"] = str(args.cpus_per_task)
    if args.gpus:
        env.update(gpu_environment(gpu_count(args.gpus)))
        env["SLURM_STEP_GPUS"] = env["SLURM_JOB_GPUS"]
    else:
        # A step given no GPUs sees none, even in a job that has some.
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS"):
            env.pop(name, None)
    os.execvpe(args.command[0], args.command, env)


# --- queries and control --------------------------------------------------------------


def sacct(argv: list[str]) -> int:
    parser = Parser(prog="sacct", allow_abbrev=False)
    for flag in ("-X", "--parsable2", "-n", "--noheader"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("-o", "--format", default="JobIdRaw,State")
    parser.add_argument("-j", "--jobs")
    parser.add_argument("--name")
    parser.add_argument("-u", "--user")
    parser.add_argument("-M", "--clusters")
    parser.add_argument("-S", "--starttime")
    parser.add_argument("-E", "--endtime")
    args, _ = parser.parse_known_args(argv)
    if args.jobs and "." in args.jobs:
        return 0  # a step's fields (the plugin asks for failure reasons): none recorded
    fields = [f.split("%")[0].lower() for f in args.format.split(",")]
    for job in matching_jobs(args.name, args.jobs):
        values = {"jobidraw": job["id"], "jobid": job["id"], "state": job["state"],
                  "nodelist": socket.gethostname(), "account": "", "reason": "None"}  # fmt: skip
        print("|".join(values.get(f, "") for f in fields))
    return 0


def squeue(argv: list[str]) -> int:
    parser = Parser(prog="squeue", allow_abbrev=False)
    parser.add_argument("-o", "--format", default="%i|%T")
    parser.add_argument("-t", "--states")
    parser.add_argument("-h", "--noheader", action="store_true")
    parser.add_argument("-n", "--name")
    parser.add_argument("-j", "--jobs")
    args = parser.parse_args(argv)
    for job in matching_jobs(args.name, args.jobs):
        print(args.format.replace("%i", job["id"]).replace("%T", job["state"]))
    return 0


def matching_jobs(name: str | None, job_ids: str | None) -> list[dict]:
    wanted = set(job_ids.split(",")) if job_ids else None
    return [
        job
        for job in all_jobs()
        if (name is None or job["name"] == name) and (wanted is None or job["id"] in wanted)
    ]


def scancel(argv: list[str]) -> int:
    """`scancel JOBID...`: SIGTERM to all of each job's processes, and CANCELLED.
    `scancel --signal=SIG [--batch] JOBID...`: that signal only, as SLURM sends it: to every
    process of the job's steps (as under proctrack/cgroup, however deep, in whatever
    session), or with --batch to the batch shell alone."""
    parser = Parser(prog="scancel", allow_abbrev=False)
    parser.add_argument("-s", "--signal")
    parser.add_argument("-b", "--batch", action="store_true")
    parser.add_argument("-M", "--clusters")
    parser.add_argument("job_ids", nargs="+")
    args = parser.parse_args(argv)
    signum = signal.Signals[f"SIG{args.signal.removeprefix('SIG')}"] if args.signal else None
    for job_id in args.job_ids:
        job = read_job(job_id)
        if job["state"] in FINISHED:
            continue
        processes = job_processes(job_id)
        if signum is None:
            update_job(job_id, state="CANCELLED")
            targets = list(processes)
        elif args.batch:
            targets = [pid for pid, (parent, _) in processes.items() if parent == job["pid"]]
        else:
            targets = [pid for pid, (_, in_step) in processes.items() if in_step]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum or signal.SIGTERM)
    return 0


def job_processes(job_id: str) -> dict[int, tuple[int, bool]]:
    """pid -> (parent pid, whether in a job step) of every process of the job: those whose
    environment names it (and this stand-in's folder, which tells test runs apart)."""
    folder = os.environ["STANDIN_SLURM_DIR"]
    marks = {f"SLURM_JOB_ID={job_id}".encode(), f"STANDIN_SLURM_DIR={folder}".encode()}
    processes = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # gone, or not ours to read
        if marks <= environ:
            in_step = any(v.startswith(b"SLURM_STEP_ID=") for v in environ)
            processes[int(proc.name)] = (parent, in_step)
    return processes


def sinfo(argv: list[str]) -> int:
    print("PARTITION")
    print("\n".join(f"{p}*" if i == 0 else p for i, p in enumerate(PARTITIONS)))
    return 0


def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "config"]:
        print(f"ClusterName             = {CLUSTER}")
        print("MaxArraySize            = 1001")
        print("MinJobAge               = 300 sec")
        return 0
    return fail("scontrol", f"the stand-in does not know {' '.join(argv)!r}")


def known_accounts() -> list[str]:
    return os.environ.get("STANDIN_SLURM_ACCOUNTS", "test").split(",")


def sacctmgr(argv: list[str]) -> int:
    """`sacctmgr -n -s list user NAME format=account%256`: the accounts the plugin checks
    a given account against."""
    if "list" in argv and "user" in argv:
        print("\n".join(known_accounts()))
        return 0
    return fail("sacctmgr", f"the stand-in does not know {' '.join(argv)!r}")


def fail(command: str, message: str) -> int:
    print(f"{command}: error: {message}", file=sys.stderr)
    return 1


COMMANDS = {f.__name__: f for f in (sbatch, srun, sacct, squeue, scancel, sinfo, scontrol,
                                    sacctmgr)}  # fmt: skip


def main() -> None:
    command = Path(sys.argv[0]).name
    if command == "standin.py" and sys.argv[1:2] == ["run-batch-job"]:
        sys.exit(run_batch_job(sys.argv[2]))
    record_call(command, sys.argv[1:])
    sys.exit(COMMANDS[command](sys.argv[1:]))


if __name__ == "__main__":
    main()
