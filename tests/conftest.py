"""Shared fixtures: where the real blood-smear data lives."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data folder (../shared/data or $LEUKOEDGE_DATA); skips the test where it is absent."""
    root = Path(os.environ.get("LEUKOEDGE_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data folder not found at {root} (set LEUKOEDGE_DATA)")
    return root
