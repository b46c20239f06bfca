"""The torch benchmarks run end to end at tiny size and print every figure they promise."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def table(script: str, *args: str) -> list[list[str]]:
    """The rows of the benchmark's ` | ` table that follow each header line."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return [line.split(" | ") for line in result.stdout.splitlines() if " | " in line]


def number(text: str) -> float:
    return float(text.rstrip("%x"))


@pytest.mark.slow
def test_train_step_prints_one_line_per_setup_and_stage(tmp_path):
    rows = table("train_step.py", "--tiny", "--workdir", str(tmp_path))
    header = rows[0]
    assert header[-8:] == ["s/step", "tokens/s", "TFLOP/s", "MFU", "peak GB", "real tokens",
                           "executed TFLOP/step (counted)", "samples/step"]  # fmt: skip
    lines = [r for r in rows[1:] if r[0] in ("stage1", "stage2")]
    trees = [r for r in rows[1:] if r[0] == "stage1 tree"]
    setups = {tuple(r[1:6]) for r in lines}
    assert len(lines) == 2 * len(setups) >= 16  # every setup, both stages
    assert {r[1] for r in lines} == {"QLoRA nf4", "LoRA float32"}
    assert {r[2] for r in lines} == {"gc on", "gc off"}
    assert {r[5] for r in lines} == {"longest", "grouped", "packed"}
    assert {r[4] for r in lines} >= {"2", "8"}
    for r in lines + trees:
        seconds, tokens_per_s, tflops = map(number, r[6:9])
        assert seconds > 0 and tokens_per_s > 0 and tflops > 0, r
        assert 0 < number(r[11]) <= 100
        # what the kernels execute is at least the model FLOPs (padding, recompute, masks),
        # within what the printed seconds' two decimals lose (~0.1 s steps here: 5%)
        assert number(r[12]) >= tflops * seconds * 0.95, r
        if r[5] == "packed":
            assert r[11] == "100.0%"
        # --tiny's 16 samples a step, as the collator counted them: stage 1's separate
        # lines too, whatever config.yaml's stage-1 layout (a tree one made them 8)
        assert r[13] == "16", r
    # stage 1 as trees, for the seed's and bf16 LoRA's configurations: whole clips of as
    # many questions a step as the separate line's, with fewer model FLOPs (the prefix and
    # the frames once a clip)
    separate = {tuple(r[1:6]): r for r in lines if r[0] == "stage1"}
    assert [tuple(r[1:6]) for r in trees] == [
        ("QLoRA nf4", "gc on", "sdpa", "2", "longest"),
        ("LoRA float32", "gc on", "sdpa", "2", "longest"),
    ]
    for r in trees:
        alone = separate[tuple(r[1:6])]
        assert r[13] == alone[13] == "16"
        assert number(r[8]) * number(r[6]) < 0.9 * number(alone[8]) * number(alone[6]), r
    assert (tmp_path / "model-tiny" / "config.json").exists()  # kept for the next run


