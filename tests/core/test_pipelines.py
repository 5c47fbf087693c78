"""Every bundled pipeline parses, every step's config validates against its stage, and every step finds
the columns it needs in what the steps before it leave; a pipeline that breaks that rule is refused
with one line naming the step and the fix, before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from curate import stages
from curate.cli import _pipeline_steps, _validate_steps, main
from curate.config import load_pipeline, load_stage_config

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


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
    _validate_steps(steps)  # the column check too: raises a usage error on a step that would crash


def _write(tmp_path: Path, steps: list[dict], input: str = "urls.parquet") -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "output": str(tmp_path / "out"),
                                    "input": str(tmp_path / input), "stages": steps}))
    return str(path)


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err


CLIP = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}


def test_semdedup_after_a_clip_step_that_drops_the_embeddings(tmp_path, capsys):
    # DataComp-style: score with embeddings, select the top 30% in a second clip step, then semdedup.
    steps = [{"stage": "import"},
             {"stage": "clip", "name": "scores", "config": {**CLIP, "embeddings": True}},
             {"stage": "clip", "name": "top30", "config": {**CLIP, "top_fraction": 0.3}},
             {"stage": "semdedup"}]
    err = _one_line(capsys, main(["run", _write(tmp_path, steps)]))
    assert re.search(r"step 'semdedup'.*image_embedding.*step 'top30' drops it.*embeddings: true", err), err
    assert not (tmp_path / "out").exists()  # refused before any work
    # the fix the line names makes the pipeline pass the check
    steps[2]["config"]["embeddings"] = True
    _validate_steps(_pipeline_steps(load_pipeline(_write(tmp_path, steps)), []))


def test_a_column_no_step_writes(tmp_path, capsys):
    steps = [{"stage": "import"}, {"stage": "export", "config": {"caption": "mix"}}]
    err = _one_line(capsys, main(["run", _write(tmp_path, steps)]))
    assert "step 'export'" in err and "no step before it writes it" in err and "recaption" in err
    steps.insert(1, {"stage": "recaption", "config": {"model": "some/captioner"}})
    _validate_steps(_pipeline_steps(load_pipeline(_write(tmp_path, steps)), []))

    steps = [{"stage": "import"}, {"stage": "dedup", "config": {"confirm": "clip"}}]
    err = _one_line(capsys, main(["run", _write(tmp_path, steps)]))
    assert "step 'dedup'" in err and "confirm: color" in err
    steps = [{"stage": "import"}, {"stage": "safety", "config": {"heads": [{"name": "nsfw", "path": "h.st"}]}}]
    err = _one_line(capsys, main(["run", _write(tmp_path, steps)]))
    assert "step 'safety'" in err and "model" in err
    steps[1]["config"]["model"] = "ViT-B-32"
    _validate_steps(_pipeline_steps(load_pipeline(_write(tmp_path, steps)), []))


def test_a_later_clip_step_with_embeddings_restores_them(tmp_path):
    steps = [{"stage": "import"},
             {"stage": "clip", "name": "a", "config": {**CLIP}},
             {"stage": "clip", "name": "b", "config": {**CLIP, "embeddings": True}},
             {"stage": "semdedup"}]
    _validate_steps(_pipeline_steps(load_pipeline(_write(tmp_path, steps)), []))


def test_the_readmes_pretrained_models_snippet_passes_the_check(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### Using pretrained models\n+```yaml\n(.*?)```", readme, re.S).group(1)
    snippet = yaml.safe_load(block)
    steps = [{"stage": "import"}, *snippet, {"stage": "export", "config": {"caption": "mix"}}]
    _validate_steps(_pipeline_steps(load_pipeline(_write(tmp_path, steps)), []))
