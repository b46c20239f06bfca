"""A full disk on the data side (issue 13, point 4): the download is refused before its
first byte when it and its frames do not fit, and a full disk at a write of the
download, the frames, the curriculum JSONL or the job's log fails naming the path,
publishes nothing partial, and a rerun once space is freed completes.

A full disk is a write that raises OSError(ENOSPC) after writing what fitted, injected
at the write call itself (mounting a small file system needs privileges CI may lack).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_records import good_record
from PIL import Image
from test_gcs_emulator import PATIENCE, SOURCE, Emulator

from robovqa_ft.core import space
from robovqa_ft.core.space import DiskFullError
from robovqa_ft.data.bucket import download_gcs
from robovqa_ft.data.frames import OWNER_FILE, extract_shard
from robovqa_ft.data.jsonl import build_jsonl, jsonl_paths


class Disk:
    """Room for `room` more bytes (or characters) among the files opened through `file`:
    a write past it writes what fits, then fails as on a full disk."""

    def __init__(self, room: int):
        self.room = room
        self.full_at: Path | None = None  # the file whose write found no room

    def file(self, handle, path: Path | None = None):
        return _Filling(handle, self, path)


class _Filling:
    def __init__(self, handle, disk: Disk, path: Path | None):
        self._handle, self._disk, self._path = handle, disk, path

    def write(self, data):
        fits = data[: max(self._disk.room, 0)]
        self._disk.room -= len(fits)
        self._handle.write(fits)
        if len(fits) < len(data):
            self._handle.flush()
            self._disk.full_at = self._path
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


def free_bytes(monkeypatch, free: int) -> None:
    """Make every file system report `free` bytes free."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- the download ---------------------------------------------------------------------------


@pytest.fixture
def gcs():
    emulator = Emulator("gdm-robovqa")
    yield emulator
    emulator.stop()


def download(gcs: Emulator, dest: Path):
    return download_gcs(SOURCE, dest, workers=2, endpoint=gcs.endpoint, patience=PATIENCE)


def test_a_download_that_would_not_fit_with_its_frames_is_refused_before_its_first_byte(
    tmp_path, gcs, monkeypatch
):
    shards = gcs.put_shards(train=3, val=1)  # 4 × 200 kB
    dest = tmp_path / "bucket"
    free_bytes(monkeypatch, 1_500_000)  # the shards fit, not with their frames
    with pytest.raises(DiskFullError) as error:
        download(gcs, dest)
    message = str(error.value)
    mount = space.free_space(dest)[0]
    assert message.startswith(f"not enough free space on {mount} for the download of 800.0 kB")
    assert "it needs about 1.6 MB, 1.5 MB are free; free 100.0 kB" in message
    assert "rerun the same command" in message
    assert not [r for r in gcs.relay.requests if r.is_media] and not dest.exists()

    # What is here already counts: a complete shard and half of another's .part.
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "train-00000-of-00003").write_bytes(shards["train"]["train-00000-of-00003"])
    part = dest / "train" / "train-00001-of-00003.part"
    part.write_bytes(shards["train"]["train-00001-of-00003"][:100_000])
    free_bytes(monkeypatch, 1_000_000)  # 2 × 500 kB still to come: it fits
    download(gcs, dest)
    assert len(gcs.relay.media("train-00000")) == 0
    assert [r.range for r in gcs.relay.media("train-00001")] == ["bytes=100000-"]
    for split, contents in shards.items():
        for shard, data in contents.items():
            assert (dest / split / shard).read_bytes() == data


def test_a_full_disk_while_downloading_fails_at_once_naming_the_part(tmp_path, gcs, monkeypatch):
    shards = gcs.put_shards(train=1, val=0)
    disk = Disk(room=120_000)
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return disk.file(handle) if self.name.endswith(".part") else handle

    monkeypatch.setattr(Path, "open", open_)
    dest = tmp_path / "bucket"
    with pytest.raises(DiskFullError) as error:
        download(gcs, dest)
    part = dest / "train" / "train-00000-of-00001.part"
    assert error.value.filename == str(part)
    assert f"while writing a shard {part}" in str(error.value)
    assert "this one resumes from what its .part holds" in str(error.value)
    assert len(gcs.relay.media("train-00000")) == 1, "a full disk is not retried"
    assert part.stat().st_size == 120_000

    monkeypatch.undo()  # space freed
    download(gcs, dest)
    assert [r.range for r in gcs.relay.media("train-00000")][-1] == "bytes=120000-"
    assert (dest / "train" / "train-00000-of-00001").read_bytes() == shards["train"][
        "train-00000-of-00001"
    ]


