"""Counted GPU time of evaluating the four runs of InternVL3-8B: arithmetic, not a
measurement (no GPU run has timed an evaluation yet).

`python bench/eval_cost.py` prints, per answer format, the generations one run asks
for (config.yaml's `answers_per_family` for each of the 6 score groups, 2 of them yes/no
with two controls each) and their time on one H100 SXM: prompt prefill at `--mfu` of the
989 TFLOP/s bf16 peak, each decoding step memory-bound at `--bandwidth-share` of 3.35 TB/s
(the weights and the batch's KV cache read once per new token), every batch decoding all
`max_new_tokens` steps (an upper bound: yes/no answers stop after two). Plus the val loss
over `loss_clips` clips. Prompt lengths are those `SampleBuilder` gives at InternVL3's
frame cost (256 tokens a 448 px frame): stage 1 ~1,080 tokens (4 frames and a question),
stage 2 ~2,680 (10 frames, on average half the clip's 2-7 earlier pairs, the question).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from robovqa_ft.training.random_model import INTERNVL3_8B

CONFIG = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
GROUPS, YES_NO_GROUPS = 6, 2  # planning, success, affordance x2, future, past; 2 yes/no
PROMPT_TOKENS = {"stage1": 1_080, "stage2": 2_680}
FRAMES = {stage: CONFIG[stage]["max_frames"] for stage in ("stage1", "stage2")}
LOSS_SAMPLE_TOKENS = {"stage1": 1_099, "stage2": 2_798}  # bench/train_step.py's means
QUESTIONS_PER_CLIP = 3.6  # ROBOVQA.md: 722,979 stage-1 train QAs from 199,721 clips
PEAK_FLOPS, HBM_BYTES_PER_S = 989.4e12, 3.35e12  # H100 SXM: dense bf16, HBM3
RUNS = 4  # base, stage1, curriculum, stage2_only


def sizes() -> dict[str, float]:
    text, vision = INTERNVL3_8B["text_config"], INTERNVL3_8B["vision_config"]
    d, layers = text["hidden_size"], text["num_hidden_layers"]
    kv = text["num_key_value_heads"] * d // text["num_attention_heads"]
    n_lm = layers * (2 * d * d + 2 * d * kv + 3 * d * text["intermediate_size"])
    dv, lv = vision["hidden_size"], vision["num_hidden_layers"]
    n_vit = lv * (4 * dv * dv + 2 * dv * vision["intermediate_size"])
    patches = (INTERNVL3_8B["image_size"] // vision["patch_size"][0]) ** 2 + 1
    return {"n_lm": n_lm, "d": d, "layers": layers, "kv": kv, "vocab": text["vocab_size"],
            "frame_flops": 2 * n_vit * patches + 4 * lv * dv * patches**2,
            "weight_bytes": 2 * (n_lm + 2 * d * text["vocab_size"])}  # fmt: skip


def forward_flops(tokens: int, frames: int, s: dict) -> float:
    """One prompt's forward: language model, causal attention, the frames' vision tower."""
    attention = 2 * s["layers"] * s["d"] * tokens**2
    return 2 * s["n_lm"] * tokens + attention + frames * s["frame_flops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--bandwidth-share", type=float, default=0.7)
    parser.add_argument("--answers-per-family", type=int, help="default: config.yaml's")
    args = parser.parse_args()
    s, ev = sizes(), CONFIG["evaluation"]
    per_group = args.answers_per_family or ev["answers_per_family"]
    batch, new = ev["generation_batch_size"], ev["max_new_tokens"]
    answers = GROUPS * per_group
    generations = answers + 2 * YES_NO_GROUPS * per_group  # + blank and other-clip frames
    print(f"per run and format: {answers:,} answers + {generations - answers:,} control "
          f"= {generations:,} generations (at most: capped by the val questions)")  # fmt: skip
    total = 0.0
    for form, tokens in PROMPT_TOKENS.items():
        prefill = generations * forward_flops(tokens, FRAMES[form], s) / (PEAK_FLOPS * args.mfu)
        kv_bytes = 2 * s["layers"] * s["kv"] * 2 * (tokens + new / 2)  # per sequence, bf16
        step = (s["weight_bytes"] + batch * kv_bytes) / (HBM_BYTES_PER_S * args.bandwidth_share)
        decode = -(-generations // batch) * new * step
        total += prefill + decode
        print(f"{form} format: prefill {prefill:.1f} s + decode {decode:.1f} s "
              f"(batches of {batch}, {step * 1e3:.1f} ms a step)")  # fmt: skip
    clips = ev["loss_clips"]
    samples = {"stage1": clips * QUESTIONS_PER_CLIP, "stage2": clips}
    loss = sum(n * forward_flops(LOSS_SAMPLE_TOKENS[k], FRAMES[k], s) for k, n in samples.items())
    loss /= PEAK_FLOPS * args.mfu
    total += loss
    print(f"val loss ({clips} clips, both val sets): {loss:.1f} s")
    print(
        f"one run: {total / 60:.0f} min; {RUNS} runs: {RUNS * total / 3600:.1f} GPU-hours "
        f"(counted: H100 SXM, {args.mfu:.0%} MFU, {args.bandwidth_share:.0%} of HBM)"
    )


if __name__ == "__main__":
    main()
