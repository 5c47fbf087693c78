"""Fixtures of the export tests: the datasets come from export_data.py."""

from __future__ import annotations

import pytest
from export_data import write_curated, write_source

from curate.dataset import Dataset


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("export-src")
    source = write_source(root / "download")
    return write_curated(root / "recaption", source)