@pytest.fixture
def stage1_clip(tmp_path) -> tuple[list[dict], list[dict]]:
    """One synthetic clip's stage-1 questions encoded at config.yaml's settings (tiny
    processor), and its trees as the training builds them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import processor_for, stage_dataset, write_clips

    from robovqa_ft.training.trees import ClipTrees

    paths = write_clips(tmp_path / "clips", 4)
    clips = ClipTrees(stage_dataset(processor_for(paths, image_size=56), paths, "stage1"))
    clip = max(range(len(clips)), key=lambda c: clips.questions[c])
    return [clips.dataset[i] for i in clips.members[clip]], clips[clip]


def test_train_step_counts_a_tree_as_its_real_tokens_with_the_prefix_once(stage1_clip):
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import language_sizes, lora_parameters, model_flops, tree_squares, visual_flops
    from transformers import InternVLConfig

    from robovqa_ft.training.attention import BRANCH, visibility
    from robovqa_ft.training.random_model import INTERNVL3_8B

    questions, (tree,) = stage1_clip
    k, length = len(questions), len(tree["input_ids"])
    prefix = int((tree[BRANCH] == 0).sum())
    assert k >= 3 and prefix > 0
    # in units of a causal T² (T(T+1)/2 query-key pairs, T² in the formula): twice the
    # pairs the tree's own mask lets attend, less the diagonal's T
    seen = visibility(torch.zeros(1, length), tree[BRANCH][None], torch.ones(1, length, dtype=bool))
    assert tree_squares(tree) == 2 * int(seen.sum()) - length
    config = InternVLConfig(**copy.deepcopy(INTERNVL3_8B))
    lora = lora_parameters(config, 128)

    def flops(samples: list[dict], squares: list[int] | None = None) -> float:
        labelled = sum(int((s["labels"] != -100).sum()) for s in samples)
        visual = sum(visual_flops(config, s) for s in samples)
        return model_flops(config, [len(s["input_ids"]) for s in samples], labelled, visual,
                           lora, squares)  # fmt: skip

    # the questions apart count the prefix, its attention square and the frames k times;
    # the tree once, and nothing else differs (the same branches, the same labels)
    n_lm, layers, d = language_sizes(config)
    frames = visual_flops(config, tree)
    assert frames == model_flops(config, [], 0, frames, lora) > 0
    assert all(visual_flops(config, q) == frames for q in questions)
    repeated = (4 * n_lm + 6 * lora) * prefix + 6 * layers * d * prefix**2 + frames
    assert flops(questions) - flops([tree], [tree_squares(tree)]) == (k - 1) * repeated


def test_train_step_tree_steps_are_whole_clips_of_exactly_the_separate_steps_questions():
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import whole_clip_steps

    questions = [2, 7, 3, 5, 4, 2, 6, 3, 7, 7]
    steps = whole_clip_steps(questions, 32, 6)  # 6 steps of 32 from 46 questions: round again
    assert len(steps) == 6 and all(sum(questions[c] for c in step) == 32 for step in steps)
    assert {c for step in steps for c in step} == set(range(len(questions)))
    # 7 + 7 leaves 2, which no clip fills: the 3 comes first and a 7 waits
    sevens = [7, 7, 3]
    assert [sum(sevens[c] for c in step) for step in whole_clip_steps(sevens, 16, 3)] == [16] * 3
    with pytest.raises(ValueError, match="make 6"):
        whole_clip_steps([4, 4], 6, 1)


def test_train_step_flops_follow_the_stated_formula():
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import model_flops, tile_flops, visual_flops
    from transformers import InternVLConfig

    from robovqa_ft.training.random_model import INTERNVL3_8B

    arch = INTERNVL3_8B
    config = InternVLConfig(
        vision_config={**arch["vision_config"], "image_size": [448, 448]},
        text_config=arch["text_config"], image_seq_length=256, tie_word_embeddings=False,
    )  # fmt: skip
    no_lora = model_flops(config, [1000], labelled=10, visual=0, lora_params=0)
    # The decoder layers: the language model's 7,069,221,376 parameters less 333,312
    # biases and norm weights and the 543,599,616 of the embedding, 4 FLOPs each per
    # token; the head (3584 x 151674) the same on the 10 labelled tokens alone; causal
    # attention.
    head = 3584 * 151674
    assert no_lora == 4 * 6_525_288_448 * 1000 + 4 * head * 10 + 6 * 28 * 3584 * 1000**2
    more_labels = model_flops(config, [1000], labelled=11, visual=0, lora_params=0)
    assert more_labels - no_lora == 4 * head  # a token more to predict: only the head's
    one_tile = tile_flops(config)
    assert 2 * 300e6 * 1025 < one_tile < 2 * 340e6 * 1025 * 1.3  # ViT-300M + projector
    # the vision side of a sample (or tree, or micro-batch): its tiles, each once
    assert visual_flops(config, {"pixel_values": torch.zeros(3, 1)}) == 3 * one_tile
    assert visual_flops(config, {"input_ids": torch.zeros(5)}) == 0  # text alone


def slot_report(tmp_path: Path, *args: str) -> list[str]:
    """The lines of gpu_slot.md from a tiny rehearsal of the GPU slot's benchmark."""
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_slot.py"), "--tiny", "--out", str(out),
         "--workdir", str(tmp_path / "work"), *args],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return (out / "gpu_slot.md").read_text().splitlines()


