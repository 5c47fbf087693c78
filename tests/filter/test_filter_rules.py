"""filter, rule by rule: each limit at, just below and just above it; each option on, off and inverted.

The expected verdicts are written in the tables by hand from the rule's definition in the module
docstring and the README (">=" for minimums, "<=" for maximums, sizes from the original image unless
``size_from: stored``), never computed with the stage. No Ray: one ``process`` call per table.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate import schema
from curate.config import ConfigError
from curate.dataset import uid_for
from curate.stage import RunOptions, ShardContext
from curate.stages.filter import FilterConfig, FilterStage

CTX = ShardContext(shard=0, input_path=None, input=None, output=None, plan_dir="", options=RunOptions())
BASE = {
    schema.URL: "http://example.com/a.jpg",
    schema.CAPTION: "a photo of a dog on the beach",
    schema.WIDTH: 400,
    schema.HEIGHT: 300,
    schema.IMAGE_FORMAT: "jpg",
    schema.SHA256: "ab" * 32,
}


def verdicts(rows: list[dict], **cfg) -> list[str | None]:
    stage = FilterStage(FilterConfig(**cfg))
    stage.setup()
    table = pa.Table.from_pylist([{schema.UID: uid_for("r", i), **BASE, **r} for i, r in enumerate(rows)])
    return stage.process(table, CTX).column(schema.DROP_REASON).to_pylist()


def wh(w, h) -> dict:
    return {schema.WIDTH: w, schema.HEIGHT: h}


def cap(text) -> dict:
    return {schema.CAPTION: text}


KEEP = None
# (config, [(row, expected reason or KEEP), ...]): every limit at, just below and just above it, and
# the same on the other axis where the rule reads both.
TABLE = {
    "min_side": (
        {"min_side": 200},
        [
            (wh(199, 500), "min_side"), (wh(200, 500), KEEP), (wh(201, 500), KEEP),
            (wh(500, 199), "min_side"), (wh(500, 200), KEEP),
            (wh(None, 500), "min_side"), (wh(0, 500), "min_side"), (wh(500, None), "min_side"),
        ],
    ),
    "max_side": (
        {"max_side": 1000},
        [
            (wh(999, 10), KEEP), (wh(1000, 10), KEEP), (wh(1001, 10), "max_side"),
            (wh(10, 1000), KEEP), (wh(10, 1001), "max_side"),
            (wh(None, 10), "max_side"), (wh(10, 0), "max_side"),
        ],
    ),
    "aspect_ratio": (
        {"max_aspect_ratio": 2.0},
        [
            (wh(200, 100), KEEP), (wh(199, 100), KEEP), (wh(201, 100), "aspect_ratio"),
            (wh(100, 200), KEEP), (wh(100, 201), "aspect_ratio"), (wh(100, 100), KEEP),
            (wh(None, 100), "aspect_ratio"), (wh(100, 0), "aspect_ratio"),
        ],
    ),
    "aspect_ratio_fractional": (
        {"max_aspect_ratio": 1.5},
        [(wh(150, 100), KEEP), (wh(151, 100), "aspect_ratio"), (wh(100, 151), "aspect_ratio")],
    ),
    "min_pixels": (
        {"min_pixels": 10_000},
        [
            (wh(100, 100), KEEP), (wh(99, 101), "min_pixels"), (wh(101, 99), "min_pixels"),
            (wh(101, 100), KEEP), (wh(None, 10_000), "min_pixels"), (wh(10_000, 0), "min_pixels"),
        ],
    ),
    "max_pixels": (
        {"max_pixels": 10_000},
        [
            (wh(100, 100), KEEP), (wh(100, 101), "max_pixels"), (wh(101, 100), "max_pixels"),
            (wh(99, 101), KEEP), (wh(1, 1), KEEP), (wh(None, 10), "max_pixels"), (wh(10, 0), "max_pixels"),
        ],
    ),
    "caption_min_words": (
        {"caption_min_words": 3},
        [
            (cap("red dog"), "caption_min_words"), (cap("a red dog"), KEEP), (cap("a big red dog"), KEEP),
            (cap("  a\tred\ndog  "), KEEP), (cap("a   red   "), "caption_min_words"),
            (cap(""), "caption_min_words"), (cap(None), "caption_min_words"),
        ],
    ),
    "caption_min_chars": (
        {"caption_min_chars": 6},
        [
            (cap("abcde"), "caption_min_chars"), (cap("abcdef"), KEEP), (cap("abcdefg"), KEEP),
            (cap("   abcde   "), "caption_min_chars"), (cap("ab  de"), KEEP),
            (cap(""), "caption_min_chars"), (cap(None), "caption_min_chars"),
        ],
    ),
    "caption_max_chars": (
        {"caption_max_chars": 10},
        [
            (cap("x" * 9), KEEP), (cap("x" * 10), KEEP), (cap("x" * 11), "caption_max_chars"),
            (cap("  " + "x" * 10 + "  "), KEEP), (cap("x" * 5 + " " + "x" * 5), "caption_max_chars"),
            (cap(None), KEEP),
        ],
    ),
    "format": (
        {"formats": ["jpeg", "PNG"]},
        [
            ({schema.IMAGE_FORMAT: "jpg"}, KEEP), ({schema.IMAGE_FORMAT: "JPEG"}, KEEP),
            ({schema.IMAGE_FORMAT: "png"}, KEEP), ({schema.IMAGE_FORMAT: "webp"}, "format"),
            ({schema.IMAGE_FORMAT: None}, "format"), ({schema.IMAGE_FORMAT: ""}, "format"),
        ],
    ),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_rule_limits(name):
    cfg, cases = TABLE[name]
    want = [None if r is KEEP else f"filter:{r}" for _, r in cases]
    assert verdicts([row for row, _ in cases], **cfg) == want


@pytest.mark.parametrize("name", list(TABLE))
def test_every_rule_is_off_when_unset(name):
    # the same rows with no option set: nothing is rejected (an unset rule never runs)
    _, cases = TABLE[name]
    assert verdicts([row for row, _ in cases]) == [None] * len(cases)


def test_size_from_original_or_stored():
    rows = [
        {**wh(150, 150), schema.ORIGINAL_WIDTH: 900, schema.ORIGINAL_HEIGHT: 600},  # resized on download
        {**wh(900, 600), schema.ORIGINAL_WIDTH: 150, schema.ORIGINAL_HEIGHT: 150},
        {**wh(150, 150), schema.ORIGINAL_WIDTH: None, schema.ORIGINAL_HEIGHT: None},  # falls back to stored
        {**wh(150, 900), schema.ORIGINAL_WIDTH: 900, schema.ORIGINAL_HEIGHT: None},  # per axis
        {**wh(900, 150), schema.ORIGINAL_WIDTH: 0, schema.ORIGINAL_HEIGHT: 900},
    ]
    assert verdicts(rows, min_side=200) == [None, "filter:min_side", "filter:min_side", None, None]
    assert verdicts(rows, min_side=200, size_from="stored") == [
        "filter:min_side", None, "filter:min_side", "filter:min_side", "filter:min_side"
    ]


def test_first_failing_rule_in_the_documented_order_wins():
    # one row that fails every rule: each rule in turn is switched off and the next one names it
    row = {
        **wh(50, 500), schema.IMAGE_FORMAT: "gif", schema.CAPTION: "xx",
        schema.URL: "http://bad.example/spam", schema.SHA256: "cd" * 32,
    }
    rules = [
        ("format", {"formats": ["jpg"]}),
        ("min_side", {"min_side": 100}),
        ("max_side", {"max_side": 400}),
        ("aspect_ratio", {"max_aspect_ratio": 2.0}),
        ("min_pixels", {"min_pixels": 30_000}),
        ("max_pixels", {"max_pixels": 20_000}),
        ("caption_min_words", {"caption_min_words": 2}),
        ("caption_min_chars", {"caption_min_chars": 3}),
        ("caption_max_chars", {"caption_max_chars": 1}),
        ("caption_blocklist", {"caption_blocklist": {"substrings": ["xx"]}}),
        ("url_blocklist", {"url_blocklist": {"domains": ["bad.example"]}}),
        ("sha256_blocklist", {"sha256_blocklist": ["cd" * 32]}),
    ]
    for i, (name, _) in enumerate(rules):
        cfg = {k: v for _, c in rules[i:] for k, v in c.items()}
        if "caption_min_chars" in cfg:  # min 3 > max 1 is refused; min_chars decides first anyway
            del cfg["caption_max_chars"]
        assert verdicts([row], **cfg) == [f"filter:{name}"], name
    assert FilterStage.RULES == (
        "format", "min_side", "max_side", "aspect_ratio", "min_pixels", "max_pixels", "caption_min_words",
        "caption_min_chars", "caption_max_chars", "language", "caption_blocklist", "url_blocklist",
        "sha256_blocklist",
    )


def test_a_rejected_row_keeps_its_first_reason():
    # min_side rejects first; the caption rule that also fails must not overwrite it, and the next
    # row (which passes min_side) still gets the caption rule
    got = verdicts([{**wh(10, 10), **cap("x")}, cap("x")], min_side=100, caption_min_chars=3)
    assert got == ["filter:min_side", "filter:caption_min_chars"]


CAPTION_BL = [
    # (blocklist, caption, hit)
    ({"substrings": ["cheap watch"]}, "Buy CHEAP WATCHES now", True),
    ({"substrings": ["cheap watch"]}, "cheap  watch", False),
    ({"substrings": ["a.b"]}, "axb", False),  # substrings are literal, not patterns
    ({"substrings": ["a.b"]}, "see a.b here", True),
    ({"regexes": [r"casin[o0]"]}, "CASIN0 night", True),
    ({"regexes": [r"casin[o0]"]}, "casina", False),
    ({"regexes": [r"^spam"]}, "not spam", False),
    ({"words": ["nsfw"]}, "an NSFW picture", True),
    ({"words": ["nsfw"]}, "nsfwish", False),
    ({"words": ["nsfw"]}, "xnsfw", False),
    ({"words": ["nsfw"]}, "(nsfw)", True),
    ({"words": ["a.b"]}, "see a.b here", True),  # escaped: a word with a regex character
    ({"words": ["a.b"]}, "see axb here", False),
    ({"substrings": ["zzz"], "words": ["dog"]}, "a dog", True),  # any list hits
    ({"substrings": ["zzz"], "words": ["dog"]}, "a cat", False),
]


@pytest.mark.parametrize(("bl", "text", "hit"), CAPTION_BL)
def test_caption_blocklist(bl, text, hit):
    rows = [cap(text), cap("nothing to see"), cap(None)]
    assert verdicts(rows, caption_blocklist=bl) == ["filter:caption_blocklist" if hit else None, None, None]


URL_BL = [
    ({"domains": ["bad.example"]}, "https://bad.example/x.jpg", True),
    ({"domains": ["bad.example"]}, "https://img.cdn.bad.example/x.jpg", True),  # any subdomain
    ({"domains": ["bad.example"]}, "https://notbad.example/x.jpg", False),  # not a suffix match
    ({"domains": ["bad.example"]}, "https://bad.example.com/x.jpg", False),
    ({"domains": ["bad.example"]}, "https://BAD.Example.:8080/x.jpg", True),  # case, trailing dot, port
    ({"domains": ["Bad.Example."]}, "https://bad.example/x.jpg", True),  # the list is normalised too
    ({"domains": ["bad.example"]}, "https://good.example/?next=bad.example", False),  # host only
    ({"domains": ["bad.example"]}, "http://[::1/x", False),  # unparseable: no hit, no crash
    ({"domains": ["example"]}, "https://a.b.example/x", True),
    ({"substrings": ["/tracking/"]}, "https://ok.com/tracking/x.jpg", True),
    ({"substrings": ["/tracking/"]}, "https://ok.com/track/x.jpg", False),
    ({"regexes": [r"\.gif$"]}, "https://ok.com/a.GIF", True),
]


@pytest.mark.parametrize(("bl", "url", "hit"), URL_BL)
def test_url_blocklist(bl, url, hit):
    rows = [{schema.URL: url}, {schema.URL: "https://fine.org/a.jpg"}, {schema.URL: None}]
    assert verdicts(rows, url_blocklist=bl) == ["filter:url_blocklist" if hit else None, None, None]


def test_sha256_blocklist_case_and_files(tmp_path):
    (tmp_path / "sha.txt").write_text("# a comment\n\n  " + "CD" * 32 + "  \n")
    rows = [{schema.SHA256: "cd" * 32}, {schema.SHA256: "EF" * 32}, {schema.SHA256: "ab" * 32},
            {schema.SHA256: None}]
    want = ["filter:sha256_blocklist", "filter:sha256_blocklist", None, None]
    assert verdicts(rows, sha256_blocklist=["ef" * 32], sha256_blocklist_files=[str(tmp_path / "sha.txt")]) == want
    assert verdicts(rows, sha256_blocklist=["EF" * 32, "cd" * 32]) == want
    assert verdicts(rows) == [None] * 4


def test_blocklist_files_of_each_kind(tmp_path):
    def lines(name, *items):
        p = tmp_path / name
        p.write_text("# comment line\n\n" + "\n".join(f"  {s}  " for s in items) + "\n")
        return str(p)

    caption = {
        "substring_files": [lines("subs.txt", "cheap watch")],
        "regex_files": [lines("re.txt", r"casin[o0]")],
        "word_files": [lines("words.txt", "nsfw")],
    }
    rows = [cap("cheap watches"), cap("casin0"), cap("an nsfw one"), cap("nsfwish"), cap("# comment line")]
    assert verdicts(rows, caption_blocklist=caption) == ["filter:caption_blocklist"] * 3 + [None, None]
    url = {"domain_files": [lines("dom.txt", "bad.example")]}
    rows = [{schema.URL: "https://x.bad.example/a"}, {schema.URL: "https://good.example/a"}]
    assert verdicts(rows, url_blocklist=url) == ["filter:url_blocklist", None]


def test_blocklist_file_missing_is_refused_before_work(tmp_path):
    # the one line names which list and which file
    stage = FilterStage(FilterConfig(sha256_blocklist_files=[str(tmp_path / "nope.txt")]))
    with pytest.raises(ConfigError, match=r"^sha256 blocklist .*nope\.txt not found"):
        stage.check(None)
    stage = FilterStage(FilterConfig(caption_blocklist={"word_files": [str(tmp_path / "gone.txt")]}))
    with pytest.raises(ConfigError, match=r"^caption blocklist .*gone\.txt not found"):
        stage.check(None)
    stage = FilterStage(FilterConfig(url_blocklist={"domain_files": [str(tmp_path / "gone2.txt")]}))
    with pytest.raises(ConfigError, match=r"^url blocklist .*gone2\.txt not found"):
        stage.check(None)
    (tmp_path / "ok.txt").write_text("x\n")
    FilterStage(FilterConfig(caption_blocklist={"regex_files": [str(tmp_path / "ok.txt")]})).check(None)


def test_config_limits():
    # equal min and max chars is a valid (one-length) window; min above max is refused
    assert verdicts([cap("abcde"), cap("abcd"), cap("abcdef")], caption_min_chars=5, caption_max_chars=5) == [
        None, "filter:caption_min_chars", "filter:caption_max_chars"
    ]
    with pytest.raises(ValueError, match="caption_min_chars > caption_max_chars"):
        FilterConfig(caption_min_chars=6, caption_max_chars=5)
    for field, bad in (("min_side", 0), ("max_side", 0), ("min_pixels", 0), ("max_pixels", 0),
                       ("caption_min_words", 0), ("caption_min_chars", 0), ("caption_max_chars", 0),
                       ("max_aspect_ratio", 0.99)):
        with pytest.raises(ValueError):
            FilterConfig(**{field: bad})
    FilterConfig(max_aspect_ratio=1.0, min_side=1)
    assert FilterConfig(formats=["JPEG", "Png"]).formats == ["jpg", "png"]
    assert FilterConfig(languages=["EN"], language_candidates=["EN", "De"]).language_candidates == ["en", "de"]
    with pytest.raises(ValueError, match="languages must be among language_candidates"):
        FilterConfig(languages=["en", "fr"], language_candidates=["en", "de"])
    with pytest.raises(ValueError, match="need language_detector: lingua"):
        FilterConfig(language_low_accuracy=True)
    with pytest.raises(ValueError, match="unknown preset"):
        FilterConfig(preset="datacomp_nope")


def test_preset_fields_and_overrides():
    cfg = FilterConfig(preset="datacomp_basic")
    assert (cfg.min_side, cfg.max_aspect_ratio, cfg.caption_min_words, cfg.caption_min_chars, cfg.languages) == (
        200, 3.0, 3, 6, ["en"]
    )
    assert FilterConfig(preset="datacomp_basic", caption_min_words=1).caption_min_words == 1
    assert FilterConfig().min_side is None and FilterConfig().languages is None
