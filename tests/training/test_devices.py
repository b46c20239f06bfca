"""GPU allocation across concurrent jobs, on a stated list of devices (no GPU needed)."""

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from robovqa_ft.core.devices import allocated_gpus, machine_gpus

HOLD = """
import os, sys
from robovqa_ft.core.devices import allocated_gpus
with allocated_gpus(int(sys.argv[1]), devices=sys.argv[2].split(","), lock_dir=sys.argv[3],
                    poll_seconds=0.05):
    print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    sys.stdin.readline()  # hold them until told
"""
DEVICES = "0,1,2,3"


def holder(count: int, lock_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(count), DEVICES, str(lock_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def devices_of(process: subprocess.Popen, timeout: float = 30) -> set[str] | None:
    """The devices `process` was given, or None if it is still waiting after `timeout`."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return set(process.stdout.readline().strip().split(",")) if ready else None


def release(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.wait(timeout=30) == 0


def test_concurrent_jobs_get_disjoint_devices_and_a_third_waits_for_a_release(tmp_path):
    first, second = holder(2, tmp_path), holder(2, tmp_path)
    a, b = devices_of(first), devices_of(second)
    assert len(a) == len(b) == 2 and not a & b and a | b == set(DEVICES.split(","))
    third = holder(2, tmp_path)
    try:
        assert devices_of(third, timeout=1.5) is None  # all four are held
        release(first)
        assert devices_of(third) == a
    finally:
        for process in (second, third):
            process.kill()
            process.wait()


def test_a_killed_job_releases_its_devices(tmp_path):
    greedy = holder(4, tmp_path)
    assert devices_of(greedy) == set(DEVICES.split(","))
    greedy.send_signal(signal.SIGKILL)
    greedy.wait()
    after = holder(3, tmp_path)
    assert len(devices_of(after)) == 3
    release(after)


def test_a_job_never_holds_part_of_its_devices_while_waiting(tmp_path):
    # Two jobs of 3 on 4 devices: if the waiting one held the device it could get,
    # a third job of 1 could not start.
    big = holder(3, tmp_path)
    assert len(devices_of(big)) == 3
    waiting = holder(3, tmp_path)
    try:
        assert devices_of(waiting, timeout=1.0) is None
        small = holder(1, tmp_path)
        assert len(devices_of(small, timeout=10)) == 1
        release(small)
    finally:
        for process in (big, waiting):
            process.kill()
            process.wait()


def test_more_devices_than_visible_fail_at_once(tmp_path):
    too_many = allocated_gpus(3, devices=["0", "1"], lock_dir=tmp_path)
    with pytest.raises(RuntimeError, match="asks for 3 GPUs but only 2 are visible"):
        too_many.__enter__()


def test_without_gpus_nothing_is_held_or_set(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with allocated_gpus(2, devices=[], lock_dir=tmp_path) as devices:
        assert devices == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not list(tmp_path.iterdir())


def test_the_devices_a_scheduler_gave_are_the_only_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert machine_gpus() == ["4", "6"]
    with allocated_gpus(1, lock_dir=tmp_path) as devices:
        assert devices == ["4"] and os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"  # restored for the next job


def test_a_command_run_through_the_devices_launcher_gets_a_free_gpu_and_holds_it(tmp_path):
    # a benchmark on a shared node: GPUs 0 and 1 are a training's, the command gets 2
    training = holder(2, tmp_path)
    assert devices_of(training) == {"0", "1"}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": DEVICES, "ROBOVQA_GPU_LOCK_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "robovqa_ft.core.devices", "1", "--", sys.executable, "-c",
               "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); "
               "sys.stdin.readline()"]  # fmt: skip
    launched = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
    try:
        assert devices_of(launched) == {"2"}
        # the command itself holds GPU 2 (the launcher became it): one more job gets only 3
        late = holder(2, tmp_path)
        assert devices_of(late, timeout=1.0) is None
        late.kill()
        late.wait()
        release(launched)
    finally:
        for process in (training, launched):
            process.kill()
            process.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_a_second_user_of_the_node_shares_the_lock_folder():
    # root's job makes the folder and locks GPU 0; another user's job must see that lock
    # and take GPU 1 (before, the folder was root's 0755 and the other user could not lock)
    top = Path(tempfile.mkdtemp())  # pytest's tmp_path is in a folder only root can enter
    top.chmod(0o755)
    shared = top / "locks" / "local"
    first = holder(1, shared)
    assert devices_of(first) == {"0"}
    # the user changes once Python and the package are loaded (nobody cannot read /root)
    as_nobody = HOLD.replace(
        "with allocated_gpus", "os.setgid(65534); os.setuid(65534)\nwith allocated_gpus", 1
    )
    second = subprocess.Popen(
        [sys.executable, "-c", as_nobody, "1", DEVICES, str(shared)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        got = devices_of(second)
        assert got == {"1"}, second.stderr.read() if got is None else got
        release(second)
    finally:
        for process in (first, second):
            process.kill()
            process.wait()
        shutil.rmtree(top)


def test_a_gpu_job_started_by_the_launcher_takes_the_launchers_gpu_without_waiting(tmp_path):
    # e.g. `robovqa-gpus 1 robovqa-ask ...`: locking the held
    # GPU again would wait on the launcher's own lock for ever
    nested = ("import os; from robovqa_ft.core.devices import allocated_gpus\n"
              "with allocated_gpus(1, poll_seconds=0.05):\n"
              "    print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)")  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": DEVICES, "ROBOVQA_GPU_LOCK_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "robovqa_ft.core.devices", "1", sys.executable, "-c", nested],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