@pytest.fixture(scope="module")
def slot_run(tmp_path_factory) -> list[str]:
    """One tiny rehearsal, run once for the tests that read it: InternVL's setups 1 (the
    seed's), 3 (bf16 LoRA, Qwen3-VL's one setup too) and 7 (packed), with a budget that
    covers them all."""
    return slot_report(tmp_path_factory.mktemp("gpu_slot"), "--only", "1", "3", "7",
                       "--budget-seconds", "600")  # fmt: skip


# InternVL's setups of `slot_run`, by their labels (train_step's `Setup.label`)
SLOT_SETUPS = {
    "1": ["QLoRA nf4", "gc on", "sdpa", "2", "longest"],
    "3": ["LoRA float32", "gc on", "sdpa", "2", "longest"],
    "7": ["LoRA float32", "gc on", "sdpa", "8", "packed"],
}


@pytest.mark.slow
def test_gpu_slot_reports_versions_each_setup_of_both_runs_and_the_default(slot_run):
    lines = slot_run
    for package in ("python", "torch", "transformers", "peft", "accelerate"):
        assert re.search(rf", {package} [0-9][^ ]* \(/", lines[0]), package  # version, folder
    phases = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert [lines[i].split(":")[0] for i in phases] == ["## smoke", "## smoke", "## full size",
                                                        "## full size"]  # fmt: skip
    internvl = [i for i in phases if lines[i].startswith(("## smoke: InternVL",
                                                           "## full size: InternVL"))]  # fmt: skip
    assert internvl == phases[1:3]
    for start in internvl:
        end = next((i for i in phases if i > start), len(lines))
        rows = [line.split(" | ") for line in lines[start:end] if line.startswith("stage")]
        measured = [r[:6] for r in rows if r[1] != "quantization"]
        assert measured == [  # the baselines (1, 3) measure stage 1 as trees too
            [stage, *SLOT_SETUPS[n]]
            for n, stages in (("1", ("stage1", "stage2", "stage1 tree")),
                              ("3", ("stage1", "stage2", "stage1 tree")),
                              ("7", ("stage1", "stage2")))
            for stage in stages
        ]  # fmt: skip
        assert all(float(r[6]) > 0 for r in rows if r[1] != "quantization")  # s/step
        per_step = re.search(r", (\d+) samples a step", lines[start]).group(1)  # 8, then 16
        questions = {r[0]: r[13] for r in rows if r[1] == "QLoRA nf4"}
        assert questions == {"stage1": per_step, "stage2": per_step, "stage1 tree": per_step}
    # InternVL's default, before Qwen3-VL's full-size run: the fastest stage 1 + stage 2
    # of the full-size run's setups (no peak memory on a CPU: every one fits)
    default = re.fullmatch(r"default: setup ([137]), (.*): stage 1 \+ stage 2 = ([\d.]+) s a "
                           r"step, peak memory not measured on a CPU \(the fastest of 3 within "
                           r"60 GB\)", lines[phases[3] - 1])  # fmt: skip
    assert default, lines[phases[3] - 1]
    assert default.group(2).split(" | ") == SLOT_SETUPS[default.group(1)]
    rows = [line.split(" | ") for line in lines[phases[2] : phases[3]]]
    seconds = {n: sum(float(r[6]) for r in rows if r[0] in ("stage1", "stage2") and r[1:6] == s)
               for n, s in SLOT_SETUPS.items()}  # fmt: skip
    assert seconds[default.group(1)] == pytest.approx(float(default.group(3)), abs=0.015)
    assert seconds[default.group(1)] <= min(seconds.values()) + 0.015  # printed to 0.01 s
    assert lines[-1].startswith("# done in")


@pytest.mark.slow
def test_gpu_slot_stops_cleanly_when_its_budget_is_spent(tmp_path):
    lines = slot_report(tmp_path, "--budget-seconds", "0")  # and exits 0
    skipped = [line for line in lines if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].endswith("; the full-size run")
    orders = [line for line in lines if line.startswith("order (")]  # Qwen3-VL's, InternVL's
    assert len(orders) == 2
    assert re.findall(r"setup (\d+) \(", skipped[0]) == [
        n for order in orders for n in re.findall(r"setup (\d+) ", order)
    ]
    assert re.search(r": Qwen3-VL setup 3 \(.*; InternVL setup 1 \(", skipped[0])
    assert not [line for line in lines if line.startswith(("stage1 | QLoRA", "stage1 | LoRA"))]


