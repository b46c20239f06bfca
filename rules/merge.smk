# A run's adapter merged into the base, with its processor and model card, for serving
# or the Hub: `snakemake --cores 2 results/stage2/merged`. Not in the default target.
# A CPU job: it asks for no GPU, and its script hides them.
from robovqa_ft.tools.merge import merge_memory_mb
from robovqa_ft.core.runs import CURRICULUM


rule merge:
    input:
        # the adapter, metadata.json (the split the card states) and the tiny model; the
        # val files ride along, and a change to them redoes eval.json anyway
        unpack(evaluation_inputs),
        eval="results/{run}/eval.json",  # the card states its figures
    output:
        directory("results/{run}/merged"),
    log:
        "logs/merge/{run}.log",
    benchmark:
        "benchmarks/merge/{run}.tsv"
    wildcard_constraints:
        run="|".join(TRAINED),
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        # <TBD> until the adapter exists; then from the base's weights (robovqa_ft/tools/merge.py)
        mem_mb=lambda wildcards, input: merge_memory_mb(
            input.adapter,
            model_settings()["name"],
            config["model"].get("revision"),
            config["model"]["dtype"],
        ),
    # What shapes the merged weights and what the card states; the adapter (its LoRA
    # settings with it) and eval.json are inputs. Bookkeeping keys are none of them.
    params:
        model=shaping_settings("model", model_settings()),
        stages=lambda wildcards: {s: config[s] for s in CURRICULUM[wildcards.run]},
        training=shaping_settings("training", config["training"]),
    script:
        "../workflow_scripts/merge.py"
