# Fine-tune a vision-language model on RoboVQA with a two-stage curriculum.
# The DAG: download -> extract_frames (one job per shard) -> build_jsonl
#   -> train (stage1 -> stage2, and the stage2_only ablation) -> evaluate -> ablation_report.
from snakemake.utils import min_version, validate

min_version("9.0")


# From the Snakefile's folder, so that --directory elsewhere still finds it.
configfile: f"{workflow.basedir}/config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/frames.smk"
include: "rules/jsonl.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.ablation_report.output,
