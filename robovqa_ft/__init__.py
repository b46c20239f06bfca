"""Fine-tune vision-language models on RoboVQA robot video with a two-stage curriculum.

The subpackages follow the DAG (docs/code.md has every module):
`data` (bucket -> frames -> JSONL), `training` (the two stages and the ablation),
`evaluation` (eval.json and the ablation report), on `core` (files, logs, disk space,
settings, devices), and `tools` (ask, status, merge: what people run).
A lower layer never imports a higher one: core < data < training < evaluation < tools.
"""

import logging


class _NoCpuKernelNotice(logging.Filter):
    """bitsandbytes (which peft imports) warns at import, on any CPU with AVX-512 BF16, that
    it found no `kernels` package for its CPU 4-bit matmul: a fallback it never uses here
    (4-bit weights are only ever on a GPU), printed by every command. Dropped, that alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Before any submodule imports peft: every import of the package runs this first.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoCpuKernelNotice())
