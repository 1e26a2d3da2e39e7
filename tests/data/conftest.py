"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffdpo.data import write_pickapic_parquet
from tests.data.builders import standard_rows


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    # Row groups of 2 rows: reading a row must find the right group.
    return write_pickapic_parquet(tmp_path / "pairs.parquet", standard_rows(), row_group_size=2)

