"""Answers about clips the workflow never saw, from a trained run (its adapter or merged
model): the library of `robovqa-ask` (ask.py, its command line).

A clip becomes `frames_per_clip` frames as extraction stores them (a video's spread evenly
over it, decoded by PyAV; each resized to `frame_size` and JPEG'd at `jpeg_quality` by
extraction's own function), training's frame choice takes the run's `max_frames` of them,
the prompt is the run's training prompt for the question alone, and evaluation's generation
loop answers (greedy, batched by `evaluation.generation_batch_size`). A TFRecord is decoded
in a child process (`robovqa_ft.data.record_frames`): TensorFlow never joins this one, which
holds torch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import yaml
from peft import PeftModel
from PIL import Image
from tqdm import tqdm

from robovqa_ft.core.files import atomic_open
from robovqa_ft.core.settings import check_config
from robovqa_ft.data import record_frames
from robovqa_ft.data.frames import frame_name, resize_jpeg, resized_jpeg
from robovqa_ft.data.record_frames import CLIPS_FILE
from robovqa_ft.evaluation.generation import answer_batches
from robovqa_ft.training.families import Family, model_family
from robovqa_ft.training.model import check_adapter, load_model, load_processor
from robovqa_ft.training.samples import SampleBuilder, frame_indices

log = logging.getLogger(__name__)

WORKFLOW_DIR = Path(__file__).resolve().parents[2]  # where config/schema.yaml is
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what a folder of frames holds


class AskError(ValueError):
    """A run, clip or questions file that cannot be asked about; the message says why."""


# --- settings ------------------------------------------------------------------------------


def workflow_config(path: Path | str) -> dict:
    """The workflow config the run's data was made with, checked as the workflow checks it:
    it gives the frames' size, quality and count and the evaluation's generation settings."""
    path = Path(path)
    if not path.is_file():
        raise AskError(
            f"no config file {path}: give --configfile, the workflow config the run's data was "
            "made with (config/demo.yaml for the demo)"
        )
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    check_config(config, WORKFLOW_DIR)
    return config


def check_frames_match_data(run_dir: Path, config: dict) -> None:
    """Refuse frame settings other than those the run's training frames were made with, when
    the workflow's metadata.json sits beside the run (`results/data/`)."""
    metadata = run_dir.parent / "data" / "metadata.json"
    if not metadata.is_file():
        return
    frames = json.loads(metadata.read_text(encoding="utf-8"))["frames"]
    made = {"frame_size": frames["size"][0], "jpeg_quality": frames["jpeg_quality"],
            "frames_per_clip": frames["per_clip"]}  # fmt: skip
    for key, value in made.items():
        if config[key] != value:
            raise AskError(
                f"{key} = {config[key]} in the config, but the run's frames were made with "
                f"{key} = {value} ({metadata}): give the --configfile the run was made with"
            )


