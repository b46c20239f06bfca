"""robovqa_ft.data.record_frames, the child process that reads a TFRecord's clips for `ask`."""

import pytest
from fake_records import good_record

from robovqa_ft.data.demo_bucket import sequence_example
from robovqa_ft.data.frames import extract_shard
from robovqa_ft.data.record_frames import RecordFramesError, main, write_record_frames

SETTINGS = {"frame_size": 32, "jpeg_quality": 90, "frames_per_clip": 16}


def test_the_clips_frames_are_the_bytes_extraction_writes(make_shard, tmp_path):
    shard = make_shard([good_record("clip-a", 1), good_record(None, 2), good_record("clip-c", 3)])
    extract_shard(shard, shard.name, tmp_path / "images", tmp_path / "staging",
                  tmp_path / "index.jsonl", (32, 32), 16, 90)  # fmt: skip
    unnamed = f"{shard.name}-000001"  # a record without unique_id, named as extraction names it
    found = write_record_frames(shard, tmp_path / "out", ["clip-c", unnamed], **SETTINGS)
    assert found == {"clip-c": "clip-c", unnamed: unnamed}
    for clip in found.values():
        written = sorted((tmp_path / "out" / clip).iterdir())
        assert [p.name for p in written] == [f"{i:02d}.jpg" for i in range(16)]
        assert [p.read_bytes() for p in written] == [
            (tmp_path / "images" / clip / p.name).read_bytes() for p in written
        ]
    assert not (tmp_path / "out" / "clip-a").exists()  # only the clips asked for


def test_a_clip_the_shard_lacks_is_refused_naming_clips_it_has(make_shard, tmp_path):
    shard = make_shard([good_record("clip-a", 1), good_record("clip-b", 2)])
    with pytest.raises(RecordFramesError, match=r"has no clip clip-z; its 2 clips include clip-a"):
        write_record_frames(shard, tmp_path / "out", ["clip-a", "clip-z"], **SETTINGS)


def test_without_a_clip_id_only_a_shard_of_one_clip_is_read(make_shard, tmp_path):
    one = make_shard([good_record("only", 1)], name="one")
    assert write_record_frames(one, tmp_path / "a", [], **SETTINGS) == {"only": "only"}
    two = make_shard([good_record("clip-a", 1), good_record("clip-b", 2)], name="two")
    with pytest.raises(RecordFramesError, match=r"holds 2 clips: name one .* clip-a, clip-b"):
        write_record_frames(two, tmp_path / "b", [], **SETTINGS)


def test_a_clip_of_another_frame_count_is_refused_as_extraction_skips_it(make_shard, tmp_path):
    shard = make_shard([sequence_example("short", [b"not read"] * 9, "Q: satisfied? A: yes")])
    with pytest.raises(RecordFramesError, match=r"record 0 \(short\) has 9 frames; .* = 16"):
        write_record_frames(shard, tmp_path / "out", ["short"], **SETTINGS)


def test_the_command_fails_with_one_line_naming_a_file_that_is_no_shard(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a shard at all")
    with pytest.raises(SystemExit) as stopped:
        main([str(text), str(tmp_path / "out"), "--frame-size", "32", "--jpeg-quality", "90",
              "--frames-per-clip", "16"])  # fmt: skip
    assert stopped.value.code == (
        f"error: {text} is not a TFRecord shard: its first 12 bytes are not a record length "
        "and its CRC"
    )
