"""Fixtures for the clip / semdedup tests: a tiny open_clip model saved to disk once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    from curate.testing.tiny_models import write_tiny_clip

    return str(write_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "model", seed=0))

