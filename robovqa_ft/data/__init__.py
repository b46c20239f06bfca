"""The data stages: the bucket (GCS, local, demo), TFRecord reading, the QA grammar,
frames, and the JSONL of both stages."""
