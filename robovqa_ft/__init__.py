"""Fine-tune vision-language models on RoboVQA robot video with a two-stage curriculum.

One module per pipeline stage: bucket (sources, download) -> records (TFRecord
reading) -> qa (text parsing) -> frames (extraction) -> jsonl (splits, curriculum
files); demo_bucket makes a synthetic bucket in the real format.
"""
