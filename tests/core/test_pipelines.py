"""Every bundled pipeline parses and every step's config validates against its stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate import stages
from curate.cli import _pipeline_steps
from curate.config import load_pipeline, load_stage_config

PIPELINES = sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml"))


def _configs(name: str) -> list[tuple[str, object]]:
    pipe = load_pipeline(str(next(p for p in PIPELINES if p.stem == name)))
    return [(stage, load_stage_config(stages.get(stage).Config, stage, None, config, sets))
            for stage, _inp, _out, config, sets in _pipeline_steps(pipe, [])]


def test_bundled_pipelines_hold_the_papers_settings():
    """The pipelines the README offers resolve to the settings of the setups they are named after
    (DataComp's basic filter and CLIP top 30%, LAION-2B's B/32 >= 0.28), start from a stage that owns
    or adopts image bytes and end with export."""
    assert {p.stem for p in PIPELINES} >= {"demo", "laion", "datacomp"}
    for name in ("demo", "laion", "datacomp"):
        chain = [stage for stage, _ in _configs(name)]
        assert chain[0] in ("download", "import") and chain[-1] == "export", (name, chain)
        assert chain.index("filter") < chain.index("dedup") < chain.index("clip"), (name, chain)
    dc = dict(_configs("datacomp")[:2])
    f = dc["filter"]
    assert (f.min_side, f.max_aspect_ratio, f.caption_min_words, f.caption_min_chars, f.languages) == (
        200, 3.0, 3, 6, ["en"]
    )
    clips = [c for stage, c in _configs("datacomp") if stage == "clip"]
    assert [c.top_fraction for c in clips] == [None, 0.3]
    assert {(c.model, c.pretrained) for c in clips} == {("ViT-L-14", "datacomp_xl_s13b_b90k")}
    (laion_clip,) = [c for stage, c in _configs("laion") if stage == "clip"]
    assert (laion_clip.model, laion_clip.min_score, laion_clip.top_fraction) == ("ViT-B-32", 0.28, None)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_validates(path):
    pipe = load_pipeline(str(path))
    steps = _pipeline_steps(pipe, [])
    assert steps[0][1] == pipe.input
    for step, prev in zip(steps[1:], steps, strict=False):
        assert step[1] == prev[2], "each step reads the previous step's output"
    for stage, _inp, _out, config, sets in steps:
        load_stage_config(stages.get(stage).Config, stage, None, config, sets)
