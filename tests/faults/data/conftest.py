"""The fault suite's data side (TensorFlow, never torch): tests/data's fixtures and
record makers, borrowed rather than copied."""

import importlib.util
import sys
from pathlib import Path

DATA_TESTS = Path(__file__).resolve().parents[2] / "data"
sys.path.insert(0, str(DATA_TESTS))  # fake_records and the other helpers
_spec = importlib.util.spec_from_file_location("data_conftest", DATA_TESTS / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_shard = _fixtures.make_shard
