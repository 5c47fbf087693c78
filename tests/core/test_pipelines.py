"""Every bundled pipeline parses and every step's config validates against its stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate import stages
from curate.cli import _pipeline_steps
from curate.config import load_pipeline, load_stage_config

PIPELINES = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))


def test_there_are_pipelines():
    assert {p.stem for p in PIPELINES} >= {"demo", "laion", "datacomp"}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_validates(path):
    pipe = load_pipeline(str(path))
    steps = _pipeline_steps(pipe, [])
    assert steps[0][1] == pipe.input
    for step, prev in zip(steps[1:], steps, strict=False):
        assert step[1] == prev[2], "each step reads the previous step's output"
    for stage, _inp, _out, config, sets in steps:
        load_stage_config(stages.get(stage).Config, stage, None, config, sets)
