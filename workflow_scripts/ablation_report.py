"""Snakemake adapter: write the ablation report, its table and plots."""

from pathlib import Path

from robovqa_ft.core.logs import log_to
from robovqa_ft.evaluation.report import write_report

with log_to(snakemake.log[0]):
    write_report(
        run_dirs={
            run: Path(path).parent
            for run, path in zip(snakemake.params.runs, snakemake.input.evals, strict=True)
        },
        metadata_path=snakemake.input.metadata,
        settings=snakemake.params.settings,
        out=dict(snakemake.output.items()),
        timings=snakemake.params.timings,
        pool=snakemake.params.pool,
    )
