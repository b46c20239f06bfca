"""Bad inputs on the data side (TensorFlow, never torch): a source folder with files that
are not shards, a truncated or corrupt shard, bad records, an id that climbs out of its
folder. Each stops or is skipped with its exact message, and nothing else is lost."""

import hashlib
import logging
import random

import pytest
from fake_records import SMALL_FRAME, good_record
from test_frames import read_index, run_extract  # tests/data's extraction helpers

from robovqa_ft.data.bucket import BucketError, local_shards, prepare_source, read_manifest
from robovqa_ft.data.demo_bucket import bad_record, sequence_example, write_tfrecord
from robovqa_ft.data.records import import_tensorflow
from robovqa_ft.data.tfrecord import CorruptShardError, iter_tfrecord


def test_local_source_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(BucketError, match=r"train/train\*"):
        local_shards(tmp_path)
    with pytest.raises(BucketError, match="not a folder"):
        local_shards(tmp_path / "missing")


def test_files_not_named_like_shards_are_ignored_with_a_warning(tmp_path, caplog):
    source = tmp_path / "source"
    for name in ("train/train-0", "val/val-0"):
        write_tfrecord(source / name, [good_record(name)])
    for name in ("train/README.txt", "train/.DS_Store", "val/stats.json"):
        (source / name).write_text("{}")
    manifest = tmp_path / "shards.tsv"
    with caplog.at_level(logging.WARNING, logger="robovqa_ft.data.bucket"):
        shards = prepare_source(str(source), manifest, tmp_path / "dl", workers=1, demo={})
    assert [s.shard for s in read_manifest(manifest)] == [s.shard for s in shards]
    assert [s.shard for s in shards] == ["train-0", "val-0"]
    assert caplog.messages == [
        f"{source}: ignored 3 entries not named like shards (train/train*, val/val*) or "
        "half-copied: train/.DS_Store, train/README.txt, val/stats.json"
    ]


def test_a_file_named_like_a_shard_that_is_not_a_tfrecord_stops_before_extraction(tmp_path):
    source = tmp_path / "source"
    write_tfrecord(source / "train" / "train-0", [good_record("a")])
    (source / "train" / "train-stats.json").write_text('{"clips": 12}\n')
    (source / "val").mkdir()
    (source / "val" / "val-0").write_bytes(b"")  # a copy cut short to nothing
    (source / "val" / "val-1").write_bytes(b"\x01\x02\x03")
    manifest = tmp_path / "shards.tsv"
    with pytest.raises(BucketError) as error:
        prepare_source(str(source), manifest, tmp_path / "dl", workers=1, demo={})
    assert str(error.value) == (
        f"source {source}: 3 files named like shards are not TFRecord files: "
        f"{source}/train/train-stats.json (its first 12 bytes are not a record length and "
        f"its CRC); {source}/val/val-0 (it is empty); {source}/val/val-1 (it is 3 bytes "
        "long, shorter than one record's header). Nothing was extracted. Move them out of "
        "the split folders, or replace them with good copies of the shards (from a gs:// "
        "source they are the bucket's own objects: copy its good shards to a folder and use "
        "that)"
    )
    assert not manifest.exists()  # no extraction is planned from this listing
    assert (source / "train" / "train-0").stat().st_size > 0  # the good shard untouched


def test_truncated_shard_names_shard_and_offset(make_shard):
    records = [good_record(f"clip-{i}", seed=i) for i in range(3)]
    path = make_shard(records)
    third = 2 * 16 + len(records[0]) + len(records[1])
    data = path.read_bytes()
    path.write_bytes(data[: third + 100])
    read = []
    with pytest.raises(CorruptShardError) as error:
        read.extend(iter_tfrecord(path))
    assert [payload for _, payload in read] == records[:2]  # what came before is intact
    assert error.value.offset == third
    assert str(error.value) == (
        f"{path}: truncated record (payload) at byte offset {third}. The shard is damaged "
        "or was cut short: replace it with a good copy and run again (deleted, its clips "
        "would be left out without an error)."
    )


def test_a_damaged_downloaded_shard_is_fetched_anew_not_replaced_by_hand(
    make_shard, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a job's working directory: results/bucket/ holds downloads
    shard = make_shard([good_record("clip-0", 0)], name="train-00000-of-00001")
    downloaded = tmp_path / "results" / "bucket" / "gdm-robovqa" / "tfrecord" / "train"
    downloaded.mkdir(parents=True)
    path = downloaded / shard.name
    path.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CorruptShardError) as error:
        list(iter_tfrecord(path))
    assert str(error.value).endswith(
        "The shard is damaged or was cut short: delete it and run again with --forcerun "
        "download, which fetches it anew."
    )


