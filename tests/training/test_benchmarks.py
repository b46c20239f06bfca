"""The torch benchmarks run end to end at tiny size and print every figure they promise."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def table(script: str, *args: str) -> list[list[str]]:
    """The rows of the benchmark's ` | ` table that follow each header line."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return [line.split(" | ") for line in result.stdout.splitlines() if " | " in line]


def number(text: str) -> float:
    return float(text.rstrip("%x"))


def test_train_step_prints_one_line_per_setup_and_stage(tmp_path):
    rows = table("train_step.py", "--tiny", "--workdir", str(tmp_path))
    header = rows[0]
    assert header[-6:] == ["s/step", "tokens/s", "TFLOP/s", "MFU", "peak GB", "real tokens"]
    lines = [r for r in rows[1:] if r[0] in ("stage1", "stage2")]
    setups = {tuple(r[1:6]) for r in lines}
    assert len(lines) == 2 * len(setups) >= 16  # every setup, both stages
    assert {r[1] for r in lines} == {"QLoRA nf4", "LoRA float32"}
    assert {r[2] for r in lines} == {"gc on", "gc off"}
    assert {r[5] for r in lines} == {"longest", "grouped", "packed"}
    assert {r[4] for r in lines} >= {"2", "8"}
    for r in lines:
        seconds, tokens_per_s, tflops = map(number, r[6:9])
        assert seconds > 0 and tokens_per_s > 0 and tflops > 0, r
        assert 0 < number(r[11]) <= 100
        if r[5] == "packed":
            assert r[11] == "100.0%"
    assert (tmp_path / "model-tiny" / "config.json").exists()  # kept for the next run


def test_train_step_flops_follow_the_stated_formula():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import model_flops
    from transformers import InternVLConfig

    from robovqa_ft.random_model import INTERNVL3_8B

    arch = INTERNVL3_8B
    config = InternVLConfig(
        vision_config={**arch["vision_config"], "image_size": [448, 448]},
        text_config=arch["text_config"], image_seq_length=256, tie_word_embeddings=False,
    )  # fmt: skip
    no_lora = model_flops(config, [1000], tiles=0, lora_params=0)
    # The language model's 7,069,221,376 parameters less 333,312 biases and norm weights,
    # its embedding swapped for the head of the same size: 4 FLOPs each per token, plus
    # causal attention.
    assert no_lora == 4 * 7_068_888_064 * 1000 + 6 * 28 * 3584 * 1000**2
    one_tile = model_flops(config, [1000], tiles=1, lora_params=0) - no_lora
    assert 2 * 300e6 * 1025 < one_tile < 2 * 340e6 * 1025 * 1.3  # ViT-300M + projector


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


def test_dataloader_benchmark_reports_rates_and_parts():
    rows = table("dataloader.py", "--tiny")
    rows = [r for r in rows if r[0] in ("stage1", "stage2")]
    rates = {(r[0], r[1]): (number(r[2]), number(r[3])) for r in rows if len(r) == 4}
    assert set(rates) >= {("stage1", "1"), ("stage2", "1")}
    assert all(rate > 0 for pair in rates.values() for rate in pair)
    parts = {(r[0], r[1]) for r in rows if len(r) == 3}
    assert parts >= {("stage1", "decode"), ("stage1", "encode"), ("stage2", "collate")}
