from fake_records import good_record

from robovqa_ft.data.records import decode_sequence_example, import_tensorflow
from robovqa_ft.data.tfrecord import iter_tfrecord


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
