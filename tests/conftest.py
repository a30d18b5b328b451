"""Shared fixtures: small real data from ../shared/data (present in development and CI, never needed by users)."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MIXGF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"test data folder {SHARED_DATA} is missing; clone the project next to ../shared "
                                "or set MIXGF_SHARED_DATA")
    return SHARED_DATA
