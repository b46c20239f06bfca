"""Atomic writes leave nothing half-written under a final name, and the next writer
removes what a killed one left."""

import os
import signal

from robovqa_ft.core.files import atomic_directory, atomic_open


def test_a_writer_killed_mid_write_leaves_only_a_part_that_the_next_write_removes(tmp_path):
    path = tmp_path / "metadata.json"
    child = os.fork()
    if child == 0:  # killed inside the block, as SIGKILL would: no cleanup runs
        with atomic_open(path) as handle:
            handle.write('{"half": ')
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    assert not path.exists()
    (part,) = tmp_path.glob(".metadata.json.*.part")
    neighbour = tmp_path / ".metadata.json.keep"  # not a part of this path's writes
    neighbour.write_text("x")
    other = tmp_path / ".other.json.abc.part"  # another path's writer, maybe still running
    other.write_text("x")
    with atomic_open(path) as handle:
        handle.write("{}")
    assert path.read_text() == "{}"
    assert not part.exists() and neighbour.exists() and other.exists()


def test_a_folder_writer_killed_mid_write_leaves_a_part_folder_that_the_next_removes(tmp_path):
    path = tmp_path / "adapter"
    child = os.fork()
    if child == 0:
        with atomic_directory(path) as tmp:
            (tmp / "weights").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    (part,) = tmp_path.glob(".adapter.*.part")
    with atomic_directory(path) as tmp:
        (tmp / "weights").write_bytes(b"whole")
    assert (path / "weights").read_bytes() == b"whole" and not part.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
