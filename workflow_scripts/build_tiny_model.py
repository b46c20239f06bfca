"""Snakemake adapter: build the demo's tiny model (InternVL or Qwen3-VL) from the training text."""

from robovqa_ft.core.logs import log_to
from robovqa_ft.training.random_model import build_tiny_model

with log_to(snakemake.log[0]):
    build_tiny_model(
        out_dir=snakemake.output[0],
        jsonl_paths=snakemake.input,
        family=snakemake.params.family,
        image_size=snakemake.params.image_size,
        vocab_size=snakemake.params.vocab_size,
        seed=snakemake.params.seed,
    )
