"""filter's language rule: fastText by default, und handling, short titles, lingua, config, demo corpus.

Oracles: the fastText probabilities the tests rely on are read straight from the model file with
fasttext's own API (not through curate.lang), and the demo titles' languages are the hand-checked
labels in bench/data/lang_id.tsv.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from curate import lang, schema
from curate.cli import main
from curate.config import ConfigError, build
from curate.dataset import uid_for
from curate.stage import RunOptions, ShardContext
from curate.stages.filter import FilterConfig, FilterStage

REPO = Path(__file__).resolve().parents[2]
# The examples: lingua (all languages) dropped them as Dutch, German or Spanish.
SHORT_ENGLISH = ["Desk Lamp", "old book", "Tree", "Router", "electric guitar", "Golf flag in hole on green"]
OTHER_SENTENCES = {
    "Ein kleiner brauner Hund läuft am Strand entlang": "de",
    "Un petit chien brun court sur la plage": "fr",
    "Un perro pequeño corre por la playa al atardecer": "es",
    "Un piccolo cane marrone corre sulla spiaggia": "it",
    "Een kleine bruine hond rent over het strand": "nl",
    "Маленькая собака бежит по пляжу": "ru",
}


def _process(captions: list[str], **cfg) -> pa.Table:
    stage = FilterStage(FilterConfig(**cfg))
    stage.setup()
    table = pa.table(
        {schema.UID: [uid_for("l", i) for i in range(len(captions))], schema.CAPTION: captions}
    )
    ctx = ShardContext(shard=0, input_path=None, input=None, output=None, plan_dir="", options=RunOptions())
    return stage.process(table, ctx)


def _cols(t: pa.Table, *names: str) -> list[list]:
    return [t.column(n).to_pylist() for n in names]


@pytest.fixture(scope="module")
def raw_model():
    """The compact model loaded with fasttext's API directly: the oracle for probabilities."""
    import fasttext

    return fasttext.load_model(str(lang.fasttext_model_path()))


def _prob(model, text: str) -> tuple[str, float]:
    labels, probs = model.predict(" ".join(text.split()).lower(), k=1)
    return labels[0].removeprefix("__label__"), float(probs[0])


def test_short_english_kept_and_other_languages_dropped():
    captions = SHORT_ENGLISH + list(OTHER_SENTENCES)
    t = _process(captions, languages=["en"])
    langs, reasons, detectors = _cols(t, schema.LANGUAGE, schema.DROP_REASON, schema.LANGUAGE_DETECTOR)
    n = len(SHORT_ENGLISH)
    assert reasons[:n] == [None] * n, list(zip(captions, langs, reasons, strict=True))
    assert set(langs[:n]) <= {"en", lang.UND}
    assert reasons[n:] == ["filter:language"] * len(OTHER_SENTENCES)
    assert langs[n:] == list(OTHER_SENTENCES.values())
    assert detectors == ["fasttext"] * len(captions)  # the default detector


def test_score_is_the_models_probability_and_low_scores_are_und(raw_model):
    captions = ["a photo of a dog on the beach", "Ein kleiner brauner Hund läuft am Strand entlang"]
    expect = [_prob(raw_model, c) for c in captions]
    t = _process(captions, languages=["en", "de"])
    langs, scores = _cols(t, schema.LANGUAGE, schema.LANGUAGE_SCORE)
    assert langs == [code for code, _ in expect]
    assert scores == pytest.approx([p for _, p in expect], abs=1e-6)
    # a minimum above the English caption's probability and below the German one's
    cut = (expect[0][1] + expect[1][1]) / 2
    assert expect[0][1] < cut < expect[1][1]
    t = _process(captions, languages=["en", "de"], language_min_score=cut)
    langs, scores, reasons = _cols(t, schema.LANGUAGE, schema.LANGUAGE_SCORE, schema.DROP_REASON)
    assert langs == [lang.UND, "de"]
    assert scores == pytest.approx([p for _, p in expect], abs=1e-6)  # und keeps the measured score
    assert reasons == [None, None]  # und kept by default
    t = _process(captions, languages=["en", "de"], language_min_score=cut, language_keep_und=False)
    assert _cols(t, schema.LANGUAGE, schema.DROP_REASON) == [[lang.UND, "de"], ["filter:language", None]]


def test_short_captions_need_the_short_min_score(raw_model):
    # the compact model calls this English title Italian with a middling probability
    code, p = _prob(raw_model, "Potato Chips")
    cfg = FilterConfig()
    assert code == "it" and cfg.language_min_score <= p < cfg.language_min_score_short
    t = _process(["Potato Chips"], languages=["en"])
    assert _cols(t, schema.LANGUAGE, schema.DROP_REASON) == [[lang.UND], [None]]
    # counted as a long caption (no word count is short), the same probability places it
    t = _process(["Potato Chips"], languages=["en"], language_short_words=0)
    assert _cols(t, schema.LANGUAGE, schema.DROP_REASON) == [["it"], ["filter:language"]]