@pytest.mark.slow
def test_gpu_slot_measures_qwen3_vl_after_internvl_with_its_frames_as_one_video(slot_run):
    lines = slot_run
    phases = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert [lines[i].split(",")[0] for i in phases] == [
        "## smoke: Qwen3-VL tiny", "## smoke: InternVL tiny",
        "## full size: InternVL tiny", "## full size: Qwen3-VL tiny",
    ]  # fmt: skip
    assert not [line for line in lines if "cannot build" in line or "failed" in line]
    # the InternVL run leaves Qwen3-VL twice its smoke run's time, said before it starts
    assert re.fullmatch(r"# \d+ s of the budget kept for Qwen3-VL", lines[phases[2] - 1])
    for start in (phases[0], phases[3]):
        assert lines[start].endswith("frames as one video, 81 tokens a frame pair")  # 288 px
        end = next((i for i in phases if i > start), len(lines))
        rows = [line.split(" | ") for line in lines[start:end] if line.startswith("stage")]
        measured = [r for r in rows if r[1] != "quantization"]
        assert [r[:6] for r in measured] == [
            [stage, "LoRA float32", "gc on", "sdpa", "2", "longest"]
            for stage in ("stage1", "stage2", "stage1 tree")
        ]
        per_step = re.search(r", (\d+) samples a step", lines[start]).group(1)  # 8, then 16
        assert all(float(r[6]) > 0 and float(r[12]) > 0 and r[13] == per_step for r in measured)
    assert lines[phases[3] - 1].startswith("default: setup ")  # InternVL's, before Qwen3-VL
    assert lines[-1].startswith("# done in")


def test_gpu_slot_runs_qwen3_vl_only_where_only_names_its_setup():
    """`--only` picks both models' setups: Qwen3-VL runs setup 3 alone, or nothing."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_slot import INTERNVL, QWEN3_VL, model_setups

    for flash in (False, True):
        assert model_setups(QWEN3_VL, flash, [1, 7]) == []
        assert [n for n, _ in model_setups(QWEN3_VL, flash, [7, 3, 1])] == [3]
        assert [n for n, _ in model_setups(QWEN3_VL, flash)] == [3]
        assert [n for n, _ in model_setups(INTERNVL, flash, [7, 3, 1])] == [7, 3, 1]


@pytest.mark.parametrize("family", ["internvl", "qwen3_vl"])
def test_gpu_slot_builds_in_memory_the_model_load_model_loads(tmp_path, family):
    """Same modules, dtypes, trainable weights and outputs as loading the same random
    weights through `load_model`, in bf16 LoRA and in nf4, for each family it builds."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_slot import INTERNVL, QWEN3_VL, build_model
    from synthetic import write_clips
    from train_step import LORA, Setup
    from transformers import AutoModelForImageTextToText

    from robovqa_ft.training.model import attach_lora, load_model

    model = {"internvl": INTERNVL, "qwen3_vl": QWEN3_VL}[family]
    processor = model.make_processor(write_clips(tmp_path / "clips", 2), "tiny")
    config = model.make_config("tiny", processor)
    assert config.model_type == family
    torch.manual_seed(0)  # as build_model seeds its weights
    saved = AutoModelForImageTextToText.from_config(copy.deepcopy(config))
    saved.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    input_ids = torch.randint(10, 200, (1, 16))  # text only: no image token
    for quantization in ("none", "nf4"):
        setup = Setup(quantization, True, "sdpa", 2, "longest")
        built = build_model(config, setup, torch.float32, "cpu")
        loaded = attach_lora(load_model(tmp_path / "model", quantization, "float32", "sdpa",
                                        gradient_checkpointing=True), **LORA)  # fmt: skip
        assert [(n, type(m)) for n, m in built.named_modules()] == [
            (n, type(m)) for n, m in loaded.named_modules()
        ]
        assert [(n, p.dtype, p.requires_grad) for n, p in built.named_parameters()] == [
            (n, p.dtype, p.requires_grad) for n, p in loaded.named_parameters()
        ]
        assert sum(p.requires_grad for p in built.parameters()) > 0
        with torch.no_grad():  # LoRA starts at zero: the base model's outputs
            logits = [m.eval()(input_ids=input_ids).logits for m in (built, loaded)]
        torch.testing.assert_close(*logits, rtol=0, atol=0)


