"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest

from distill_ray.tracking import start_mlflow_server

# Set before any test starts Ray, so every Ray process (and CLI subprocess) inherits them.
# Ray Train's controller polls its workers every 2 s by default: each of the ~25 short
# fits in this suite waits out several polls between states. On one box nothing is
# preempted, so its watcher actor (one more process per fit) has nothing to watch.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only reference benchmark files, ../shared/data from the repo root."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        # A silent skip would let loader and scoring tests "pass" without reading a file.
        pytest.fail(f"reference data not found at {path}: these tests need ../shared/data beside the repo")
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the whole session (each start costs ~10 s);
    tests keep apart by experiment name."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server