def test_unspaced_scripts_count_words_by_characters(raw_model):
    # one whitespace token, but a Japanese sentence: it must meet the sentence minimum, not the
    # short-caption one
    text = "以下のパッケージは信頼できません:"
    code, p = _prob(raw_model, text)
    cfg = FilterConfig()
    assert code == "ja" and cfg.language_min_score <= p < cfg.language_min_score_short
    t = _process([text], languages=["en"])
    assert _cols(t, schema.LANGUAGE, schema.DROP_REASON) == [["ja"], ["filter:language"]]


def test_captions_without_letters_are_und():
    t = _process(["1989", "!!! ???", "", "a photo of a dog on the beach"], languages=["en"], language_keep_und=False)
    langs, scores, reasons = _cols(t, schema.LANGUAGE, schema.LANGUAGE_SCORE, schema.DROP_REASON)
    assert langs[:3] == [lang.UND] * 3 and scores[:3] == [0.0] * 3
    assert reasons[:3] == ["filter:language"] * 3
    assert reasons[3] is None


def test_rows_failing_an_earlier_rule_are_not_detected():
    t = _process(["a b", "a photo of a dog on the beach"], languages=["en"], caption_min_chars=6)
    langs, scores, detectors, reasons = _cols(
        t, schema.LANGUAGE, schema.LANGUAGE_SCORE, schema.LANGUAGE_DETECTOR, schema.DROP_REASON
    )
    assert reasons == ["filter:caption_min_chars", None]
    assert langs[0] is None and scores[0] is None and detectors[0] is None
    assert langs[1] == "en" and detectors[1] == "fasttext"


def test_candidates_restrict_the_answer(raw_model):
    # German sentence, candidates without German: the best allowed language, its own probability
    text = "Ein kleiner brauner Hund läuft am Strand entlang"
    t = _process([text], languages=["en"], language_candidates=["en", "fr"], language_min_score=0.0)
    got, score = _cols(t, schema.LANGUAGE, schema.LANGUAGE_SCORE)
    labels, probs = raw_model.predict(text.lower(), k=-1)
    allowed = [(lab.removeprefix("__label__"), p) for lab, p in zip(labels, probs, strict=True) if lab[9:] in ("en", "fr")]
    assert got[0] == allowed[0][0] and score[0] == pytest.approx(allowed[0][1], abs=1e-6)
    assert score[0] < 0.1  # so the default minimum calls it und, and it is kept
    t = _process([text], languages=["en"], language_candidates=["en", "fr"])
    assert _cols(t, schema.LANGUAGE, schema.DROP_REASON) == [[lang.UND], [None]]


def test_lingua_still_selectable():
    captions = ["Desk Lamp", "Ein kleiner brauner Hund läuft am Strand entlang"]
    common = dict(languages=["en"], language_candidates=["en", "de", "nl"], language_min_score=0.0,
                  language_min_score_short=0.0)
    ft = _process(captions, **common)
    li = _process(captions, language_detector="lingua", **common)
    assert ft.column(schema.LANGUAGE_DETECTOR).to_pylist() == ["fasttext"] * 2
    assert li.column(schema.LANGUAGE_DETECTOR).to_pylist() == ["lingua"] * 2
    # with no minimum score, lingua calls the short English title German or Dutch, fastText English
    assert ft.column(schema.LANGUAGE).to_pylist() == ["en", "de"]
    assert li.column(schema.LANGUAGE).to_pylist()[0] in ("de", "nl")
    assert li.column(schema.LANGUAGE).to_pylist()[1] == "de"
    assert li.column(schema.DROP_REASON).to_pylist() == ["filter:language", "filter:language"]
    # lingua's scores are its confidence values, in (0, 1]
    assert all(0.0 < s <= 1.0 for s in li.column(schema.LANGUAGE_SCORE).to_pylist())


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"language_detector": "cld3"}, "language_detector"),
        ({"languages": ["xx"]}, "unknown language code 'xx'"),
        ({"languages": ["fy"], "language_detector": "lingua"}, "unknown language code 'fy' for language_detector lingua"),
        ({"languages": ["und"]}, "language_keep_und"),
        ({"language_min_relative_distance": 0.2}, "need language_detector: lingua"),
        ({"language_min_score": 1.5}, "language_min_score"),
    ],
)
def test_config_errors_are_one_line(bad, needle):
    with pytest.raises(ConfigError) as e:
        build(FilterConfig, bad, "filter config")
    msg = str(e.value)
    assert needle in msg and len(msg.splitlines()) == 1, msg
    FilterConfig(languages=["fy"])  # a code fastText knows is fine with the default detector