@pytest.mark.slow
def test_padding_benchmark_measures_every_strategy():
    rows = table("padding.py", "--tiny")
    shares = {(r[0], r[1], r[2]): number(r[3]) for r in rows if len(r) == 4 and r[3].endswith("%")}
    for stage in ("stage1", "stage2"):
        for micro_batch in ("2", "4"):
            longest, grouped, packed = (shares[(stage, micro_batch, p)]
                                        for p in ("longest", "grouped", "packed"))  # fmt: skip
            assert longest <= grouped <= packed == 100.0
    sizes = {r[0]: r[2] for r in rows if len(r) == 3 and r[0] in ("stage1", "stage2")}
    stage1_mean = number(sizes["stage1"].split(",")[0])
    assert 4 * 258 < stage1_mean < 2048  # four 448 px frames and a question


@pytest.mark.slow
def test_dataloader_benchmark_reports_rates_and_parts():
    rows = table("dataloader.py", "--tiny")
    rows = [r for r in rows if r[0] in ("stage1", "stage2")]
    rates = {(r[0], r[1]): (number(r[2]), number(r[3])) for r in rows if len(r) == 4}
    assert set(rates) >= {("stage1", "1"), ("stage2", "1")}
    assert all(rate > 0 for pair in rates.values() for rate in pair)
    parts = {(r[0], r[1]) for r in rows if len(r) == 3}
    assert parts >= {("stage1", "decode"), ("stage1", "encode"), ("stage2", "collate")}


@pytest.fixture(scope="module")
def flops_rows(tmp_path_factory) -> list[list[str]]:
    """The tables of one tiny run of flops.py, for the tests below."""
    return table("flops.py", "--tiny", "--workdir", str(tmp_path_factory.mktemp("flops")))


def close(a: float, b: float) -> bool:  # the tables round to 4 significant digits
    return abs(a - b) <= 1e-2 * abs(b)


@pytest.mark.slow
def test_flops_benchmark_counts_every_group_and_the_recompute_beside_the_formula(flops_rows):
    rows = flops_rows
    header = [r for r in rows if r[0] == "stage"]
    assert header[0] == ["stage", "checkpointing", "vision", "projector", "language model",
                         "LoRA", "head", "other", "recompute", "executed", "model",
                         "executed/model"]  # fmt: skip
    assert header[1] == ["stage", "checkpointing", "group", "forward", "backward", "recompute"]
    names = header[0][2:]
    steps = {(r[0], r[1]): dict(zip(names, map(float, r[2:]), strict=True))
             for r in rows if len(r) == len(names) + 2 and r[0] != "stage"}  # fmt: skip
    phases = {(r[0], r[1], r[2]): tuple(map(float, r[3:]))
              for r in rows if len(r) == 6 and r[0] != "stage"}  # fmt: skip
    runs = {(stage, gc) for stage in ("stage1", "stage2") for gc in ("gc off", "gc on")}
    assert set(steps) == runs
    assert {key[:2] for key in phases} == runs and {key[2] for key in phases} == set(names[:6])
    for (stage, gc), f in steps.items():
        assert all(f[g] > 0 for g in ("vision", "projector", "language model", "LoRA", "head"))
        assert f["other"] == 0  # every counted FLOP belongs to a group
        assert close(f["executed"], sum(f[g] for g in names[:7]))
        assert close(f["executed/model"], f["executed"] / f["model"])
        assert phases[stage, gc, "vision"][1:] == (0, 0)  # the frozen vision runs forward only
        forward, backward, recompute = phases[stage, gc, "language model"]
        assert backward > 0
        if gc == "gc off":
            assert f["recompute"] == 0
            assert 0.9 < f["executed/model"] <= 1.05
        else:  # the language model's forward, once more
            assert close(recompute, forward) and f["recompute"] > recompute
    assert steps["stage2", "gc off"]["executed"] > steps["stage1", "gc off"]["executed"]


