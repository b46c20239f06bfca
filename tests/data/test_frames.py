import io
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from fake_records import SMALL_FRAME, good_record
from PIL import Image

from robovqa_ft.data.demo_bucket import bad_record
from robovqa_ft.data.frames import extract_shard, resize_jpeg


def run_extract(shard, tmp_path, size=(32, 32)):
    index = tmp_path / "clips" / "train" / f"{shard.name}.jsonl"
    summary = extract_shard(
        shard_path=shard,
        shard=shard.name,
        images_dir=tmp_path / "images",
        staging_dir=tmp_path / "staging",
        index_path=index,
        frame_size=size,
        frames_per_clip=16,
        jpeg_quality=90,
    )
    return summary, index


def read_index(index):
    return [json.loads(line) for line in index.read_text().splitlines()]


def test_good_records_become_16_resized_frames_and_index_lines(make_shard, tmp_path):
    shard = make_shard([good_record("clip-a", 1), good_record("clip-b", 2)])
    summary, index = run_extract(shard, tmp_path, size=(40, 30))
    assert (summary.records, summary.clips) == (2, 2)
    entries = read_index(index)
    assert [e["video_id"] for e in entries] == ["clip-a", "clip-b"]
    assert entries[0]["source_size"] == "x".join(map(str, SMALL_FRAME))
    assert entries[0]["qas"] and all(q["answer"] for q in entries[0]["qas"])
    for vid in ("clip-a", "clip-b"):
        frames = sorted((tmp_path / "images" / vid).glob("*.jpg"))
        assert [f.name for f in frames] == [f"{i:02d}.jpg" for i in range(16)]
        assert all(Image.open(f).size == (40, 30) for f in frames)
    assert not (tmp_path / "staging" / shard.name).exists()


def test_missing_unique_id_gets_a_stable_id_and_duplicates_are_skipped(make_shard, tmp_path):
    shard = make_shard([good_record(None, 1), good_record("same", 2), good_record("same", 3)])
    _, index = run_extract(shard, tmp_path)
    entries = read_index(index)
    assert entries[0]["video_id"] == f"{shard.name}-000000"
    assert [e["status"] for e in entries] == ["ok", "ok", "skipped"]
    assert entries[2]["reason"] == "duplicate_video_id"
    _, again = run_extract(shard, tmp_path)
    assert read_index(again)[0]["video_id"] == entries[0]["video_id"]


def test_large_frames_are_decoded_at_reduced_size(monkeypatch):
    from PIL import JpegImagePlugin

    scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        scales.append(self.size)  # the size the decoder will produce
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big = io.BytesIO()
    Image.new("RGB", (1280, 960), (200, 10, 10)).save(big, "JPEG")
    jpeg, original = resize_jpeg(big.getvalue(), (288, 288), 90)
    assert original == (1280, 960)
    assert scales == [(640, 480)]  # decoded at half size, still above 288x288
    assert Image.open(io.BytesIO(jpeg)).size == (288, 288)


def test_clip_id_in_two_shards_keeps_the_first_publishers_frames_and_answers(make_shard, tmp_path):
    first = make_shard([good_record("same", 1, size=(64, 64))], name="train-a")
    second = make_shard([good_record("same", 2, size=(64, 64)), good_record("other", 3)],
                        name="train-b")  # fmt: skip
    _, first_index = run_extract(first, tmp_path)
    frame = (tmp_path / "images" / "same" / "15.jpg").read_bytes()
    summary, second_index = run_extract(second, tmp_path)
    assert summary.skipped == {"duplicate_video_id": 1} and summary.clips == 1
    assert read_index(second_index)[0]["reason"] == "duplicate_video_id"
    assert read_index(first_index)[0]["status"] == "ok"
    assert (tmp_path / "images" / "same" / "15.jpg").read_bytes() == frame
    # Re-running the first shard replaces its own folder.
    run_extract(first, tmp_path)
    assert (tmp_path / "images" / "same" / "15.jpg").read_bytes() == frame


KILL_SCRIPT = """
import sys
from robovqa_ft.data.frames import extract_shard
extract_shard(sys.argv[1], "shard", sys.argv[2], sys.argv[3], sys.argv[4], (64, 64), 16, 90)
"""


def test_kill_mid_shard_leaves_no_partial_frame_and_rerun_completes(make_shard, tmp_path):
    shard = make_shard([good_record(f"clip-{i:03d}", i, size=(640, 480)) for i in range(60)])
    images, staging, index = tmp_path / "images", tmp_path / "staging", tmp_path / "index.jsonl"
    args = [sys.executable, "-c", KILL_SCRIPT, str(shard), str(images), str(staging), str(index)]
    process = subprocess.Popen(args)
    deadline = time.monotonic() + 120
    while len(list(staging.rglob("*.jpg"))) < 40 and process.poll() is None:
        assert time.monotonic() < deadline, "extraction never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the kill came after the shard finished"
    assert not index.exists()
    assert not images.exists() or not any(images.iterdir())

    extract_shard(shard, "shard", images, staging, index, (64, 64), 16, 90)
    clips = sorted(images.iterdir())
    assert len(clips) == 60 and len(read_index(index)) == 60
    for clip in clips:
        frames = sorted(clip.glob("*.jpg"))
        assert len(frames) == 16
        for frame in frames:
            with Image.open(frame) as image:
                image.load()  # raises on a truncated JPEG
    assert not (staging / "shard").exists()


def test_a_frames_per_clip_the_data_does_not_have_stops_at_the_first_shard(make_shard, tmp_path):
    from robovqa_ft.data.frames import FrameCountError

    shard = make_shard([good_record(f"clip-{i}", i) for i in range(3)])  # 16 frames each
    with pytest.raises(FrameCountError, match="frames_per_clip = 8 frames; all have 16"):
        extract_shard(shard_path=shard, shard=shard.name, images_dir=tmp_path / "images",
                      staging_dir=tmp_path / "staging", index_path=tmp_path / "index.jsonl",
                      frame_size=(32, 32), frames_per_clip=8, jpeg_quality=90)  # fmt: skip
    assert not (tmp_path / "index.jsonl").exists() and not (tmp_path / "images").exists()
    # one odd record among good ones is still skipped and counted (tested above per kind)
    rng = random.Random(0)
    mixed = make_shard([bad_record("wrong_frame_count", "odd", rng, SMALL_FRAME),
                        good_record("ok", 1)])  # fmt: skip
    summary, _ = run_extract(mixed, tmp_path / "mixed")
    assert summary.skipped == {"wrong_frame_count": 1} and summary.clips == 1
