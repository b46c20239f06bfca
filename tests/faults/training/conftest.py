"""The fault suite's training side (torch, never TensorFlow): tests/training's fixtures
and helpers, borrowed rather than copied."""

import importlib.util
import sys
from pathlib import Path

TRAINING_TESTS = Path(__file__).resolve().parents[2] / "training"
sys.path.insert(0, str(TRAINING_TESTS))  # training_helpers
_spec = importlib.util.spec_from_file_location("training_conftest", TRAINING_TESTS / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
globals().update(
    {name: value for name, value in vars(_fixtures).items() if not name.startswith("_")}
)