@pytest.mark.slow
def test_flops_benchmark_counts_fewer_flops_per_question_for_stage1_trees(flops_rows):
    start = flops_rows.index(["stage1 per question", "separate", "tree", "separate/tree"])
    lines = {r[0]: r[1:] for r in flops_rows[start + 1 :]}
    assert list(lines) == ["vision", "projector", "language model", "LoRA", "head", "other",
                           "recompute", "executed"]  # fmt: skip
    per_question = {name: (float(r[0]), float(r[1])) for name, r in lines.items()}
    ratios = {name: number(r[2]) for name, r in lines.items() if r[2] != "-"}
    assert per_question["other"] == (0, 0) and lines["other"][2] == "-"
    separate, tree = per_question["executed"]
    assert ratios["executed"] > 1 and close(ratios["executed"], separate / tree)
    for name in ("vision", "projector", "language model", "LoRA", "head", "recompute"):
        assert per_question[name][1] > 0 and ratios[name] >= 1, name
    # the frames run once a clip instead of once a question: 3.6 questions a clip
    assert ratios["vision"] == ratios["projector"] == 3.6
    assert ratios["head"] == 1  # the same labelled tokens, whichever the layout
    assert close(tree, sum(per_question[name][1] for name in list(lines)[:-1]))


@pytest.mark.slow
def test_eval_cost_counts_both_formats_answers_and_controls_of_every_run():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "eval_cost.py"), "--answers-per-family", "10"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    # 6 score groups answered, the 2 yes/no ones also on blank and other-clip frames
    assert lines[0].startswith("per run and format: 60 answers + 40 control = 100 generations")
    assert [line.split()[0] for line in lines[1:3]] == ["stage1", "stage2"]
    seconds = [float(m) for m in re.findall(r"([\d.]+) s\b", result.stdout)]
    assert len(seconds) == 5 and all(s > 0 for s in seconds)
    assert re.search(r"4 runs: [\d.]+ GPU-hours \(counted", lines[-1])


def synthetic_step(lengths: list[int], labelled: int, tiles: int) -> list[dict]:
    """Samples shaped like encoded ones, as far as the FLOP count reads them."""
    labels = [torch.tensor([-100] * (t - labelled) + [1] * labelled) for t in lengths]
    return [{"input_ids": torch.zeros(t), "labels": label, "pixel_values": torch.zeros(tiles, 1)}
            for t, label in zip(lengths, labels, strict=True)]  # fmt: skip


def test_gpu_slot_orders_setups_by_counted_flops_and_packing_under_sdpa_goes_last():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_slot import BASELINES, flop_order, slot_setups
    from train_step import Setup, executed_flops, language_sizes, lora_parameters, visual_flops
    from transformers import InternVLConfig

    from robovqa_ft.training.random_model import INTERNVL3_8B

    config = InternVLConfig(**copy.deepcopy(INTERNVL3_8B))
    lora = lora_parameters(config, 128)
    # stage 2 at real lengths: 8 clips of 2.4k-3.1k tokens in one micro-batch
    lengths = [2400 + 100 * i for i in range(8)]
    padded, packed = Setup("none", False, "sdpa", 8, "longest"), Setup("none", False, "sdpa", 8,
                                                                       "packed")  # fmt: skip
    flash_packed = Setup("none", False, "flash_attention_2", 8, "packed")
    frames = visual_flops(config, {"pixel_values": torch.zeros(80, 1)})  # 80 tiles
    counts = {s: executed_flops(config, s, lengths, 600, frames, lora)
              for s in (padded, packed, flash_packed)}  # fmt: skip
    assert counts[flash_packed] < counts[padded] < counts[packed]
    # packed: one 22k-token row whose block mask makes SDPA compute its whole square, ~6x
    # the padded rows' squares; padded: 8 rows of the longest, padding computed
    n_lm, layers, d = language_sizes(config)
    total, longest = sum(lengths), max(lengths)
    attention = 12 * layers * d * (total**2 - 8 * longest**2)
    linear = (4 * n_lm + 6 * lora) * (8 * longest - total)
    assert counts[packed] - counts[padded] == attention - linear
    assert total**2 / (8 * longest**2) > 6
    steps = {stage: synthetic_step(lengths if stage == "stage2" else [1100 + 20 * i for i in
                                   range(8)], 40, 10 if stage == "stage2" else 4)
             for stage in ("stage1", "stage2")}  # fmt: skip
    for flash in (False, True):
        ordered, left_out = flop_order(slot_setups(flash), config, steps, per_step=8)
        numbers = [n for (n, _), _ in ordered]
        assert tuple(numbers[:2]) == BASELINES
        flops = [f for _, f in ordered[2:]]
        assert flops == sorted(flops)
        assert {(s.padding, s.attention) for (_, s), _ in left_out} == {("packed", "sdpa")}
        assert len(left_out) == 2 and not set(numbers) & {n for (n, _), _ in left_out}
        if flash:  # flash-attention unpads: a padded micro-batch's attention costs no more
            by_setup = {s: f for (_, s), f in ordered}
            flash_padded = Setup("none", True, "flash_attention_2", 8, "longest")
            assert by_setup[flash_padded] < by_setup[Setup("none", True, "sdpa", 8, "longest")]


