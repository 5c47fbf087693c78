"""Candidate captions for the language-ID benchmark, from real sources; a person labels them.

This script only proposes rows. ``bench/data/lang_id.tsv`` is the hand-checked result (see
``bench/data/README.md`` for how it was checked); the benchmark reads that file, never this output.

Sources (Debian bookworm packages, fetched with ``apt-get download`` into ``bench/.cache/lang_id/``
and unpacked there, nothing installed):
  - the demo corpus' titles (``demo/corpus/captions.jsonl``, openclipart titles, any length) and the
    titles of ``openclipart-svg`` of 1-4 words (each SVG's Dublin Core ``dc:title``), proposed as
    ``en?`` (the corpus also holds Italian, French and German titles: a person decides);
  - the translations in ``gsettings-desktop-schemas``, ``packagekit`` and
    ``software-properties-common`` (gettext ``.mo`` catalogs): whole sentences of 5-20 words in each
    language of ``LANGS``, proposed with the catalog's language; their English originals, proposed
    as ``en``.

    python bench/lang_candidates.py OUT.tsv [--per-lang 70] [--titles 400]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "lang_id"
CORPUS = ROOT.parent / "demo" / "corpus"
TITLE_PACKAGE = "openclipart-svg"
MO_PACKAGES = {
    "gsettings-desktop-schemas": "gsettings-desktop-schemas",
    "packagekit": "PackageKit",
    "software-properties-common": "software-properties",
}
# catalog folder -> ISO 639-1 label
LANGS = {"de": "de", "fr": "fr", "es": "es", "it": "it", "nl": "nl", "pt": "pt", "pl": "pl", "ru": "ru", "ja": "ja"}
DC = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/"}
# Titles that name a collection or a tool rather than a picture.
BORING = re.compile(
    r"clipart by|collection|theme|icons?\b|gradient|svg|openclipart|part of|symbol_signs|various|"
    r"gramastar|pattern|\d{3,}|#",
    re.IGNORECASE,
)
# Markup, placeholders, paths, option names and code: not caption-like prose.
NOT_PROSE = re.compile(r"[%{}<>_\\/=@|\[\]\"'`\n\t()]|\.\.\.|https?:|\b[A-Z]{2,}\b|\w+\.\w+|--|\d")


def unpack(package: str) -> Path:
    """The package's files, downloaded and unpacked once under the cache."""
    dest = CACHE / "root" / package
    if dest.exists():
        return dest
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True, capture_output=True)
    (deb,) = debs.glob(f"{package}_*.deb")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    tmp.rename(dest)
    return dest


def read_mo(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a gettext .mo catalog (singular entries only)."""
    data = path.read_bytes()
    order = "<" if struct.unpack("<I", data[:4])[0] == 0x950412DE else ">"
    _rev, n, ids_at, strs_at = struct.unpack(order + "4I", data[4:20])
    out = {}
    for i in range(n):
        ln, off = struct.unpack(order + "2I", data[ids_at + 8 * i : ids_at + 8 * i + 8])
        ln2, off2 = struct.unpack(order + "2I", data[strs_at + 8 * i : strs_at + 8 * i + 8])
        msgid = data[off : off + ln].decode("utf-8", "replace")
        if msgid and "\x00" not in msgid and "\x04" not in msgid:
            out[msgid] = data[off2 : off2 + ln2].decode("utf-8", "replace")
    return out


def _order(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sentence(text: str, lang: str) -> bool:
    if NOT_PROSE.search(text):
        return False
    if lang == "ja":
        return 10 <= len(text) <= 60
    return 5 <= len(text.split()) <= 20


def titles(limit: int) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    with open(CORPUS / "captions.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            e = json.loads(line)
            cap = " ".join(e["caption"].split())
            if e["kind"] == "ok" and cap.lower() not in seen:
                seen.add(cap.lower())
                rows.append((cap, "en?", f"demo/corpus/captions.jsonl:{i + 1}"))
    svg_root = unpack(TITLE_PACKAGE) / "usr/share/openclipart/svg"
    found = []
    for svg in sorted(svg_root.rglob("*.svg")):
        try:
            work = ET.parse(svg).getroot().find(".//cc:Work", DC)
        except ET.ParseError:
            continue
        title = " ".join((work.findtext("dc:title", "", DC) if work is not None else "").split())
        if not title or BORING.search(title) or "_" in title or not 1 <= len(title.split()) <= 4:
            continue
        if title.lower() in seen:
            continue
        seen.add(title.lower())
        found.append((title, "en?", f"{TITLE_PACKAGE}:{svg.relative_to(svg_root)}"))
    found.sort(key=lambda r: _order(r[0]))
    return rows + found[: max(0, limit - len(rows))]


def sentences(per_lang: int) -> list[tuple[str, str, str]]:
    rows = []
    english: dict[str, str] = {}
    for package, domain in MO_PACKAGES.items():
        root = unpack(package) / "usr/share/locale"
        for folder, lang in LANGS.items():
            mo = root / folder / "LC_MESSAGES" / f"{domain}.mo"
            if not mo.exists():
                continue
            for msgid, msgstr in read_mo(mo).items():
                msgstr = " ".join(msgstr.split())
                if msgstr and msgstr != msgid and _sentence(msgstr, lang):
                    rows.append((msgstr, lang, f"{package}:{folder}/{domain}.mo"))
                if _sentence(msgid, "en"):
                    english[msgid] = f"{package}:{domain}.pot"
    out = []
    for lang in LANGS.values():
        mine = sorted({r for r in rows if r[1] == lang}, key=lambda r: _order(r[0]))
        out += mine[:per_lang]
    en = sorted(english.items(), key=lambda kv: _order(kv[0]))[:per_lang]
    out += [(" ".join(t.split()), "en", src) for t, src in en]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-lang", type=int, default=70)
    ap.add_argument("--titles", type=int, default=400)
    args = ap.parse_args(argv)
    rows = titles(args.titles) + sentences(args.per_lang)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(["text", "lang", "source"])
        w.writerows(rows)
    print(f"{len(rows)} candidates -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
