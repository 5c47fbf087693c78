"""Fixtures for the safety tests: a tiny open_clip model and a tiny text classifier, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    from curate.testing.tiny_models import write_tiny_clip

    return str(write_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "model", seed=0))


@pytest.fixture(scope="session")
def text_classifier_dir(tmp_path_factory) -> str:
    from curate.testing.safety import write_text_classifier

    return str(write_text_classifier(tmp_path_factory.mktemp("text-clf") / "model", seed=0))
