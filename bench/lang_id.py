"""Language ID on labelled real captions: curate's filter (fastText lid.176 compact) vs lingua.

    .venv/bin/python bench/lang_id.py [--tsv bench/data/lang_id.tsv] [--rounds 3]

Data: ``bench/data/lang_id.tsv`` (text, lang, source), hand-checked; how it was made is in
``bench/data/README.md``. Both sides run in this process on the same captions:

- ours: the filter stage itself (``FilterStage`` with its defaults and ``languages: [en]``), i.e.
  ``curate.lang``'s fasttext detector, its normalisation and its ``und`` rule;
- baseline: lingua with all languages, as the filter used it before this change: top language of
  ``detect_language_of``, a caption it cannot place (None) dropped.

Figures: accuracy per language (detected == label; ``und`` counts as not detected, shown apart),
the two decisions of the English filter (English captions of 1-4 words kept, other-language
sentences dropped), the threshold sweep behind the defaults, and captions per CPU-second on one
thread for detection alone (model built and warmed up before timing; process CPU time, so a
detector's helper threads would be counted; the two are timed in alternating rounds, so both see
the same load on a shared machine). Last line: ``ratio: X.XX`` = ours / lingua's
captions per CPU-second.

``score()`` returns all of it as a dict (bench/decisions.py prints it with ``lines()``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from curate import lang, schema  # noqa: E402
from curate.stage import RunOptions, ShardContext  # noqa: E402
from curate.stages.filter import FilterConfig, FilterStage  # noqa: E402

TSV = Path(__file__).resolve().parent / "data" / "lang_id.tsv"
SHORT_WORDS = 4  # "English captions of 1-4 words"
SWEEP = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def read_tsv(path: str | Path = TSV) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        if not r["text"] or not r["lang"]:
            raise ValueError(f"{path}: a row without text or lang: {r}")
    return rows


def _is_short_en(r: dict[str, str]) -> bool:
    return r["lang"] == "en" and len(r["text"].split()) <= SHORT_WORDS


def _filter(texts: list[str], **cfg) -> tuple[list[str], list[float], list[str | None]]:
    """(language, score, drop_reason) per caption from the real filter stage."""
    stage = FilterStage(FilterConfig(**cfg))
    stage.setup()
    table = pa.table({schema.UID: [f"{i:032x}" for i in range(len(texts))], schema.CAPTION: texts})
    ctx = ShardContext(shard=0, input_path=None, input=None, output=None, plan_dir="", options=RunOptions())
    out = stage.process(table, ctx)
    return (
        out.column(schema.LANGUAGE).to_pylist(),
        out.column(schema.LANGUAGE_SCORE).to_pylist(),
        out.column(schema.DROP_REASON).to_pylist(),
    )


def _lingua():
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


def _lingua_langs(det, texts: list[str]) -> list[str | None]:
    return [(x.iso_code_639_1.name.lower() if x is not None else None) for x in map(det.detect_language_of, texts)]


def _rates(ours, base, texts: list[str], rounds: int, ours_passes: int) -> tuple[float, float]:
    """Captions per CPU-second of ``ours`` and ``base`` (both warmed up), timed in alternating rounds
    so that both see the same load on a shared machine: each round one pass of ``base`` and
    ``ours_passes`` passes of ``ours``."""
    cpu = {"ours": 0.0, "base": 0.0}
    for _ in range(rounds):
        t = time.process_time()
        base(texts)
        cpu["base"] += time.process_time() - t
        t = time.process_time()
        for _ in range(ours_passes):
            ours(texts)
        cpu["ours"] += time.process_time() - t
    n = len(texts) * rounds
    return n * ours_passes / max(cpu["ours"], 1e-9), n / max(cpu["base"], 1e-9)


def _decisions(rows, kept: list[bool]) -> dict[str, float]:
    short = [k for r, k in zip(rows, kept, strict=True) if _is_short_en(r)]
    other = [k for r, k in zip(rows, kept, strict=True) if r["lang"] != "en"]
    en_long = [k for r, k in zip(rows, kept, strict=True) if r["lang"] == "en" and not _is_short_en(r)]
    return {
        "en_short_kept": sum(short) / len(short),
        "other_dropped": 1 - sum(other) / len(other),
        "en_long_kept": sum(en_long) / len(en_long),
        "en_short_n": len(short),
        "other_n": len(other),
        "en_long_n": len(en_long),
    }


def _accuracy(rows, found: list[str | None]) -> dict[str, dict[str, float]]:
    per: dict[str, list[str | None]] = defaultdict(list)
    for r, got in zip(rows, found, strict=True):
        per[r["lang"]].append(got)
    return {
        g: {
            "n": len(v),
            "accuracy": sum(x == g for x in v) / len(v),
            "und": sum(x in (lang.UND, None) for x in v) / len(v),
        }
        for g, v in sorted(per.items())
    }


def score(tsv: str | Path = TSV, rounds: int = 3) -> dict:
    """Every figure of this benchmark on the labelled captions at ``tsv``, ours vs lingua."""
    rows = read_tsv(tsv)
    texts = [r["text"] for r in rows]
    cfg = FilterConfig()

    # ours, through the filter stage exactly as a pipeline runs it
    langs, scores, reasons = _filter(texts, languages=["en"])
    ours = {
        "detector": "fasttext lid.176.ftz (curate.lang, filter defaults)",
        "min_score": cfg.language_min_score,
        "min_score_short": cfg.language_min_score_short,
        "short_words": cfg.language_short_words,
        "accuracy": _accuracy(rows, langs),
        **_decisions(rows, [r is None for r in reasons]),
    }
    det = lang.detector("fasttext")
    det.detect(texts)  # warm-up

    # the threshold sweep behind the defaults: one threshold for all lengths, lower-cased or not,
    # and the short-caption threshold with the long one at its default
    raw = lang.FastTextDetector(lowercase=False).detect(texts)
    low = det.detect(texts)
    sweep = []
    for t in SWEEP:
        for name, found, need_short in (("single, lower-cased", low, t), ("single, as written", raw, t)):
            dec = lang.decide(texts, found, t, need_short, SHORT_WORDS)
            sweep.append({"rule": name, "min_score": t, "min_score_short": need_short,
                          **_decisions(rows, [x in ("en", lang.UND) for x, _ in dec])})
        for name, found in (("short/long, lower-cased", low), ("short/long, as written", raw)):
            dec = lang.decide(texts, found, cfg.language_min_score, t, SHORT_WORDS)
            sweep.append({"rule": name, "min_score": cfg.language_min_score, "min_score_short": t,
                          **_decisions(rows, [x in ("en", lang.UND) for x, _ in dec])})

    # baseline: lingua, all languages, as the filter used it before (None is dropped)
    ling = _lingua()
    t0 = time.perf_counter()
    base_langs = _lingua_langs(ling, texts)  # also the warm-up: lingua loads its models lazily
    base_first_pass_s = time.perf_counter() - t0
    base = {
        "detector": "lingua, all languages (the filter before this change)",
        "accuracy": _accuracy(rows, base_langs),
        **_decisions(rows, [x == "en" for x in base_langs]),
        "first_pass_s": base_first_pass_s,
    }
    ours["captions_per_cpu_s"], base["captions_per_cpu_s"] = _rates(
        det.detect, lambda ts: _lingua_langs(ling, ts), texts, rounds, 100
    )
    failures = [
        {"text": r["text"], "label": r["lang"], "ours": g, "score": s}
        for r, g, s, why in zip(rows, langs, scores, reasons, strict=True)
        if (_is_short_en(r) and why is not None) or (r["lang"] != "en" and why is None)
    ]
    return {
        "rows": len(rows),
        "languages": sorted({r["lang"] for r in rows}),
        "ours": ours,
        "lingua": base,
        "sweep": sweep,
        "ours_decision_failures": failures,
        "ratio": ours["captions_per_cpu_s"] / base["captions_per_cpu_s"],
    }


def lines(res: dict) -> list[str]:
    """The result of ``score`` as printable lines (without the final ratio line)."""
    out = [f"language ID: {res['rows']} labelled captions in {len(res['languages'])} languages "
           f"({', '.join(res['languages'])})"]
    for key in ("ours", "lingua"):
        r = res[key]
        out.append(f"{key}: {r['detector']}")
        acc = "  ".join(f"{g} {v['accuracy']:.3f}" + (f" (und {v['und']:.2f})" if v["und"] else "")
                        for g, v in r["accuracy"].items())
        out.append(f"  accuracy: {acc}")
        out.append(
            f"  languages [en]: English 1-{SHORT_WORDS} words kept {r['en_short_kept']:.3f} (n={r['en_short_n']}), "
            f"other-language sentences dropped {r['other_dropped']:.3f} (n={r['other_n']}), "
            f"longer English kept {r['en_long_kept']:.3f} (n={r['en_long_n']})"
        )
        out.append(f"  speed: {r['captions_per_cpu_s']:,.0f} captions per CPU-second, one thread")
    o = res["ours"]
    out.append(f"ours: min_score {o['min_score']} (> {o['short_words']} words), "
               f"min_score_short {o['min_score_short']} (<= {o['short_words']} words)")
    for f in res["ours_decision_failures"]:
        out.append(f"  ours wrong: {f['text']!r} label {f['label']} -> {f['ours']} {f['score']:.2f}")
    out.append("sweep (languages [en]; und kept): rule, min_score, min_score_short -> "
               "English short kept / other dropped / longer English kept")
    for s in res["sweep"]:
        out.append(f"  {s['rule']:<24} {s['min_score']:.1f} {s['min_score_short']:.1f} -> "
                   f"{s['en_short_kept']:.3f} / {s['other_dropped']:.3f} / {s['en_long_kept']:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tsv", default=str(TSV))
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds: 1 lingua pass + 100 of ours each")
    args = ap.parse_args(argv)
    res = score(args.tsv, args.rounds)
    for line in lines(res):
        print(line)
    print(f"ratio: {res['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
