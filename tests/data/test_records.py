import pytest
from fake_records import good_record

from robovqa_ft.records import (
    CorruptShardError,
    decode_sequence_example,
    import_tensorflow,
    iter_tfrecord,
)


def test_reader_matches_tensorflows_own_reader(make_shard):
    records = [good_record(f"clip-{i}", seed=i) for i in range(5)]
    path = make_shard(records)
    tf = import_tensorflow()
    reference = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    ours = list(iter_tfrecord(path))
    assert [payload for _, payload in ours] == reference == records
    offsets = [offset for offset, _ in ours]
    assert offsets == [sum(16 + len(r) for r in records[:i]) for i in range(5)]


def test_decode_reads_frames_text_and_unique_id(make_shard):
    raw = decode_sequence_example(good_record("clip-7", seed=3))
    assert raw.unique_id == "clip-7"
    assert len(raw.frames) == 16 and all(f[:2] == b"\xff\xd8" for f in raw.frames)  # JPEG SOI
    assert raw.text.startswith("<task:") and "</PRED>" in raw.text


def test_texts_beyond_the_first_are_counted_not_read():
    tf = import_tensorflow()
    example = tf.train.SequenceExample.FromString(good_record("clip", seed=1))
    first = example.feature_lists.feature_list["texts"].feature[0].bytes_list.value[0]
    example.feature_lists.feature_list["texts"].feature.add().bytes_list.value.append(b"more")
    raw = decode_sequence_example(example.SerializeToString())
    assert raw.text == first.decode() and raw.extra_texts == 1


def test_truncated_shard_names_shard_and_offset(make_shard):
    records = [good_record(f"clip-{i}", seed=i) for i in range(3)]
    path = make_shard(records)
    third = 2 * 16 + len(records[0]) + len(records[1])
    data = path.read_bytes()
    path.write_bytes(data[: third + 100])
    read = []
    with pytest.raises(CorruptShardError) as error:
        read.extend(iter_tfrecord(path))
    assert len(read) == 2
    assert error.value.offset == third
    assert str(path) in str(error.value) and f"byte offset {third}" in str(error.value)
    assert "truncated" in str(error.value)


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