# --- the frames -----------------------------------------------------------------------------


def extract(shard: Path, root: Path):
    return extract_shard(shard, shard.name, root / "images", root / "staging",
                         root / "index.jsonl", (32, 32), 16, 90)  # fmt: skip


def assert_extracted(root: Path, clips: int) -> None:
    folders = sorted((root / "images").iterdir())
    assert len(folders) == clips
    for folder in folders:
        frames = sorted(folder.glob("*.jpg"))
        assert len(frames) == 16
        for frame in frames:
            with Image.open(frame) as image:
                image.load()  # raises on a truncated JPEG
    assert len((root / "index.jsonl").read_text().splitlines()) == clips


def test_a_full_disk_mid_shard_publishes_nothing_and_names_the_staging_folder(
    make_shard, tmp_path, monkeypatch
):
    shard = make_shard([good_record(f"clip-{i}", i) for i in range(4)])
    real_write = Path.write_bytes
    written = []

    def write_bytes(self, data):
        written.append(self)
        if len(written) == 20:  # the second clip's fourth frame: half of it fits
            real_write(self, data[: len(data) // 2])
            raise no_space()
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(DiskFullError) as error:
        extract(shard, tmp_path)
    staging = tmp_path / "staging" / shard.name
    assert written[-1].parent.parent == staging  # the write that failed was staged
    assert f"while writing the frames of shard {shard.name} to {staging}" in str(error.value)
    assert "nothing of this shard was published" in str(error.value)
    assert not (tmp_path / "index.jsonl").exists()
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())
    assert not staging.exists()  # the staged frames are freed at once

    monkeypatch.undo()  # space freed
    extract(shard, tmp_path)
    assert_extracted(tmp_path, 4)


def test_a_full_disk_while_publishing_moves_no_clip_into_images(make_shard, tmp_path, monkeypatch):
    shard = make_shard([good_record(f"clip-{i}", i) for i in range(3)])
    real_write = Path.write_text
    owners = []

    def write_text(self, data, *args, **kwargs):
        if self.name == OWNER_FILE:
            owners.append(self)
            if len(owners) == 2:
                raise no_space()
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError, match="nothing of this shard was published"):
        extract(shard, tmp_path)
    # every clip's last write comes before the first clip moves: none is in images/
    assert not any((tmp_path / "images").iterdir())
    assert not (tmp_path / "index.jsonl").exists()

    monkeypatch.undo()
    extract(shard, tmp_path)
    assert_extracted(tmp_path, 3)


def test_a_full_disk_at_a_clip_folders_rename_is_named_not_taken_for_a_folder_in_the_way(
    make_shard, tmp_path, monkeypatch
):
    # ext4 can refuse a rename into a large folder that needs a new block: ENOSPC, which
    # must not be read as "another shard's folder is there" (removed, tried three times)
    shard = make_shard([good_record(f"clip-{i}", i) for i in range(3)])
    real_rename = Path.rename

    def rename(self, target):
        if Path(target).parent.name == "images":
            raise no_space()
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(DiskFullError, match="nothing of this shard was published"):
        extract(shard, tmp_path)
    assert not any((tmp_path / "images").iterdir())
    monkeypatch.undo()
    extract(shard, tmp_path)
    assert_extracted(tmp_path, 3)


# --- the curriculum JSONL -------------------------------------------------------------------


