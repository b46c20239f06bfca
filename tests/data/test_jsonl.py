"""robovqa_ft.data.jsonl (clip splits, subsets, curriculum JSONL) and frames' folder-safe ids."""

import json
import re
from collections import Counter

import pytest

from robovqa_ft.data.frames import sanitize_id, video_id_for
from robovqa_ft.data.jsonl import assign_splits, build_jsonl, jsonl_paths, select_subset

OUTPUT_KEYS = tuple(jsonl_paths())


def bucket_splits(n):
    """n clips, half from each bucket split."""
    return {f"clip{i:04d}": "val" if i % 2 else "train" for i in range(n)}


def val_ids(splits):
    return {vid for vid, split in splits.items() if split == "val"}


# --- assign_splits ---------------------------------------------------------------------------


def test_hash_split_is_deterministic():
    bucket = bucket_splits(1000)

    assert assign_splits(bucket, "hash", 0.1, 0) == assign_splits(bucket, "hash", 0.1, 0)


def test_hash_split_puts_about_val_ratio_of_clips_in_val():
    splits = assign_splits(bucket_splits(10_000), "hash", 0.1, 0)

    assert set(splits) == set(bucket_splits(10_000))
    assert abs(Counter(splits.values())["val"] - 1000) < 90  # 3 standard deviations


def test_a_clips_split_does_not_depend_on_the_other_clips():
    full = assign_splits(bucket_splits(1000), "hash", 0.1, 0)
    part = {vid: split for i, (vid, split) in enumerate(bucket_splits(1000).items()) if i % 3}

    assert all(full[vid] == split for vid, split in assign_splits(part, "hash", 0.1, 0).items())


def test_split_and_subset_are_pinned_across_processes_and_versions():
    # Literal values: a salted or changed hash would move clips between train and val.
    splits = assign_splits({f"clip-{i}": "train" for i in range(40)}, "hash", 0.1, 0)

    assert sorted(v for v, s in splits.items() if s == "val") == [
        "clip-10", "clip-20", "clip-26", "clip-36",
    ]  # fmt: skip
    assert sorted(select_subset(splits, 0.25, 0)) == [
        "clip-1", "clip-10", "clip-12", "clip-13", "clip-16", "clip-20", "clip-23", "clip-28",
        "clip-31", "clip-37", "clip-5", "clip-6",
    ]  # fmt: skip
    assert sanitize_id("../x y") == "x_y-b37c7286cf"


def test_hash_split_changes_with_seed():
    bucket = bucket_splits(1000)

    assert val_ids(assign_splits(bucket, "hash", 0.1, 0)) != val_ids(
        assign_splits(bucket, "hash", 0.1, 1)
    )


def test_hash_split_ignores_input_order():
    bucket = bucket_splits(1000)
    reversed_bucket = dict(reversed(list(bucket.items())))

    assert assign_splits(reversed_bucket, "hash", 0.1, 0) == assign_splits(bucket, "hash", 0.1, 0)


def test_hash_split_pools_both_bucket_splits():
    bucket = bucket_splits(1000)
    splits = assign_splits(bucket, "hash", 0.1, 0)

    moves = Counter((bucket[vid], splits[vid]) for vid in bucket)
    assert moves[("val", "train")] > 0
    assert moves[("train", "val")] > 0


def test_official_split_keeps_the_bucket_split():
    bucket = bucket_splits(100)

    assert assign_splits(bucket, "official", 0.1, 0) == bucket


def test_unknown_split_method_raises():
    with pytest.raises(ValueError, match="random"):
        assign_splits(bucket_splits(10), "random", 0.1, 0)


# --- select_subset ---------------------------------------------------------------------------


@pytest.fixture
def splits_1000():
    return assign_splits(bucket_splits(1000), "hash", 0.1, 0)


def test_smaller_subset_is_nested_in_larger_one(splits_1000):
    tenth, fifth, half = (select_subset(splits_1000, r, 0) for r in (0.1, 0.2, 0.5))

    assert set(tenth) < set(fifth) < set(half) < set(splits_1000)


def test_subset_keeps_each_clip_split_label(splits_1000):
    subset = select_subset(splits_1000, 0.2, 0)

    assert subset == {vid: splits_1000[vid] for vid in subset}


