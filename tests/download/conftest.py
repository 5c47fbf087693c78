"""Fixtures for the download tests (the server itself lives in dlserver.py)."""

from __future__ import annotations

import pytest
from dlserver import Server


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()
