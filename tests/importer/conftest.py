"""Fixtures of the import tests; the folder builders live in importer_builders.py."""

from __future__ import annotations

import pytest
from importer_builders import image_bytes


@pytest.fixture
def make_image():
    return image_bytes
