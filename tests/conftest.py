"""Shared pytest fixtures."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only reference benchmark files, ../shared/data from the repo root."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        # A silent skip would let loader and scoring tests "pass" without reading a file.
        pytest.fail(f"reference data not found at {path}: these tests need ../shared/data beside the repo")
    return path
