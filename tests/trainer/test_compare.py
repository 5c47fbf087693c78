"""``curate compare`` end to end with real (tiny) training runs, its statistics, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realsets import read_pairs

from curate.cli import main as curate_main
from curate.compare import RECALLS
from curate.testing.shapes import write_shapes

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "trainer" / "recipes" / "clip_vit_l14_336.yaml")
BUDGET = ["model.tiny=true", "model.grad_checkpointing=false", "data.workers=0", "train.device=cpu",
          "train.steps=6", "train.global_batch=8", "train.accum=1", "train.log_every=3", "optim.lr=2e-3",
          "optim.warmup_steps=1", "data.color_jitter=null", "data.loader=torch"]


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    write_shapes(root / "clean", 2, seed=1)
    write_shapes(root / "shuffled", 2, seed=1, shuffle=0.5)
    write_shapes(root / "held_out", 1, seed=2, image_seed=3)
    return root


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", f"clean={root / 'clean'}", f"shuffled={root / 'shuffled'}", "--held-out", str(root / "held_out"),
            "--out", str(out), "--recipe", RECIPE, "--seeds", "2", *[a for s in BUDGET for a in ("--set", s)], *extra]


def test_shapes_variants_share_images_and_differ_in_half_the_captions(variants):
    a, b = read_pairs(variants / "clean"), read_pairs(variants / "shuffled")
    assert [x[1] for x in a] == [y[1] for y in b]
    moved = sum(x[2] != y[2] for x, y in zip(a, b, strict=True))
    assert 0.35 * len(a) <= moved <= 0.5 * len(a)  # half are permuted; a few land on an equal caption


@pytest.fixture(scope="module")
def compared(variants, tmp_path_factory) -> tuple[Path, str]:
    """One finished comparison (2 variants x 2 seeds, real training subprocesses) and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cmp") / "cmp"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert curate_main(_cmd(variants, out)) == 0
    return out, buf.getvalue()


def test_compare_trains_each_variant_per_seed_and_reports_paired_intervals(variants, compared, capsys):
    from scipy import stats

    out, printed = compared
    assert "retrieval" in printed and "delta vs clean" in printed

    # every run: the same budget, its own seed, evaluated on the same held-out pairs
    primary = {}
    for name in ("clean", "shuffled"):
        for seed in (0, 1):
            run = out / "runs" / name / f"seed{seed}"
            recipe = json.loads((run / "recipe.json").read_text())
            assert recipe["train"]["seed"] == seed and recipe["train"]["steps"] == 6
            assert recipe["train"]["global_batch"] == 8
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            final = [r for r in rows if "eval/n" in r][-1]
            assert final["step"] == 6 and final["eval/n"] == 24
            primary[name, seed] = sum(final[k] for k in RECALLS) / 6

    summary = json.loads((out / "compare.json").read_text())
    entry = next(e for e in summary["table"] if e["metric"] == "retrieval")
    d = entry["variants"]["shuffled"]["delta"]
    diffs = [primary["shuffled", s] - primary["clean", s] for s in (0, 1)]
    assert d["per_seed"] == pytest.approx(diffs)
    mean = sum(diffs) / 2
    if diffs[0] != diffs[1]:
        lo, hi = stats.t.interval(0.95, 1, loc=mean, scale=stats.sem(diffs))
        assert d["ci"] == pytest.approx([lo, hi])
    assert entry["variants"]["clean"]["mean"] == pytest.approx((primary["clean", 0] + primary["clean", 1]) / 2)
    page = (out / "compare.html").read_text()
    assert '<img alt="differences" src="data:image/png;base64,' in page and "<td>retrieval</td>" in page

    # a rerun trains nothing and writes the same result
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    json_before = (out / "compare.json").read_bytes()
    assert curate_main(_cmd(variants, out)) == 0
    assert capsys.readouterr().err.count("already done") == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    assert (out / "compare.json").read_bytes() == json_before


def test_a_run_killed_midway_resumes_and_the_others_are_kept(variants, compared, capsys):
    out, _ = compared
    # as if the process died during the last run: its final rows and export are gone, a checkpoint remains
    run = out / "runs" / "shuffled" / "seed1"
    rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= 3]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    assert curate_main(_cmd(variants, out)) == 0
    err = capsys.readouterr().err
    assert err.count("already done") == 3 and "run 4/4: shuffled seed 1 done" in err
    summary = json.loads((out / "compare.json").read_text())
    assert len(summary["table"][0]["variants"]["shuffled"]["per_seed"]) == 2


