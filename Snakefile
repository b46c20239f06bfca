# Fine-tune a vision-language model on RoboVQA with a two-stage curriculum.
# The DAG: download -> extract_frames (one job per shard) -> build_jsonl
#   -> train (stage1 -> stage2, and the stage2_only ablation) -> evaluate -> ablation_report.
import sys

from snakemake.utils import min_version

from robovqa_ft.core.settings import ConfigError, check_config

min_version("9.0")


# From the Snakefile's folder, so that --directory elsewhere still finds it.
configfile: f"{workflow.basedir}/config/config.yaml"


# Types, defaults, config/schema.yaml and the checks across keys; a mistake stops the run
# here, before any job, in one line.
try:
    check_config(config, workflow.basedir)
except ConfigError as error:
    sys.exit(str(error))


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/frames.smk"
include: "rules/jsonl.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/merge.smk"


rule all:
    default_target: True
    input:
        rules.ablation_report.output,
