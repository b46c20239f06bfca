"""Every GPU job chooses its devices before anything asks CUDA about them.

CUDA fixes a process's device list the first time it is asked (a count, an availability
check, an initialisation); `CUDA_VISIBLE_DEVICES` set after that changes nothing, so a job
that locked GPU 3 would still run on GPU 0. Each job runs here in a child process in which
torch's CUDA queries are recorded and the device choice (`allocated_gpus`) ends the job:
no query may come before it. No GPU is needed: the queries happen on a CPU too.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from robovqa_ft.core.devices import allocated_gpus, gpu_uuids

ROOT = Path(__file__).resolve().parents[2]

RECORDER = textwrap.dedent("""
    import json, runpy, sys
    from contextlib import contextmanager
    from pathlib import Path

    import torch

    queries, out = [], Path(sys.argv.pop(1))

    def recorded(name, real):
        def query(*args, **kwargs):
            queries.append(name)
            return real(*args, **kwargs)
        return query

    # What is_available, device_count and every device property go through.
    torch._C._cuda_getDeviceCount = recorded("device count", torch._C._cuda_getDeviceCount)
    torch.cuda._lazy_init = recorded("initialisation", torch.cuda._lazy_init)

    import robovqa_ft.core.devices

    class Chosen(Exception):
        pass

    @contextmanager
    def choose(count, *args, **kwargs):
        out.write_text(json.dumps({"gpus": count, "queries_before": queries}))
        raise Chosen  # what the job does with its devices is not under test here
        yield

    robovqa_ft.core.devices.allocated_gpus = choose

    class Anything:
        "Whatever a job script reads of its snakemake object before it chooses."
        def __init__(self, **given):
            self.__dict__.update(given)
        def __getattr__(self, name):
            return Anything()
        def __getitem__(self, key):
            return Anything()
        def get(self, key, default=None):
            return default
        def keys(self):
            return []
        def items(self):
            return []

    job = sys.argv.pop(1)
    try:
        if job.endswith(".py"):
            snakemake = Anything(
                log=[str(out) + ".log"], threads=2,
                resources=Anything(gpu=2, gpu_asked=2),
                params=Anything(stage={"grad_accum": 2}),
            )
            runpy.run_path(job, init_globals={"snakemake": snakemake}, run_name="__main__")
        else:
            runpy.run_module(job, run_name="__main__", alter_sys=True)
    except Chosen:
        sys.exit(0)
    sys.exit("the job ended without choosing its GPUs")
""")

JOBS = {
    "train": ["workflow_scripts/train.py"],
    "evaluate": ["workflow_scripts/evaluate.py"],
    "merge": ["workflow_scripts/merge.py"],
    "ask": ["robovqa_ft.tools.ask", "results/stage2", "--frames", "clip", "--question", "Q: done?"],
}


def queries_before_the_choice(job: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "chosen.json"
    env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    done = subprocess.run(
        [sys.executable, "-c", RECORDER, str(out), *job],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", JOBS)
def test_a_gpu_job_asks_cuda_nothing_before_it_chooses_its_gpus(name, tmp_path):
    chosen = queries_before_the_choice(JOBS[name], tmp_path)
    assert chosen["queries_before"] == [], (
        f"the {name} job asked CUDA ({', '.join(chosen['queries_before'])}) before choosing "
        "its GPUs: it would see every GPU, whatever it locked"
    )
    assert chosen["gpus"] == {"train": 2, "evaluate": 2, "merge": 0, "ask": 1}[name]


@pytest.mark.slow
def test_the_recorder_sees_a_query_made_before_the_choice(tmp_path):
    # The check above could pass by recording nothing: a job that imports peft first
    # (bitsandbytes counts the devices at import) must be caught.
    script = tmp_path / "early.py"
    script.write_text(
        "import peft\nfrom robovqa_ft.core.devices import allocated_gpus\n"
        "with allocated_gpus(1):\n    pass\n"
    )
    chosen = queries_before_the_choice([str(script)], tmp_path)
    assert "device count" in chosen["queries_before"]


@pytest.mark.slow
def test_choosing_after_bitsandbytes_asked_cuda_is_an_error(tmp_path):
    # What the old evaluate script did: peft imports bitsandbytes, which counts the devices
    # (torch records no initialisation for that). On a machine with CUDA, as stated here,
    # the choice must refuse rather than lock a GPU the process will not use.
    script = textwrap.dedent(f"""
        import peft, torch
        torch.cuda.is_available = lambda: True  # this machine has none
        from robovqa_ft.core.devices import allocated_gpus
        with allocated_gpus(1, devices=["0", "1"], lock_dir={str(tmp_path)!r}):
            pass
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "CUDA started in this process before it chose its GPUs" in done.stderr


def test_a_cpu_job_sees_no_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with allocated_gpus(0) as devices:
        assert devices == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_gpus_are_named_by_uuid_not_by_nvidia_smis_order():
    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5c3e1a2b-0000-1111-2222-333344445555)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff)\n"
        "  MIG 1g.10gb Device 0: (UUID: MIG-0a1b2c3d-4444-5555-6666-777788889999)\n"
    )
    assert gpu_uuids(listing) == [
        "GPU-5c3e1a2b-0000-1111-2222-333344445555",
        "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff",
    ]
