"""Shared fixtures: the small real data files in tests/data (see tests/data/README.md), inside the repository."""

from pathlib import Path

import pytest

TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA
