"""filter stage: every rule, the DataComp basic preset, blocklists from files, through the runner."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.runner import run_stage
from curate.stage import RunOptions, ShardContext
from curate.stages.filter import FilterConfig, FilterStage


def _table(rows: list[dict]) -> pa.Table:
    base = {
        schema.URL: "http://example.com/a.jpg",
        schema.CAPTION: "a photo of a dog on the beach",
        schema.WIDTH: 400,
        schema.HEIGHT: 300,
        schema.IMAGE_FORMAT: "jpg",
        schema.SHA256: "ab" * 32,
    }
    out = []
    for i, r in enumerate(rows):
        out.append({schema.UID: uid_for("f", i), **base, **r})
    return pa.Table.from_pylist(out)


def _run(rows: list[dict], **cfg) -> list[str | None]:
    stage = FilterStage(FilterConfig(**cfg))
    stage.setup()
    ctx = ShardContext(shard=0, input_path=None, input=None, output=None, plan_dir="", options=RunOptions())
    return stage.process(_table(rows), ctx).column(schema.DROP_REASON).to_pylist()


def test_size_format_and_caption_rules():
    rows = [
        {},
        {schema.WIDTH: 100},
        {schema.WIDTH: 2000, schema.HEIGHT: 1000},
        {schema.WIDTH: 1300, schema.HEIGHT: 300},
        {schema.IMAGE_FORMAT: "gif"},
        {schema.CAPTION: "dog"},
        {schema.CAPTION: "a b c"},
        {schema.CAPTION: "x" * 50 + " y z"},
        {schema.WIDTH: None},
    ]
    got = _run(
        rows,
        formats=["jpeg", "png"],
        min_side=200,
        max_side=1500,
        max_aspect_ratio=3,
        min_pixels=50_000,
        caption_min_words=3,
        caption_min_chars=6,
        caption_max_chars=40,
    )
    assert got == [
        None,
        "filter:min_side",
        "filter:max_side",
        "filter:aspect_ratio",
        "filter:format",
        "filter:caption_min_words",
        "filter:caption_min_chars",
        "filter:caption_max_chars",
        "filter:min_side",
    ]
    assert _run([{schema.WIDTH: 200, schema.HEIGHT: 200}], min_pixels=50_000) == ["filter:min_pixels"]
    # original size wins over the stored (resized) one, as DataComp measures it
    rows = [{schema.WIDTH: 150, schema.HEIGHT: 150, schema.ORIGINAL_WIDTH: 900, schema.ORIGINAL_HEIGHT: 600}]
    assert _run(rows, min_side=200) == [None]
    assert _run(rows, min_side=200, size_from="stored") == ["filter:min_side"]


def test_datacomp_basic_preset():
    rows = [
        {schema.CAPTION: "A small brown dog running on the sand"},  # keep
        {schema.CAPTION: "Ein kleiner brauner Hund läuft über den Sand am Meer"},  # not English
        {schema.CAPTION: "brown dog"},  # 2 words
        {schema.CAPTION: "a b c"},  # 5 characters
        {schema.WIDTH: 199, schema.HEIGHT: 500},  # shorter side < 200
        {schema.WIDTH: 200, schema.HEIGHT: 600},  # ratio 3: kept (<= 3)
        {schema.WIDTH: 200, schema.HEIGHT: 601},  # ratio > 3
    ]
    got = _run(rows, preset="datacomp_basic")  # fastText over all its languages, as DataComp
    assert got == [
        None,
        "filter:language",
        "filter:caption_min_words",
        "filter:caption_min_chars",
        "filter:min_side",
        None,
        "filter:aspect_ratio",
    ]
    cfg = FilterConfig(preset="datacomp_basic", min_side=100)  # explicit fields override the preset
    assert cfg.min_side == 100 and cfg.languages == ["en"] and cfg.max_aspect_ratio == 3.0


def test_language_column_written():
    stage = FilterStage(FilterConfig(languages=["en", "fr"], language_candidates=["en", "fr", "de"]))
    stage.setup()
    ctx = ShardContext(shard=0, input_path=None, input=None, output=None, plan_dir="", options=RunOptions())
    t = stage.process(
        _table(
            [
                {schema.CAPTION: "un chien qui court sur la plage au soleil"},
                {schema.CAPTION: "ein Hund, der am Strand in der Sonne läuft"},
                {},
            ]
        ),
        ctx,
    )
    assert t.column(schema.LANGUAGE).to_pylist() == ["fr", "de", "en"]
    assert t.column(schema.DROP_REASON).to_pylist() == [None, "filter:language", None]
    assert t.column(schema.LANGUAGE_DETECTOR).to_pylist() == ["fasttext"] * 3
    assert all(s >= FilterConfig().language_min_score for s in t.column(schema.LANGUAGE_SCORE).to_pylist())


def test_blocklists_inline_and_files(tmp_path):
    (tmp_path / "words.txt").write_text("# comment\nnsfw\n")
    (tmp_path / "domains.txt").write_text("bad.example\n")
    (tmp_path / "sha.txt").write_text("CD" * 32 + "\n")
    rows = [
        {},
        {schema.CAPTION: "an NSFW picture of things"},
        {schema.CAPTION: "nsfwish is not the word"},
        {schema.CAPTION: "buy cheap watches now"},
        {schema.CAPTION: "visit casino tonight"},
        {schema.URL: "https://img.bad.example/x.jpg"},
        {schema.URL: "https://notbad.example/x.jpg"},
        {schema.URL: "https://ok.com/tracking/x.jpg"},
        {schema.SHA256: "cd" * 32},
    ]
    got = _run(
        rows,
        caption_blocklist={
            "word_files": [str(tmp_path / "words.txt")],
            "substrings": ["cheap watch"],
            "regexes": [r"casin[o0]"],
        },
        url_blocklist={"domain_files": [str(tmp_path / "domains.txt")], "substrings": ["/tracking/"]},
        sha256_blocklist_files=[str(tmp_path / "sha.txt")],
    )
    assert got == [
        None,
        "filter:caption_blocklist",
        None,
        "filter:caption_blocklist",
        "filter:caption_blocklist",
        "filter:url_blocklist",
        None,
        "filter:url_blocklist",
        "filter:sha256_blocklist",
    ]


def test_config_errors():
    for bad in (
        {"preset": "nope"},
        {"languages": ["xx"]},
        {"max_aspect_ratio": 0.5},
        {"min_sidee": 3},
        {"caption_blocklist": {"regexes": ["("]}},
        {"languages": ["en"], "language_candidates": ["de"]},
    ):
        with pytest.raises(ValueError):
            FilterConfig(**bad)


def test_through_runner(ray_session, tmp_path):
    src = Dataset(str(tmp_path / "src"))
    counts = {}
    for n in range(3):
        t = schema.conform(
            _table([{schema.WIDTH: 100 + 100 * (i % 3)} for i in range(6)]).set_column(
                0, schema.UID, pa.array([uid_for("r", n, i) for i in range(6)])
            )
        )
        rej = t.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        src.commit_shard(n, t, rej, {"rows_in": 6, "rows_out": 6, "drops": {}})
        counts[n] = 6
    src.write_json(
        {
            "schema_version": schema.SCHEMA_VERSION,
            "stage": "download",
            "config": {},
            "input": None,
            "run": {"stage": "download"},
            "owns_images": False,
            "shard_digits": 5,
            "shards": [{"shard": src.shard_name(n), "rows": r} for n, r in counts.items()],
            "totals": {"kept": 18},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "_manifest.json",
    )
    summary = run_stage("filter", src.url, str(tmp_path / "out"), config={"min_side": 200})
    assert summary["rows_in"] == 18 and summary["kept"] == 12
    out = Dataset(str(tmp_path / "out"))
    rej = pa.concat_tables([t for _, t in out.iter_rejects()])
    assert set(rej.column(schema.DROP_REASON).to_pylist()) == {"filter:min_side"}