@pytest.fixture
def indexes(make_shard, tmp_path) -> list[Path]:
    """Two shards' indexes, extracted from records in the real format."""
    paths = []
    for split, first in (("train", 0), ("val", 10)):
        shard = make_shard([good_record(f"clip-{i}", i) for i in range(first, first + 3)],
                           name=f"{split}-00000-of-00001", split=split)  # fmt: skip
        index = tmp_path / "clips" / split / f"{shard.name}.jsonl"
        extract_shard(shard, shard.name, tmp_path / "images", tmp_path / "staging", index,
                      (16, 16), 16, 90)  # fmt: skip
        paths.append(index)
    return paths


def build(indexes: list[Path], out: Path) -> dict[str, Path]:
    outputs = {key: Path(path) for key, path in jsonl_paths(str(out)).items()}
    build_jsonl(indexes, outputs, out / "metadata.json", split="official", val_ratio=0.1,
                split_seed=0, subset_ratio=1.0, frames_per_clip=16, frame_size=[16, 16],
                jpeg_quality=90, source="test", frame_rate=2.0)  # fmt: skip
    return outputs


@pytest.mark.parametrize(
    "where", ["write", *(f"close {key}" for key in ("stage1_train", "stage1_val", "stage2_train",
                                                  "stage2_val"))],
)  # fmt: skip
def test_a_full_disk_while_writing_the_curriculum_leaves_no_file_under_a_final_name(
    indexes, tmp_path, monkeypatch, where
):
    reference = build(indexes, tmp_path / "reference")
    out = tmp_path / "out"
    outputs = {key: Path(path) for key, path in jsonl_paths(str(out)).items()}
    real_fdopen = os.fdopen

    def final_name(fd: int) -> Path:
        """The file that atomic_open's temporary `.NAME.RANDOM.part` becomes."""
        temporary = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return temporary.parent / temporary.name[1:].removesuffix(".part").rsplit(".", 1)[0]

    if where == "write":  # a line that does not fit, some way into the files
        disk = Disk(room=3000)

        def fdopen(fd, *args, **kwargs):
            return disk.file(real_fdopen(fd, *args, **kwargs), final_name(fd))
    else:  # the last buffered bytes of one file, flushed as it closes (any of the four)
        last = outputs[where.split()[1]]

        class FullAtFlush(_Filling):
            def flush(self):
                raise no_space()

        def fdopen(fd, *args, **kwargs):
            handle = real_fdopen(fd, *args, **kwargs)
            if final_name(fd) == last.resolve():
                return FullAtFlush(handle, Disk(room=10**9), last)
            return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(DiskFullError) as error:
        build(indexes, out)
    named = Path(error.value.filename)
    if where == "write":
        assert disk.room == 0 and named.resolve() == disk.full_at  # the file that was full
        assert named in outputs.values()
    else:
        assert named == last
    assert f"while writing the curriculum file {named} " in str(error.value)
    assert not [p for p in out.rglob("*") if p.is_file()], "nothing under a final name, no .part"

    monkeypatch.undo()  # space freed
    assert build(indexes, out)
    for key, path in reference.items():
        assert outputs[key].read_bytes() == path.read_bytes()
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["records"]["usable"] == 6


# --- the job's log --------------------------------------------------------------------------

LOG_ON_A_FULL_DISK = """
import builtins, errno, os, sys
from robovqa_ft.core import logs
from robovqa_ft.core.space import named_if_full

full = False

class Filling:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)
    def __getattr__(self, name):
        return getattr(self.handle, name)

logs.open = lambda *args, **kwargs: Filling(builtins.open(*args, **kwargs))
with logs.log_to(sys.argv[1]):
    logs.logging.getLogger("robovqa_ft").info("extracting")
    full = True
    with named_if_full(sys.argv[2], "the frames of shard s to"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
"""


def test_a_full_disk_under_the_log_too_still_reports_the_jobs_own_error(tmp_path):
    log, staging = tmp_path / "logs" / "job.log", tmp_path / "staging"
    result = subprocess.run([sys.executable, "-c", LOG_ON_A_FULL_DISK, str(log), str(staging)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    expected = f"while writing the frames of shard s to {staging}"
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("robovqa_ft.core.space.DiskFullError: no space left") and expected in last
    )
    assert "ERROR robovqa_ft: no space left on" in result.stderr  # shown on the terminal
    assert "extracting" in log.read_text()  # what fitted stays in the log