@pytest.mark.parametrize("where, problem", [(3, "record length"), (40, "record data")])
def test_flipped_byte_is_a_crc_error_at_the_records_offset(make_shard, where, problem):
    records = [good_record(f"clip-{i}", seed=i) for i in range(3)]
    path = make_shard(records)
    second = 16 + len(records[0])
    data = bytearray(path.read_bytes())
    data[second + where] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"CRC mismatch in {problem} at byte offset"):
        list(iter_tfrecord(path))


def test_corrupt_shard_publishes_nothing_and_keeps_the_other_shards(make_shard, tmp_path):
    good = make_shard([good_record("kept", 9)], name="train-good")
    run_extract(good, tmp_path)
    shard = make_shard([good_record(f"clip-{i}", i) for i in range(3)])
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(CorruptShardError, match=f"{shard}: truncated record"):
        run_extract(shard, tmp_path)
    indexes = sorted(p.name for p in (tmp_path / "clips").rglob("*.jsonl"))
    assert indexes == ["train-good.jsonl"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["kept"]
    assert len(list((tmp_path / "images" / "kept").glob("*.jpg"))) == 16
    assert not (tmp_path / "staging" / shard.name).exists()


def without_images(rng):
    """A record of the RoboVQA layout whose `images` feature list is missing."""
    tf = import_tensorflow()
    example = tf.train.SequenceExample.FromString(good_record("bad", seed=5))
    del example.feature_lists.feature_list["images"]
    return example.SerializeToString()


BAD_RECORDS = [  # how the record is made, the reason it is skipped for, its detail
    (lambda rng: bad_record("wrong_frame_count", "bad", rng, SMALL_FRAME),
     "wrong_frame_count", "15 frames, expected 16"),
    (without_images, "wrong_frame_count", "0 frames, expected 16"),
    (lambda rng: bad_record("undecodable_frame", "bad", rng, SMALL_FRAME),
     "undecodable_frame", "frame 7: "),  # then PIL's own words
    (lambda rng: bad_record("no_valid_qa", "bad", rng, SMALL_FRAME),
     "no_valid_qa", "no usable QA block ({'malformed_qa_block': 1})"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, reason, detail", BAD_RECORDS, ids=["15_frames", "no_images", "corrupt_jpeg", "no_qa"]
)
def test_each_bad_record_is_skipped_counted_and_logged(make_shard, tmp_path, caplog, make,
                                                       reason, detail):  # fmt: skip
    shard = make_shard([good_record("ok-1", 1), make(random.Random(0))])
    summary, index = run_extract(shard, tmp_path)
    assert summary.clips == 1 and summary.skipped == {reason: 1}
    bad = read_index(index)[1]
    assert (bad["status"], bad["reason"], bad["index"]) == ("skipped", reason, 1)
    assert bad["detail"].startswith(detail) and bad["offset"] > 0
    assert not (tmp_path / "images" / "bad").exists()
    assert len(list((tmp_path / "images" / "ok-1").glob("*.jpg"))) == 16
    logged = f"{shard.name} record 1 (byte {bad['offset']}): skipped, {reason}: {detail}"
    assert any(m.startswith(logged) for m in caplog.messages)


def test_record_without_text_or_unparsable_payload_is_skipped(make_shard, tmp_path):
    no_text = sequence_example("no-text", [b"\xff\xd8"] * 16, None)
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a valid TFRecord frame around an invalid proto
    shard = make_shard([good_record("x"), no_text, garbage])
    summary, index = run_extract(shard, tmp_path)
    entries = read_index(index)
    assert [e.get("reason") for e in entries] == [None, "no_valid_qa", "unparsable_record"]
    assert entries[1]["detail"] == "no text"
    assert entries[2]["video_id"] == f"{shard.name}-000002"
    assert summary.skipped == {"no_valid_qa": 1, "unparsable_record": 1}
    assert len(list((tmp_path / "images" / "x").glob("*.jpg"))) == 16


def test_unsafe_unique_id_stays_inside_the_images_folder(make_shard, tmp_path):
    raw = "../../escaped/clip"
    shard = make_shard([good_record(raw, 1)])
    _, index = run_extract(shard, tmp_path)
    entry = read_index(index)[0]
    digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
    assert (entry["video_id"], entry["unique_id"]) == (f"escaped_clip-{digest}", raw)
    assert (tmp_path / "images" / entry["video_id"] / "15.jpg").is_file()
    assert entry["status"] == "ok" and not (tmp_path.parent / "escaped").exists()