def read_run(run_dir: Path, merged: bool = False) -> tuple[dict, Path]:
    """The run's settings (the config.yaml training wrote) and its weights' folder: the
    adapter (what evaluation scores), or `merged/` when asked for or the only one there."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise AskError(f"{run_dir} is not a training run: it has no config.yaml (training "
                       "writes it), e.g. results/stage2")  # fmt: skip
    settings = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    adapter, merged_dir = run_dir / "adapter", run_dir / "merged"
    if merged or not adapter.is_dir():
        if merged_dir.is_dir():
            return settings, merged_dir
        wanted = "merged/" if merged else "adapter/ nor merged/"
        raise AskError(f"{run_dir} has no {wanted}: the run has not finished (or not merged)")
    try:
        check_adapter(adapter, settings["model"]["name"])
    except ValueError as error:
        raise AskError(str(error)) from None
    return settings, adapter


def model_source(name: str, run_dir: Path) -> str:
    """Where the run's base model is: `name` itself, or a relative folder taken from the
    run's workflow directory (RUN_DIR/../..), as the demo's `results/models/tiny` is."""
    beside = run_dir.parent.parent / name
    if not Path(name).expanduser().exists() and not Path(name).is_absolute() and beside.is_dir():
        return str(beside)
    return name


def load_answerer(settings: dict, weights: Path, run_dir: Path) -> tuple[Any, Any, Family]:
    """(model in eval mode, processor, family) as evaluation loads them: the base with the
    adapter, or the merged folder (its weights in the compute dtype, with its processor)."""
    model = settings["model"]
    # a run from before model.frames_as was trained on Qwen-VL frames as images (InternVL's
    # frames were its video prompt then as now)
    frames_as = model.get("frames_as")
    options = {
        "dtype": model["dtype"],
        "attn_implementation": model["attn_implementation"],
        "gradient_checkpointing": False,
        "max_memory_gb": model.get("max_memory_gb"),
    }
    if weights.name == "merged":
        processor = load_processor(name_or_path=weights)
        family = _family(weights, {}, frames_as)
        net = load_model(name_or_path=weights, quantization="none", **options)
    else:
        base = model_source(model["name"], run_dir)
        # the hub commit training loaded, where its config.yaml records one
        revision = (settings.get("provenance") or {}).get("model_revision") or model.get("revision")
        at = {"revision": revision} if revision else {}
        processor = load_processor(name_or_path=base, **at)
        family = _family(base, at, frames_as)
        net = load_model(name_or_path=base, quantization=model["quantization"], **options, **at)
        net = PeftModel.from_pretrained(net, str(weights))
    net.eval()
    return net, processor, family


def _family(name_or_path: str | Path, at: dict, frames_as: str | None) -> Family:
    if frames_as is None:
        frames_as = "video" if model_family(name_or_path, **at).packs else "images"
    return model_family(name_or_path, **at, frames_as=frames_as)


# --- clips -> frames as extraction stores them ----------------------------------------------


def frame_jpegs(source: Path, config: dict) -> list[bytes]:
    """`frames_per_clip` frames of a folder of frames or of a video, as extraction stores
    them. A folder's frames that are already JPEGs of `frame_size` (extraction's own, e.g.
    results/data/images/<clip>/) are kept as they are: a second JPEG pass would only lose."""
    if source.is_dir():
        return _folder_jpegs(source, config)
    if source.is_file():
        return _video_jpegs(source, config)
    raise AskError(f"{source}: no such file or folder")


def _folder_jpegs(folder: Path, config: dict) -> list[bytes]:
    count, size = config["frames_per_clip"], (config["frame_size"], config["frame_size"])
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if len(files) < count:
        raise AskError(
            f"{folder} holds {len(files)} frames ({', '.join(FRAME_SUFFIXES)} files); a clip "
            f"needs frames_per_clip = {count}"
        )
    jpegs = []
    for path in (files[i] for i in frame_indices(len(files), count)):
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                stored = image.format == "JPEG" and image.size == size
            jpegs.append(data if stored else resize_jpeg(data, size, config["jpeg_quality"])[0])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise AskError(f"{path}: not an image that can be read ({error})") from None
    return jpegs


def _video_jpegs(path: Path, config: dict) -> list[bytes]:
    """Decoded twice: once to count the frames, once to keep the chosen ones, so a long
    video is never held in memory whole."""
    count, size = config["frames_per_clip"], (config["frame_size"], config["frame_size"])
    try:
        total = sum(1 for _ in _decoded(path))
        if total < count:
            raise AskError(
                f"{path} has {total} frames; a clip needs frames_per_clip = {count}, spread "
                "evenly over the video"
            )
        wanted = set(frame_indices(total, count))
        images = [f.to_image() for i, f in enumerate(_decoded(path)) if i in wanted]
    except av.FFmpegError as error:
        raise AskError(f"{path}: not a video PyAV can read ({error})") from None
    return [resized_jpeg(image, size, config["jpeg_quality"]) for image in images]


def _decoded(path: Path) -> Iterator[av.VideoFrame]:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise AskError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from container.decode(stream)


def tfrecord_folders(shard: Path, clips: list[str], out_dir: Path, config: dict) -> dict:
    """Each of `clips` of a TFRecord shard (none: its only record) -> the folder of its
    frames, written by `robovqa_ft.data.record_frames` in a child process: decoding the records
    takes TensorFlow, which must not share this process with torch."""
    command = [sys.executable, "-m", record_frames.__name__, str(shard), str(out_dir),
               "--frame-size", str(config["frame_size"]),
               "--jpeg-quality", str(config["jpeg_quality"]),
               "--frames-per-clip", str(config["frames_per_clip"]),
               *(arg for clip in clips for arg in ("--clip", clip))]  # fmt: skip
    quiet = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}  # TensorFlow's start-up notices
    done = subprocess.run(command, capture_output=True, text=True, env=quiet)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        said = lines[-1].removeprefix("error: ") if lines else "no message"
        raise AskError(f"reading {shard} failed (exit status {done.returncode}): {said}")
    found = json.loads((out_dir / CLIPS_FILE).read_text(encoding="utf-8"))
    return {clip: out_dir / folder for clip, folder in found.items()}


def clip_folders(
    clips: list[str | None], images_dir: Path, config: dict, tfrecord: Path | None = None
) -> dict[str | None, Path]:
    """Each distinct clip -> its folder of `frames_per_clip` frames under `images_dir`. A
    clip is a folder of frames or a video file, or, with `tfrecord`, a clip id of that
    shard (None: its only clip). Every clip is read before any model loads."""
    if tfrecord is not None:
        ids = sorted({clip for clip in clips if clip is not None})
        found = tfrecord_folders(tfrecord, ids, images_dir / "tfrecord", config)
        return {None: next(iter(found.values()))} if not ids else found
    folders = {}
    for k, clip in enumerate(dict.fromkeys(clips)):
        folder = images_dir / "clips" / f"{k:06d}"
        folder.mkdir(parents=True)
        for i, jpeg in enumerate(frame_jpegs(Path(clip), config)):
            (folder / frame_name(i)).write_bytes(jpeg)
        folders[clip] = folder
    return folders


# --- questions and answers -----------------------------------------------------------------


def read_pairs(path: Path) -> list[dict]:
    """The {"clip", "question"} pairs of a JSONL file, or an error naming file and line."""
    if not path.is_file():
        raise AskError(f"{path}: no such file")
    pairs = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as error:
                raise AskError(f"{path} line {number}: not JSON ({error})") from None
            if not isinstance(pair, dict) or not all(
                isinstance(pair.get(key), str) and pair[key].strip() for key in ("clip", "question")
            ):
                raise AskError(
                    f'{path} line {number}: needs "clip" and "question", both non-empty '
                    f'strings, as in {{"clip": "clip.mp4", "question": "Q: satisfied?"}}'
                )
            pairs.append(pair)
    if not pairs:
        raise AskError(f"{path} holds no questions")
    return pairs


def prompt_rows(pairs: list[dict], folders: dict, images_dir: Path, frames: int) -> list[dict]:
    """Each pair as a curriculum row of one question, the answer left empty to generate."""
    rows = []
    for i, pair in enumerate(pairs):
        folder = folders[pair["clip"]].relative_to(images_dir)
        rows.append({
            "id": f"ask-{i:06d}", "video_id": str(pair["clip"]),
            "images": [f"{folder}/{frame_name(j)}" for j in range(frames)],
            "conversations": [{"from": "human", "value": pair["question"].strip()},
                              {"from": "gpt", "value": ""}],
        })  # fmt: skip
    return rows


def ask(
    run_dir: Path | str,
    pairs: list[dict],
    config: dict,
    tfrecord: Path | str | None = None,
    merged: bool = False,
) -> list[str]:
    """The run's answer to each {"clip", "question"} pair, in order (see `clip_folders` for
    what a clip is). `config` is the checked workflow config (`workflow_config`)."""
    run_dir = Path(run_dir)
    settings, weights = read_run(run_dir, merged)
    check_frames_match_data(run_dir, config)
    stage, evaluation = settings["stage"], config["evaluation"]
    with tempfile.TemporaryDirectory(prefix="robovqa-ask-") as tmp:
        images_dir = Path(tmp)
        clips = [pair["clip"] for pair in pairs]
        folders = clip_folders(clips, images_dir, config, Path(tfrecord) if tfrecord else None)
        rows = prompt_rows(pairs, folders, images_dir, config["frames_per_clip"])
        net, processor, family = load_answerer(settings, weights, run_dir)
        log.info("%d questions about %d clips, to %s", len(pairs), len(folders), weights)
        # the run's own training prompt: its stage's frames and sequence length
        builder = SampleBuilder(processor, family, images_dir, stage["max_frames"],
                                stage["max_seq_len"],
                                frame_rate=settings["model"].get("frame_rate"))  # fmt: skip
        budget = stage["max_seq_len"] - evaluation["max_new_tokens"]
        batches = answer_batches(
            net, builder, [(row, 0) for row in rows], budget,
            evaluation["generation_batch_size"], evaluation["max_new_tokens"],
            evaluation["dataloader_workers"], settings["model"]["dtype"],
        )  # fmt: skip
        answers: list[str] = []
        with tqdm(total=len(rows), unit="question", desc="answers") as progress:
            for said in batches:
                answers += said
                progress.update(len(said))
    return answers


def write_answers(path: Path, pairs: list[dict], answers: list[str]) -> None:
    with atomic_open(path) as out:
        for pair, answer in zip(pairs, answers, strict=True):
            line = {"clip": pair["clip"], "question": pair["question"], "answer": answer}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def check_kind(frames: Path | None, video: Path | None) -> None:
    """--frames names a folder and --video a file."""
    if frames is not None and frames.exists() and not frames.is_dir():
        raise AskError(f"--frames {frames} is a file, not a folder of frames (--video?)")
    if video is not None and video.is_dir():
        raise AskError(f"--video {video} is a folder (--frames?)")