def test_subset_is_deterministic(splits_1000):
    assert select_subset(splits_1000, 0.2, 0) == select_subset(splits_1000, 0.2, 0)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_subset_keeps_about_ratio_of_each_split(ratio):
    splits = assign_splits(bucket_splits(10_000), "hash", 0.1, 0)
    subset = select_subset(splits, ratio, 0)

    for split, count in Counter(splits.values()).items():
        kept = Counter(subset.values())[split]
        sigma = (count * ratio * (1 - ratio)) ** 0.5
        assert abs(kept - ratio * count) < 4 * sigma, (split, kept, count)


def test_subset_ratio_one_keeps_every_clip(splits_1000):
    assert select_subset(splits_1000, 1.0, 0) == splits_1000


# --- build_jsonl -----------------------------------------------------------------------------


def qa(tag, family, prompt, answer):
    return {"tag": tag, "family": family, "prompt": prompt, "answer": answer}


SUCCESS_YES = qa("success:discrete:True", "success", "put cup Q: satisfied?", "yes")
SUCCESS_NO = qa("success:discrete:False", "success", "close drawer Q: satisfied?", "no")
AFFORD_YES = qa(
    "affordance:discriminative:discrete:True",
    "affordance",
    "open drawer Q: possible right now?",
    "yes",
)
PLAN = qa(
    "planning:freeform", "planning", "current goal is: tidy Q: immediate next step?", "put cup"
)
FUTURE = qa(
    "future_prediction:freeform",
    "future_prediction",
    "Q: what is likely to happen next?",
    "open drawer",
)
PAST = qa("past_description:freeform", "past_description", "Q: what just happened?", "café crème")

# video_id -> its QAs, as the first shard that holds it lists them
CLIP_QAS = {
    "v1": [SUCCESS_YES, PLAN],
    "v2": [FUTURE, PAST, SUCCESS_NO],
    "v3": [PLAN, PLAN],
    "v4": [AFFORD_YES],
    "v5": [PAST, FUTURE, AFFORD_YES, SUCCESS_YES],
    "v6": [SUCCESS_NO],
    "v7": [PLAN, FUTURE],
    "v8": [PAST],
}


def ok_line(video_id, index, qas, qa_skipped=None):
    return {
        "status": "ok",
        "index": index,
        "offset": 1000 * index,
        "video_id": video_id,
        "unique_id": video_id,
        "source_size": "320x240",
        "qas": qas,
        "qa_skipped": qa_skipped or {},
    }


def skipped_line(video_id, index, reason):
    return {
        "status": "skipped",
        "index": index,
        "offset": 1000 * index,
        "video_id": video_id,
        "reason": reason,
        "detail": "test",
    }


def write_index(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), "utf-8")
    return path


@pytest.fixture
def shard_indexes(tmp_path):
    """Two train shards and one val shard: 8 usable clips, 4 skipped records."""
    clips = tmp_path / "clips"
    return [
        write_index(
            clips / "train" / "train-00000.jsonl",
            [
                ok_line("v1", 0, CLIP_QAS["v1"], {"malformed_qa_block": 1}),
                ok_line("v2", 1, CLIP_QAS["v2"]),
                skipped_line("v9", 2, "wrong_frame_count"),
                ok_line("v3", 3, CLIP_QAS["v3"], {"unknown_task_tag": 2}),
            ],
        ),
        write_index(
            clips / "train" / "train-00001.jsonl",
            [
                ok_line("v4", 0, CLIP_QAS["v4"]),
                ok_line("v5", 1, CLIP_QAS["v5"]),
                skipped_line("v10", 2, "no_valid_qa"),
            ],
        ),
        write_index(
            clips / "val" / "val-00000.jsonl",
            [
                ok_line("v6", 0, CLIP_QAS["v6"]),
                # v2 again, with other QAs: the train shard's copy (read first) wins
                ok_line("v2", 1, [PLAN]),
                ok_line("v7", 2, CLIP_QAS["v7"]),
                skipped_line("v11", 3, "wrong_frame_count"),
                ok_line("v8", 4, CLIP_QAS["v8"]),
            ],
        ),
    ]