def test_train_step_counts_qwen3_vl_with_its_language_terms_and_its_own_vision():
    """Qwen3-VL-8B's count, as the GPU slot takes it: train_step's language terms of its
    text config and its vision tower's (`visual_flops`), from the weights the model has;
    its frames as images cost twice their video; a tree's frames counted once."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import (
        ClipSteps,
        Setup,
        language_sizes,
        lora_parameters,
        model_flops,
        step_flops,
        tree_step_flops,
        visual_flops,
    )
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig

    from robovqa_ft.training.attention import BRANCH
    from robovqa_ft.training.random_model import QWEN3_VL_8B

    config = Qwen3VLConfig(**copy.deepcopy(QWEN3_VL_8B), tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    weights = {"blocks": 0, "mergers": 0, "language": 0}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.startswith("model.visual."):
                weights["mergers" if "merger" in name else "blocks"] += module.weight.numel()
            elif ".language_model.layers." in name:
                weights["language"] += module.weight.numel()
    assert language_sizes(config) == (weights["language"], 36, 4096)
    # two 288 px frame pairs: 18 x 18 patches each, attending within their pair
    grid = torch.tensor([[2, 18, 18]])
    vision = visual_flops(config, {"video_grid_thw": grid})
    assert vision == (2 * weights["blocks"] * 648 + 2 * weights["mergers"] * 162
                      + 4 * 27 * 1152 * 2 * 324**2)  # fmt: skip
    # the same 4 frames as images: one temporal patch each (the frame twice), so twice
    # the patches and twice the attention groups
    assert visual_flops(config, {"image_grid_thw": torch.tensor([[1, 18, 18]] * 4)}) == 2 * vision

    lora = lora_parameters(config, 128)
    lengths, labelled = [300, 250], 20
    samples = [{"input_ids": torch.zeros(t), "video_grid_thw": grid,
                "labels": torch.tensor([-100] * (t - 10) + [1] * 10)} for t in lengths]  # fmt: skip
    setup = Setup("none", True, "sdpa", 2, "longest")
    counted, executed = step_flops(config, setup, samples, 2, lora)
    assert counted == model_flops(config, lengths, labelled, 0, lora) + 2 * vision
    assert executed > counted  # padding and checkpointing's second forward

    bare = {"input_ids": torch.zeros(300), "labels": torch.tensor([-100] * 290 + [1] * 10),
            BRANCH: torch.tensor([0] * 200 + [1] * 50 + [2] * 50)}  # fmt: skip
    (with_frames, with_executed), (without, without_executed) = (
        tree_step_flops(config, setup, ClipSteps([[tree]], [2], [300], 2, [[0]]), [[(0,)]], lora)
        for tree in ({**bare, "video_grid_thw": grid}, bare)
    )  # fmt: skip
    assert with_frames - without == with_executed - without_executed == vision  # once
