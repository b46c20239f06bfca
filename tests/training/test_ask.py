"""robovqa_ft.tools.ask: a trained run answers questions about clips it never saw, as evaluation
answers them on the frames extraction would have stored."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from peft import PeftModel
from PIL import Image
from training_helpers import train_tiny
from transformers import AutoModelForImageTextToText, AutoProcessor

from robovqa_ft.data.frames import resize_jpeg, resized_jpeg
from robovqa_ft.evaluation.evaluate import evaluate_run
from robovqa_ft.tools.answering import AskError, ask, frame_jpegs, model_source, workflow_config
from robovqa_ft.tools.ask import main

FRAME_SIZE, QUALITY = 48, 90  # frames shrunk from the tiny setup's 64 px, as extraction would
CLIPS = ("val-000", "val-001")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tiny_setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "stage1"
    # barely trained: its answers still change with every token of the prompt (frames
    # included), so two prompts that differ anywhere get different answers
    train_tiny(tiny_setup, out, max_steps=2)
    return out


@pytest.fixture(scope="module")
def config(tiny_setup, tmp_path_factory) -> dict:
    """The workflow config of the clips: frame size and quality, and generation settings."""
    settings = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    settings["model"]["name"] = str(tiny_setup["model"])
    settings.update(frame_size=FRAME_SIZE, jpeg_quality=QUALITY)
    settings["evaluation"].update(generation_batch_size=2, max_new_tokens=12, dataloader_workers=0,
                                  loss_clips=2, answers_per_family=4)  # fmt: skip
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return {"path": path, **workflow_config(path)}


def clip_pixels(tiny_setup, clip: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"))
            for p in sorted((tiny_setup["images"] / clip).glob("*.jpg"))]  # fmt: skip


def write_lossless_mp4(path: Path, frames: list[np.ndarray]) -> Path:
    """H.264 that codes RGB itself (libx264rgb) at quantizer 0: lossless, so the decoded
    frames are these pixels exactly (MP4 holds it; plain libx264 would go through YUV 4:2:0)."""
    height, width, _ = frames[0].shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=8, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def extracted(tiny_setup, clip: str, images_dir: Path) -> Path:
    """The clip's frames as extraction stores them, by extraction's own function."""
    folder = images_dir / clip
    folder.mkdir(parents=True)
    for frame in sorted((tiny_setup["images"] / clip).glob("*.jpg")):
        jpeg, _ = resize_jpeg(frame.read_bytes(), (FRAME_SIZE, FRAME_SIZE), QUALITY)
        (folder / frame.name).write_bytes(jpeg)
    return folder


def rows_of(path: Path, clips) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row for row in rows if row["video_id"] in clips]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_an_mp4_is_answered_as_evaluation_answers_the_frames_extraction_stores(
    tiny_setup, run_dir, config, tmp_path
):
    videos = {clip: write_lossless_mp4(tmp_path / f"{clip}.mp4", clip_pixels(tiny_setup, clip))
              for clip in CLIPS}  # fmt: skip
    images = tmp_path / "extracted"
    for clip, video in videos.items():
        folder = extracted(tiny_setup, clip, images)
        stored = [p.read_bytes() for p in sorted(folder.iterdir())]
        assert frame_jpegs(video, config) == stored  # decoded, resized and JPEG'd alike

    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    val = {stage: write_rows(tmp_path / f"{stage}.jsonl",
                             rows_of(tiny_setup[f"{stage}_val"], CLIPS))
           for stage in ("stage1", "stage2")}  # fmt: skip
    evaluate_run(
        adapter_dir=run_dir / "adapter", val_jsonl=val, images_dir=images,
        outputs={"eval": tmp_path / "eval.json", "predictions": tmp_path / "predictions.jsonl",
                 "losses": tmp_path / "val_losses.jsonl"},
        model=settings["model"], stages={"stage1": settings["stage"], "stage2": settings["stage"]},
        evaluation=config["evaluation"], run="stage1",
    )  # fmt: skip
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").open()]
    evaluated = [p for p in predictions if (p["format"], p["condition"]) == ("stage1", "frames")]
    assert len(evaluated) == 4 and {p["video_id"] for p in evaluated} == set(CLIPS)

    pairs = [{"clip": str(videos[p["video_id"]]), "question": p["question"]} for p in evaluated]
    answers = ask(run_dir, pairs, config)
    assert answers == [p["prediction"] for p in evaluated]
    assert len(set(answers)) > 1, "answers alike whatever the prompt would match by chance"


def test_a_longer_video_gives_16_frames_spread_evenly_ending_on_its_last(config, tmp_path):
    frames = [np.full((32, 32, 3), 8 * i, dtype=np.uint8) for i in range(31)]  # each its own
    video = write_lossless_mp4(tmp_path / "long.mp4", frames)
    chosen = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]  # 31 frames, 16 kept
    size = (FRAME_SIZE, FRAME_SIZE)
    assert frame_jpegs(video, config) == [
        resized_jpeg(Image.fromarray(frames[i]), size, QUALITY) for i in chosen
    ]


def test_a_folder_keeps_stored_frames_as_they_are_and_resizes_others(config, tmp_path):
    rng = np.random.default_rng(0)  # noise: a second JPEG pass would change its bytes
    stored, own = tmp_path / "stored", tmp_path / "own"
    for folder, count, size, suffix in ((stored, 16, FRAME_SIZE, "jpg"), (own, 20, 64, "png")):
        folder.mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.{suffix}", quality=QUALITY)
    (stored / ".shard").write_text("train-00000")  # beside extraction's frames; not a frame
    assert frame_jpegs(stored, config) == [p.read_bytes() for p in sorted(stored.glob("*.jpg"))]
    files = sorted(own.iterdir())
    chosen = [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19]  # 16 of 20, spread
    assert frame_jpegs(own, config) == [
        resize_jpeg(files[i].read_bytes(), (FRAME_SIZE, FRAME_SIZE), QUALITY)[0] for i in chosen
    ]


def test_one_question_on_the_command_line_prints_its_answer(
    tiny_setup, run_dir, config, tmp_path, capsys
):
    video = write_lossless_mp4(tmp_path / "clip.mp4", clip_pixels(tiny_setup, CLIPS[0]))
    question = "put cup Q: satisfied?"
    expected = ask(run_dir, [{"clip": str(video), "question": question}], config)
    capsys.readouterr()
    main([str(run_dir), "--video", str(video), "--question", question,
          "--configfile", str(config["path"])])  # fmt: skip
    assert capsys.readouterr().out == expected[0] + "\n"


def test_a_questions_file_gets_one_answer_line_per_pair_in_order_with_a_progress_bar(
    tiny_setup, run_dir, config, tmp_path, capsys
):
    clip = CLIPS[1]
    video = write_lossless_mp4(tmp_path / "clip.mp4", clip_pixels(tiny_setup, clip))
    folder = extracted(tiny_setup, clip, tmp_path / "extracted")  # extraction's: kept as is
    own = tiny_setup["images"] / clip  # 64 px frames: resized and JPEG'd as the video's are
    questions = ["put cup Q: satisfied?", "Q: what just happened?"]
    pairs = [{"clip": str(c), "question": q} for c in (video, folder, own) for q in questions]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    main([str(run_dir), "--questions", str(tmp_path / "pairs.jsonl"), "--out",
          str(tmp_path / "answers.jsonl"), "--configfile", str(config["path"])])  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "answers.jsonl").open()]
    assert [{"clip": x["clip"], "question": x["question"]} for x in lines] == pairs
    answers = [line["answer"] for line in lines]
    assert frame_jpegs(video, config) == frame_jpegs(own, config)  # the same frames
    assert answers[0:2] == answers[2:4] == answers[4:6]
    assert "6/6" in capsys.readouterr().err  # 3 batches of generation_batch_size 2


@pytest.fixture
def unloadable_run(run_dir, tmp_path) -> Path:
    """A run whose base model does not exist: a check that came after loading would fail on
    that instead of naming the bad input."""
    fake = tmp_path / "run"
    (fake / "adapter").mkdir(parents=True)
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    settings["model"]["name"] = str(tmp_path / "no-such-model")
    (fake / "config.yaml").write_text(yaml.safe_dump(settings))
    adapter = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = settings["model"]["name"]
    (fake / "adapter/adapter_config.json").write_text(json.dumps(adapter))
    return fake


def bad_inputs(tiny_setup, tmp_path) -> dict:
    short = write_lossless_mp4(tmp_path / "short.mp4", clip_pixels(tiny_setup, CLIPS[0])[:9])
    (tmp_path / "text.mp4").write_text("not a video")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(few / f"{i}.png")
    (tmp_path / "pairs.jsonl").write_text(
        '{"clip": "a.mp4", "question": "Q: ok?"}\n{"clip": "a"}\n'
    )
    (tmp_path / "junk.jsonl").write_text("clip,question\n")
    (tmp_path / "notes.tfrecord").write_text("not a shard")
    return {
        "missing video": (["--video", str(tmp_path / "nope.mp4")],
                          f"{tmp_path / 'nope.mp4'}: no such file or folder"),
        "short video": (["--video", str(short)],
                        f"{short} has 9 frames; a clip needs frames_per_clip = 16"),
        "unreadable video": (["--video", str(tmp_path / "text.mp4")],
                             f"{tmp_path / 'text.mp4'}: not a video PyAV can read"),
        "few frames": (["--frames", str(few)], f"{few} holds 3 frames"),
        "pair without question": (["--questions", str(tmp_path / "pairs.jsonl")],
                                  f'{tmp_path / "pairs.jsonl"} line 2: needs "clip" and '
                                  '"question"'),
        "pairs not JSON": (["--questions", str(tmp_path / "junk.jsonl")],
                           f"{tmp_path / 'junk.jsonl'} line 1: not JSON"),
        "not a shard": (["--tfrecord", str(tmp_path / "notes.tfrecord")],
                        f"reading {tmp_path / 'notes.tfrecord'} failed (exit status 1): "
                        f"{tmp_path / 'notes.tfrecord'} is not a TFRecord shard"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["missing video", "short video", "unreadable video", "few frames", "pair without question",
     "pairs not JSON", "not a shard"],
)  # fmt: skip
def test_a_bad_clip_or_questions_file_is_named_before_any_model_loads(
    tiny_setup, unloadable_run, config, tmp_path, case
):
    args, message = bad_inputs(tiny_setup, tmp_path)[case]
    asked = ["--question", "Q: ok?"] if "--questions" not in args else ["--out", "a.jsonl"]
    with pytest.raises(SystemExit) as stopped:
        main([str(unloadable_run), *args, *asked, "--configfile", str(config["path"])])
    assert str(stopped.value.code).startswith(f"error: {message}")


def test_a_run_without_its_files_is_refused(tmp_path, config):
    with pytest.raises(AskError, match="has no config.yaml"):
        ask(tmp_path, [{"clip": "a.mp4", "question": "Q: ok?"}], config)
    (tmp_path / "config.yaml").write_text("model: {name: x}\n")
    with pytest.raises(AskError, match="has no adapter/ nor merged/"):
        ask(tmp_path, [{"clip": "a.mp4", "question": "Q: ok?"}], config)


def test_frame_settings_other_than_those_of_the_runs_data_are_refused(unloadable_run, config):
    metadata = unloadable_run.parent / "data" / "metadata.json"  # results/data/ beside the run
    metadata.parent.mkdir()
    metadata.write_text(json.dumps({"frames": {"per_clip": 16, "size": [288, 288],
                                               "jpeg_quality": QUALITY}}))  # fmt: skip
    with pytest.raises(AskError, match=rf"frame_size = {FRAME_SIZE} in the config, but the run's "
                                       r"frames were made with frame_size = 288"):  # fmt: skip
        ask(unloadable_run, [{"clip": "a.mp4", "question": "Q: ok?"}], config)


def test_a_merged_run_answers_as_its_adapter(tiny_setup, run_dir, config, tmp_path):
    merged_run = tmp_path / "stage1"  # a run with merged/ only: the merged weights are used
    (merged_run / "merged").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", merged_run)
    base = AutoModelForImageTextToText.from_pretrained(tiny_setup["model"])
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    merged.save_pretrained(merged_run / "merged")
    AutoProcessor.from_pretrained(tiny_setup["model"]).save_pretrained(merged_run / "merged")
    pairs = [{"clip": str(tiny_setup["images"] / clip), "question": "put cup Q: satisfied?"}
             for clip in CLIPS]  # fmt: skip
    assert ask(merged_run, pairs, config) == ask(run_dir, pairs, config)
    with pytest.raises(AskError, match="has no merged/"):
        ask(run_dir, pairs, config, merged=True)


def test_a_relative_model_folder_is_taken_from_the_runs_workflow_directory(tmp_path, monkeypatch):
    workflow = tmp_path / "demo"  # `snakemake --directory demo`: model.name results/models/tiny
    (workflow / "results/models/tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    run = Path("demo/results/stage2")
    assert model_source("results/models/tiny", run) == "demo/results/models/tiny"
    assert model_source("OpenGVLab/InternVL3-8B-hf", run) == "OpenGVLab/InternVL3-8B-hf"
    monkeypatch.chdir(workflow)  # asked from the workflow directory itself
    assert model_source("results/models/tiny", Path("results/stage2")) == "results/models/tiny"


# Written in a child: making a shard takes TensorFlow, which must not load in this process.
MAKE_SHARD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from robovqa_ft.data.demo_bucket import qa_block, sequence_example, write_tfrecord
    from robovqa_ft.data.frames import extract_shard
    images, shard, out, size, quality = sys.argv[1:]
    frames = {clip: [p.read_bytes() for p in sorted(Path(images, clip).iterdir())]
              for clip in ("val-000", "val-001")}
    text = qa_block("past_description:freeform", "", "what just happened?", "pick up the cup")
    records = [sequence_example(clip, jpegs, text)
               for clip, jpegs in frames.items()]
    write_tfrecord(shard, records)
    extract_shard(shard, Path(shard).name, Path(out) / "images", Path(out) / "staging",
                  Path(out) / "index.jsonl", (int(size), int(size)), 16, int(quality))
""")


@pytest.mark.slow
def test_a_tfrecord_clip_is_read_in_a_child_and_tensorflow_never_loads_here(
    tiny_setup, run_dir, config, tmp_path
):
    shard = tmp_path / "val-00000-of-00001"
    subprocess.run([sys.executable, "-c", MAKE_SHARD, str(tiny_setup["images"]), str(shard),
                    str(tmp_path / "extraction"), str(FRAME_SIZE), str(QUALITY)],
                   check=True)  # fmt: skip
    question = "put cup Q: satisfied?"
    from_shard = ask(run_dir, [{"clip": "val-001", "question": question}], config, tfrecord=shard)
    folder = tmp_path / "extraction/images/val-001"
    assert from_shard == ask(run_dir, [{"clip": str(folder), "question": question}], config)
    assert "torch" in sys.modules and "tensorflow" not in sys.modules