def run_build(shard_indexes, out_dir, subset_ratio=1.0):
    outputs = {key: out_dir / f"{key}.jsonl" for key in OUTPUT_KEYS}
    metadata = build_jsonl(
        index_paths=shard_indexes,
        outputs=outputs,
        metadata_path=out_dir / "metadata.json",
        split="hash",
        val_ratio=0.25,
        split_seed=0,
        subset_ratio=subset_ratio,
        frames_per_clip=16,
        frame_size=[288, 288],
        jpeg_quality=90,
        source="test",
        frame_rate=2.0,
    )
    lines = {
        key: [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        for key, path in outputs.items()
    }
    return lines, metadata


def ids_of(lines):
    return {line["video_id"] for line in lines}


@pytest.fixture
def built(shard_indexes, tmp_path):
    return run_build(shard_indexes, tmp_path / "out")


def test_stage1_and_stage2_share_one_disjoint_split(built):
    lines, _ = built

    train, val = ids_of(lines["stage1_train"]), ids_of(lines["stage1_val"])
    assert ids_of(lines["stage2_train"]) == train
    assert ids_of(lines["stage2_val"]) == val
    assert not train & val
    assert train | val == set(CLIP_QAS)
    assert train and val  # both non-empty, or disjointness would prove nothing


def test_stage1_line_is_one_question_of_the_clip(built):
    lines, _ = built

    stage1 = lines["stage1_train"] + lines["stage1_val"]
    by_clip = {}
    for line in stage1:
        by_clip.setdefault(line["video_id"], []).append(line)
    for vid, clip_lines in by_clip.items():
        assert [line["id"] for line in clip_lines] == [
            f"{vid}-{k:02d}" for k in range(len(CLIP_QAS[vid]))
        ]
        for line, source in zip(clip_lines, CLIP_QAS[vid], strict=True):
            assert line["conversations"] == [
                {"from": "human", "value": source["prompt"]},
                {"from": "gpt", "value": source["answer"]},
            ]
            assert line["task"] == source["family"]
            expected_type = "yes_no" if ":discrete:" in source["tag"] else "freeform"
            assert line["answer_type"] == expected_type
    assert len(stage1) == sum(len(qas) for qas in CLIP_QAS.values())


def test_stage2_line_holds_all_qas_of_the_clip_in_order(built):
    lines, _ = built

    stage2 = lines["stage2_train"] + lines["stage2_val"]
    assert len(stage2) == len(CLIP_QAS)
    for line in stage2:
        qas = CLIP_QAS[line["video_id"]]
        assert line["id"] == line["video_id"]
        assert line["task"] == "multi"
        assert line["tasks"] == [q["family"] for q in qas]
        expected_turns = []
        for q in qas:
            expected_turns += [
                {"from": "human", "value": q["prompt"]},
                {"from": "gpt", "value": q["answer"]},
            ]
        assert line["conversations"] == expected_turns


def test_every_line_lists_the_clip_sixteen_frames(built):
    lines, _ = built

    for key in OUTPUT_KEYS:
        for line in lines[key]:
            vid = line["video_id"]
            assert line["images"] == [f"{vid}/{i:02d}.jpg" for i in range(16)]
            assert line["images"][0] == f"{vid}/00.jpg"
            assert line["images"][-1] == f"{vid}/15.jpg"


@pytest.mark.usefixtures("built")
def test_no_line_carries_image_token_or_task_tag(tmp_path):
    for key in OUTPUT_KEYS:
        text = (tmp_path / "out" / f"{key}.jsonl").read_text("utf-8")
        assert text, key
        assert "<image>" not in text
        assert "<task:" not in text


def test_duplicate_video_id_in_a_later_shard_is_dropped_and_counted(built):
    lines, metadata = built

    stage2 = lines["stage2_train"] + lines["stage2_val"]
    assert [line["video_id"] for line in stage2].count("v2") == 1
    (v2,) = (line for line in stage2 if line["video_id"] == "v2")
    assert v2["tasks"] == ["future_prediction", "past_description", "success"]
    assert metadata["records"]["skipped"]["duplicate_video_id"] == 1


def test_metadata_counts_records_splits_and_families(built, tmp_path):
    lines, metadata = built

    assert json.loads((tmp_path / "out" / "metadata.json").read_text("utf-8")) == metadata
    assert metadata["source"] == "test"
    assert metadata["shards"] == 3
    assert metadata["records"] == {
        "usable": 8,
        "skipped": {"duplicate_video_id": 1, "no_valid_qa": 1, "wrong_frame_count": 2},
        "total": 12,
        "with_extra_texts": 0,
    }
    assert metadata["qa_blocks_skipped"] == {"malformed_qa_block": 1, "unknown_task_tag": 2}
    assert metadata["frames"]["per_clip"] == 16
    assert metadata["frames"]["size"] == [288, 288]
    assert metadata["frames"]["rate"] == 2.0 and "nominal" in metadata["frames"]["times"]
    for split in ("train", "val"):
        vids = ids_of(lines[f"stage2_{split}"])
        qas = [q for vid in vids for q in CLIP_QAS[vid]]
        stats = metadata["splits"][split]
        assert stats["clips"] == len(vids)
        assert stats["stage2_conversations"] == len(vids)
        assert stats["stage1_samples"] == len(qas) == len(lines[f"stage1_{split}"])
        families = ("planning", "success", "affordance", "future_prediction", "past_description")
        expected_families = Counter(dict.fromkeys(families, 0))
        expected_families.update(q["family"] for q in qas)
        assert stats["families"] == dict(expected_families)
    assert metadata["splits"]["train"]["clips"] + metadata["splits"]["val"]["clips"] == 8


def test_half_subset_keeps_a_subset_of_the_full_build(shard_indexes, tmp_path):
    full, _ = run_build(shard_indexes, tmp_path / "full")
    half, metadata = run_build(shard_indexes, tmp_path / "half", subset_ratio=0.5)

    for split in ("train", "val"):
        assert ids_of(half[f"stage2_{split}"]) <= ids_of(full[f"stage2_{split}"])
        assert ids_of(half[f"stage1_{split}"]) == ids_of(half[f"stage2_{split}"])
    assert 0 < len(ids_of(half["stage2_train"])) + len(ids_of(half["stage2_val"])) < 8
    assert metadata["records"]["usable"] == 8


def test_build_is_deterministic(shard_indexes, tmp_path):
    first, _ = run_build(shard_indexes, tmp_path / "a")
    second, _ = run_build(shard_indexes, tmp_path / "b")

    assert first == second


def test_build_without_usable_clips_raises(tmp_path):
    index = write_index(
        tmp_path / "clips" / "train" / "train-00000.jsonl",
        [skipped_line("v9", 0, "wrong_frame_count")],
    )

    with pytest.raises(ValueError, match="no usable clip"):
        run_build([index], tmp_path / "out")


# --- sanitize_id / video_id_for --------------------------------------------------------------

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@pytest.mark.parametrize("raw", ["v1", "robot_7-clip.0003", "A1b2C3"])
def test_safe_id_is_returned_unchanged(raw):
    assert sanitize_id(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        "../../etc/passwd",
        "a/b",
        "..",
        ".",
        ".hidden",
        "id with spaces",
        "ünïcödé",
        "",
        "x" * 300,
        "/" * 300,
        "-leading-dash",
    ],
)
def test_unsafe_id_becomes_a_safe_folder_name(raw):
    clean = sanitize_id(raw)

    assert SAFE_ID.match(clean), clean
    assert "/" not in clean
    assert clean not in (".", "..")
    assert len(clean) <= 111
    assert clean != raw


def test_unsafe_ids_that_clean_alike_stay_distinct():
    assert sanitize_id("a/b") != sanitize_id("a b")
    assert sanitize_id("a/b") != sanitize_id("a_b")


def test_sanitize_id_is_stable():
    assert sanitize_id("../../etc/passwd") == sanitize_id("../../etc/passwd")
    assert sanitize_id("x" * 300) == sanitize_id("x" * 300)


@pytest.mark.parametrize("missing", [None, "", "   "])
def test_video_id_without_unique_id_is_built_from_shard_and_index(missing):
    vid = video_id_for(missing, "train-00001", 7)

    assert vid == video_id_for(None, "train-00001", 7)
    assert "train-00001" in vid
    assert SAFE_ID.match(vid)
    assert vid != video_id_for(missing, "train-00001", 8)
    assert vid != video_id_for(missing, "train-00002", 7)


def test_video_id_with_unique_id_is_its_sanitized_form():
    assert video_id_for("clip_42", "train-00001", 7) == "clip_42"
    assert video_id_for("a/b", "train-00001", 7) == sanitize_id("a/b")