def test_unknown_detector_from_the_cli(tmp_path, capsys):
    code = main(["filter", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                 "--set", "language_detector=cld3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "language_detector" in err, err


def test_datacomp_preset_uses_fasttext():
    cfg = FilterConfig(preset="datacomp_basic")
    assert cfg.language_detector == "fasttext" and cfg.languages == ["en"]
    # sizes are not under test here: the size rules of the preset are switched off
    t = _process(["electric guitar on a stage", "Ein kleiner brauner Hund läuft am Strand entlang"],
                 preset="datacomp_basic", min_side=None, max_aspect_ratio=None)
    assert t.column(schema.DROP_REASON).to_pylist() == [None, "filter:language"]


def _labelled_demo_titles() -> dict[str, str]:
    with open(REPO / "bench" / "data" / "lang_id.tsv", encoding="utf-8", newline="") as f:
        return {r["text"]: r["lang"] for r in csv.DictReader(f, delimiter="\t") if r["source"].startswith("demo/")}


def test_demo_pipeline_drops_no_english_title():
    """The demo's own filter config on every demo caption: no hand-labelled English title is dropped
    for language, and the one German title is."""
    pipe = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    (step,) = [s for s in pipe["stages"] if s["stage"] == "filter"]
    lang_cfg = {k: v for k, v in step["config"].items() if k == "languages" or k.startswith("language_")}
    with open(REPO / "demo" / "corpus" / "captions.jsonl", encoding="utf-8") as f:
        captions = [json.loads(line)["caption"] for line in f if line.strip()]
    t = _process(captions, **lang_cfg)
    dropped = {c for c, r in zip(captions, t.column(schema.DROP_REASON).to_pylist(), strict=True) if r == "filter:language"}
    labels = _labelled_demo_titles()
    english = {c for c, code in labels.items() if code == "en"}
    assert len(english) > 150
    assert not dropped & english, sorted(dropped & english)
    assert "Bitte keine Tueten rauchen!" in dropped
    # and under an English-only filter, still no hand-labelled English title of 1-4 words
    t = _process(captions, languages=["en"])
    dropped = {c for c, r in zip(captions, t.column(schema.DROP_REASON).to_pylist(), strict=True) if r == "filter:language"}
    short = {c for c in english if len(c.split()) <= 4}
    assert not dropped & short, sorted(dropped & short)
    assert "Pattinatrici sul ghiaccio" in dropped  # an Italian title


def test_rejects_carry_language_and_score_through_the_runner(ray_session, tmp_path):
    import time

    from curate.dataset import Dataset
    from curate.runner import run_stage

    captions = ["Desk Lamp", "electric guitar", *OTHER_SENTENCES]
    src = Dataset(str(tmp_path / "src"))
    t = schema.conform(pa.table({schema.UID: [uid_for("r", i) for i in range(len(captions))],
                                 schema.CAPTION: captions}))
    rej = t.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
    src.commit_shard(0, t, rej, {"rows_in": len(captions), "rows_out": len(captions), "drops": {}})
    src.write_json(
        {"schema_version": schema.SCHEMA_VERSION, "stage": "download", "config": {}, "input": None,
         "run": {"stage": "download"}, "owns_images": False, "shard_digits": 5,
         "shards": [{"shard": src.shard_name(0), "rows": len(captions)}], "totals": {"kept": len(captions)},
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "_manifest.json",
    )
    summary = run_stage("filter", src.url, str(tmp_path / "out"), config={"languages": ["en"]})
    assert summary["kept"] == 2
    out = Dataset(str(tmp_path / "out"))
    kept = pa.concat_tables([t for _, t in out.iter_shards()])
    assert sorted(kept.column(schema.CAPTION).to_pylist()) == ["Desk Lamp", "electric guitar"]
    rej = pa.concat_tables([t for _, t in out.iter_rejects()]).sort_by(schema.UID)
    assert rej.schema.field(schema.LANGUAGE_SCORE).type == pa.float32()
    rows = {r[schema.CAPTION]: r for r in rej.to_pylist()}
    assert set(rows) == set(OTHER_SENTENCES)
    for caption, code in OTHER_SENTENCES.items():
        r = rows[caption]
        assert r[schema.DROP_REASON] == "filter:language" and r[schema.LANGUAGE] == code
        assert r[schema.LANGUAGE_DETECTOR] == "fasttext" and r[schema.LANGUAGE_SCORE] >= FilterConfig().language_min_score
