"""TensorFlow (tests/data) and torch (tests/training) have been seen to crash together in
one process, so the two folders run in separate pytest processes (`make test`)."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # tests/data, tests/training, and the fault suite's tests/faults/{data,training}
    folders = {part for item in items for part in Path(item.fspath).relative_to(HERE).parts}
    if {"data", "training"} <= folders:
        pytest.exit("run tests/data and tests/training in separate pytest processes (make test)", 2)
