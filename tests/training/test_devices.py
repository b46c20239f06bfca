"""GPU allocation across concurrent jobs, on a stated list of devices (no GPU needed)."""

import os
import select
import signal
import subprocess
import sys

import pytest

from robovqa_ft.devices import allocated_gpus, machine_gpus

HOLD = """
import os, sys
from robovqa_ft.devices import allocated_gpus
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