@pytest.mark.parametrize("case", ["leak", "one", "dup", "seeds", "theirs", "other-plan", "pipeline-alone", "vary-bad"])
def test_mistakes_are_one_line_and_exit_2(variants, tmp_path, capsys, case):
    out = tmp_path / "cmp"
    if case == "leak":  # held-out pairs that a variant trains on
        cmd = _cmd(variants, out)
        cmd[cmd.index("--held-out") + 1] = str(variants / "clean")
        message = "not held out"
    elif case == "one":
        cmd = ["compare", str(variants / "clean"), "--held-out", str(variants / "held_out"), "--out", str(out)]
        message = "at least two variants"
    elif case == "dup":
        cmd = ["compare", f"a={variants / 'clean'}", f"a={variants / 'shuffled'}", "--held-out",
               str(variants / "held_out"), "--out", str(out)]
        message = "names repeat"
    elif case == "seeds":
        cmd = [*_cmd(variants, out), "--seeds", "1"]
        message = "at least 2"
    elif case == "pipeline-alone":
        cmd = [*_cmd(variants, out), "--pipeline", str(REPO / "pipelines" / "demo.yaml")]
        message = "not both"
    elif case == "vary-bad":
        cmd = ["compare", "--held-out", str(variants / "held_out"), "--out", str(out), "--pipeline",
               str(REPO / "pipelines" / "demo.yaml"), "--vary", "nosuchstep.x=1,2"]
        message = "expected STEP.KEY=V1,V2"
    elif case == "theirs":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
        cmd = _cmd(variants, out)
        message = "not a curate compare folder"
    else:
        out.mkdir()
        (out / "plan.json").write_text(json.dumps({"variants": []}))
        cmd = _cmd(variants, out)
        message = "other variants or settings"
    assert curate_main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "runs").exists()


def test_variants_from_one_pipeline_differ_in_the_varied_setting_only(ray_session, tmp_path):
    import yaml

    from curate.compare import pipeline_variants
    from curate.dataset import Dataset
    write_shapes(tmp_path / "src", 2, seed=1)
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({
        "name": "shapes", "output": str(tmp_path / "out"), "input": str(tmp_path / "src" / "shards"),
        "stages": [{"stage": "import"}, {"stage": "filter", "config": {"caption_min_chars": 4}},
                   {"stage": "export", "config": {"samples_per_shard": 16}}]}))
    variants = pipeline_variants(str(pipe), "filter.caption_min_chars=4,14", str(tmp_path / "cmp"))
    assert [v.name for v in variants] == ["caption_min_chars-4", "caption_min_chars-14"]
    assert [Path(v.path).name for v in variants] == ["export-caption_min_chars-4", "export-caption_min_chars-14"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "export-caption_min_chars-14", "export-caption_min_chars-4", "filter-caption_min_chars-14",
        "filter-caption_min_chars-4", "import"]  # the step before the varied one ran once, shared
    captions = [[c for _, _, c in read_pairs(v.path)] for v in variants]
    assert len(captions[0]) == 48
    assert sorted(captions[1]) == sorted(c for c in captions[0] if len(c) >= 14) and len(captions[1]) < 48
    assert Dataset(str(tmp_path / "out" / "filter-caption_min_chars-14")).manifest()["config"]["caption_min_chars"] == 14

    # a rerun finds every step complete and returns the same exports
    stamp = (Path(variants[1].path) / "_manifest.json").stat().st_mtime_ns
    assert pipeline_variants(str(pipe), "filter.caption_min_chars=4,14", str(tmp_path / "cmp")) == variants
    assert (Path(variants[1].path) / "_manifest.json").stat().st_mtime_ns == stamp


def test_zeroshot_sets_reach_the_recipe_of_every_run(tmp_path):
    from curate.compare import Plan, Variant, train_command
    from trainer.config import load_recipe

    plan = Plan(variants=(Variant("a", "/x"), Variant("b", "/y")), held_out="/h", out=str(tmp_path),
                zeroshot=(str(tmp_path / "zs one"), "/z2"), classnames="/c.txt", templates="openai")
    cmd = train_command(plan, plan.variants[1], 3)
    sets = cmd[cmd.index("--set") + 1:]
    recipe = load_recipe(None, sets)
    assert [(z.path, z.classnames, z.templates) for z in recipe.eval.zeroshot] == [
        (str(tmp_path / "zs one"), "/c.txt", "openai"), ("/z2", "/c.txt", "openai")]
    assert recipe.train.seed == 3 and cmd[cmd.index("--data") + 1] == "/y"
