"""``curate report DATASET``: one self-contained HTML page (and its JSON twin) about a curated dataset.

The page follows the lineage back from DATASET (each manifest names its input; we follow it while
that input is a complete curate dataset) and shows:

- the lineage as a small diagram, and the funnel: rows in, kept and dropped by reason for every stage,
  from the manifests (exact);
- histograms of clip_score, recaption_clip_score, width/height, aspect ratio, caption length and
  language: the kept rows of the latest dataset of the lineage that has the column, against the
  rejects of every stage whose rejected rows carry it, one overlay per drop reason;
- example grids: kept samples, and rejected samples per reason with the image behind their pointer;
- example duplicate clusters (a representative and the rejects whose ``dup_of`` names it);
- per-stage throughput (rows in per second of the stage's wall time, and per shard-second).

Every drop reason has one colour, the same in every plot, table and heading; kept rows have their own.
Everything is inline: plots are SVG drawn with matplotlib's Agg backend (vector, so zooming stays
sharp), thumbnails are base64 JPEGs, and a few lines of plain JavaScript (no library) make plots
zoomable (wheel, drag, double-click to reset) and tables sortable. Nothing is fetched from the network:
the file opens anywhere, offline. Histograms read only their columns, and at most ``max_rows`` rows per
dataset (whole shards in order; the page says when it sampled). Funnel and throughput never sample.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema
from curate.dataset import Dataset, read_images

log = logging.getLogger(__name__)

MAX_ROWS = 200_000
EXAMPLES = 12
REJECT_EXAMPLES = 6
DUP_CLUSTERS = 4
THUMB = 112
THUMB_MAX_PIXELS = 40_000_000  # a report never decodes more than this for one thumbnail
KEPT_COLOR = "#1f4e8c"
# Reasons get these in order of first appearance along the lineage: distinct hues, none close to the
# kept colour (no blues), readable on white.
REASON_PALETTE = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                  "#7f7f7f", "#ff9896", "#c49c94", "#98df8a", "#f7b6d2", "#dbdb8d", "#c5b0d5", "#ffbb78",
                  "#9edae5", "#b5cf6b", "#637939", "#843c39"]
REPORT_VERSION = 2  # part of the fingerprint: a new page layout is a new report


def reason_colors(funnel_rows: list[dict[str, Any]]) -> dict[str, str]:
    """reason -> colour, stable for a lineage: reasons in stage order, then by name within a stage."""
    out: dict[str, str] = {}
    for f in funnel_rows:
        for r in sorted(f["drops"]):
            if r not in out:
                out[r] = REASON_PALETTE[len(out) % len(REASON_PALETTE)]
    return out


def fingerprint(chain: list[Dataset]) -> str:
    """Changes when any manifest of the lineage changes (a rerun, a removal) or the page's layout does."""
    from curate.config import fingerprint as fp

    return fp([REPORT_VERSION, [d.manifest() for d in chain]])


@dataclasses.dataclass
class Report:
    data: dict[str, Any]  # the JSON twin: numbers and ids, no images
    plots: dict[str, str]  # name -> base64 PNG
    grids: list[dict[str, Any]]  # title, dataset, items [{thumb (base64 jpeg), caption, uid, note}]
    clusters: list[dict[str, Any]]


# -- lineage and funnel -------------------------------------------------------------------------
def lineage(ds: Dataset) -> list[Dataset]:
    """The datasets that led to ``ds``, oldest first, as far back as they exist and are complete,
    followed on storage only and found beside ``ds`` when it was copied (:mod:`curate.lineage`)."""
    from curate.lineage import lineage as walk

    return walk(ds).datasets[::-1]


def _num(value: Any) -> float:
    """A manifest's number as a number: a manifest is a file anyone can edit, and what it holds in
    place of a number (text, markup) must never reach the page."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _int(value: Any) -> int:
    return int(_num(value))


def funnel(chain: list[Dataset]) -> list[dict[str, Any]]:
    rows = []
    for ds in chain:
        m = ds.manifest()
        t = m.get("totals") if isinstance(m.get("totals"), dict) else {}
        seconds = float(_num(m.get("seconds")))
        shard_seconds = float(_num(t.get("shard_seconds")))
        rows_in = _int(t.get("rows_in"))
        drops = t.get("drops") if isinstance(t.get("drops"), dict) else {}
        removals = m.get("removals") if isinstance(m.get("removals"), list) else []
        rows.append({
            "stage": str(m.get("stage")),
            "dataset": ds.url,
            "shards": len(m["shards"]) if isinstance(m.get("shards"), list) else 0,
            "rows_in": rows_in,
            "kept": _int(t.get("kept")),
            "dropped": _int(t.get("dropped")),
            "drops": {str(k): _int(v) for k, v in drops.items()},
            "seconds": seconds,
            "rows_per_second": rows_in / seconds if seconds > 0 else None,
            "rows_per_shard_second": rows_in / shard_seconds if shard_seconds > 0 else None,
            "removals": sum(_int(r.get("count")) for r in removals if isinstance(r, dict)),
            "created": str(m.get("created")),
        })
    return rows


# -- column data --------------------------------------------------------------------------------
def _read(ds: Dataset, columns: list[str], rejects: bool, max_rows: int) -> tuple[pa.Table | None, bool]:
    """Up to ``max_rows`` rows of ``columns`` (whole shards, in order); and whether it stopped early."""
    parts, n = [], 0
    ids = ds.shard_ids()
    for i, shard in enumerate(ids):
        if rejects and not ds.fs.exists(ds.shard_path(shard, "rejects.parquet")):
            continue
        t = ds.read_rejects(shard, columns) if rejects else ds.read_shard(shard, columns)
        if not set(columns) <= set(t.column_names):
            return None, False
        parts.append(t.select(columns))
        n += t.num_rows
        if n >= max_rows:
            return pa.concat_tables(parts), i + 1 < len(ids)
    return (pa.concat_tables(parts) if parts else None), False


def _has(ds: Dataset, column: str) -> bool:
    sch = ds.schema()
    return sch is not None and column in sch.names


def _latest_with(chain: list[Dataset], column: str) -> Dataset | None:
    return next((ds for ds in reversed(chain) if _has(ds, column)), None)


HISTOGRAMS: list[tuple[str, str, list[str]]] = [
    # (name, title, columns it needs)
    ("clip_score", "CLIP score (image vs caption)", [schema.CLIP_SCORE]),
    ("recaption_clip_score", "CLIP score of the recaption", [schema.RECAPTION_CLIP_SCORE]),
    ("width", "width (px)", [schema.WIDTH]),
    ("height", "height (px)", [schema.HEIGHT]),
    ("aspect_ratio", "aspect ratio (width / height)", [schema.WIDTH, schema.HEIGHT]),
    ("original_width", "original width before resizing (px)", [schema.ORIGINAL_WIDTH]),
    ("original_height", "original height before resizing (px)", [schema.ORIGINAL_HEIGHT]),
    ("caption_length", "caption length (characters)", [schema.CAPTION]),
]


def _rejected(chain: list[Dataset], cols: list[str], max_rows: int) -> tuple[pa.Table | None, bool, list[str]]:
    """Rejects of every stage of the lineage whose rejected rows carry ``cols`` (and their
    ``drop_reason``, last): the distribution of what the pipeline dropped, against what was kept."""
    parts, sampled, stages = [], False, []
    for ds in chain:
        t, s = _read(ds, [*cols, schema.DROP_REASON], True, max_rows)
        if t is not None and t.num_rows:
            parts.append(t)
            sampled |= s
            stages.append(ds.manifest()["stage"])
    return (pa.concat_tables(parts) if parts else None), sampled, stages


def _by_reason(name: str, rej: pa.Table | None) -> dict[str, list[float]]:
    if rej is None:
        return {}
    out: dict[str, list[float]] = {}
    reasons = rej.column(schema.DROP_REASON)
    for r in sorted(set(reasons.to_pylist()) - {None}):
        out[r] = _values(name, rej.filter(pc.equal(reasons, r)))
    return out


def _values(name: str, table: pa.Table) -> list[float]:
    if name == "aspect_ratio":
        w = pc.cast(table.column(schema.WIDTH), pa.float64())
        h = pc.cast(table.column(schema.HEIGHT), pa.float64())
        ok = pc.and_(pc.is_valid(w), pc.greater(pc.fill_null(h, 0.0), 0.0))
        return pc.divide(w.filter(ok), h.filter(ok)).to_pylist()
    if name == "caption_length":
        return [float(x) for x in pc.utf8_length(table.column(schema.CAPTION)).to_pylist() if x is not None]
    return [float(x) for x in table.column(0).to_pylist() if x is not None]


def histograms(chain: list[Dataset], max_rows: int = MAX_ROWS, bins: int = 30) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    for name, title, cols in HISTOGRAMS:
        ds = _latest_with(chain, cols[0])
        if ds is None or not all(_has(ds, c) for c in cols):
            continue
        kept, k_sampled = _read(ds, cols, False, max_rows)
        rej, r_sampled, rej_stages = _rejected(chain, cols, max_rows)
        series = {"kept": _values(name, kept) if kept is not None else [],
                  "rejected": _values(name, rej) if rej is not None else []}
        per_reason = _by_reason(name, rej)
        allv = series["kept"] + series["rejected"]
        if not allv:
            continue
        lo, hi = min(allv), max(allv)
        if hi > lo:
            edges = np.linspace(lo, hi, bins + 1)
        else:  # one value: one visible bar centred on it
            edges = np.array([lo - 0.5, lo + 0.5]) if lo >= 1 else np.array([lo - 0.05, lo + 0.05])
        out[name] = {
            "title": title, "dataset": ds.url, "stage": ds.manifest()["stage"], "edges": edges.tolist(),
            "rejected_by": rej_stages,
            "counts": {k: np.histogram(v, edges)[0].tolist() for k, v in series.items()},
            "counts_by_reason": {r: np.histogram(v, edges)[0].tolist() for r, v in per_reason.items() if v},
            "n": {k: len(v) for k, v in series.items()},
            "mean": {k: float(np.mean(v)) if v else None for k, v in series.items()},
            "sampled": k_sampled or r_sampled,
        }
    ds = _latest_with(chain, schema.LANGUAGE)
    if ds is not None:
        kept, k_sampled = _read(ds, [schema.LANGUAGE], False, max_rows)
        rej, r_sampled, rej_stages = _rejected(chain, [schema.LANGUAGE], max_rows)
        counts = {k: dict(Counter(str(x) for x in t.column(0).to_pylist()).most_common(15)) if t is not None else {}
                  for k, t in (("kept", kept), ("rejected", rej))}
        by_reason: dict[str, dict[str, int]] = {}
        if rej is not None:
            for lang, reason in zip(rej.column(0).to_pylist(), rej.column(schema.DROP_REASON).to_pylist(),
                                    strict=True):
                by_reason.setdefault(reason, Counter())[str(lang)] += 1
        out["language"] = {"title": "language", "dataset": ds.url, "stage": ds.manifest()["stage"],
                           "categories": counts, "categories_by_reason": {r: dict(c) for r, c in by_reason.items()},
                           "rejected_by": rej_stages, "sampled": k_sampled or r_sampled}
    return out


# -- examples -----------------------------------------------------------------------------------
def _thumb(data: bytes | None) -> str | None:
    if not data:
        return None
    from curate.images import ImageRejected, open_image

    try:
        # the same allowlist as every stage, and a cap far below a stage's: a thumbnail never needs
        # a big decode, and a rejected bomb is exactly what a report shows
        im = open_image(data, THUMB_MAX_PIXELS)
    except ImageRejected:
        return None
    try:
        with im:
            im.draft("RGB", (THUMB * 2, THUMB * 2))
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image is shown as missing, not fatal to the page
        return None
    return base64.b64encode(buf.getvalue()).decode()


def _items(table: pa.Table, ds: Dataset, note_col: str | None = None) -> list[dict[str, Any]]:
    blobs = read_images(table, ds)
    cols = table.column_names
    out = []
    for i, row in enumerate(table.select([c for c in cols if c not in (
            schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING, schema.COLOR_SIG, schema.PHASH_CROPS)]).to_pylist()):
        note = []
        if note_col and row.get(note_col):
            note.append(str(row[note_col]))
        for c in (schema.CLIP_SCORE, schema.WIDTH):
            if row.get(c) is not None:
                note.append(f"{c} {row[c]:.3f}" if isinstance(row[c], float) else f"{row[schema.WIDTH]}×{row.get(schema.HEIGHT)}")
        out.append({"uid": row.get(schema.UID), "caption": row.get(schema.CAPTION) or "",
                    "recaption": row.get(schema.RECAPTION), "note": " · ".join(note),
                    "thumb": _thumb(blobs[i])})
    return out


def _first_rows(ds: Dataset, rejects: bool, limit: int, reason: str | None = None) -> pa.Table | None:
    parts, n = [], 0
    for shard in ds.shard_ids():
        if rejects:
            if not ds.fs.exists(ds.shard_path(shard, "rejects.parquet")):
                continue
            t = ds.read_rejects(shard)
            if reason is not None:
                t = t.filter(pc.equal(t.column(schema.DROP_REASON), reason))
        else:
            t = ds.read_shard(shard)
        if t.num_rows:
            parts.append(t.slice(0, limit - n))
            n += parts[-1].num_rows
        if n >= limit:
            break
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def grids(chain: list[Dataset]) -> list[dict[str, Any]]:
    out = []
    final = chain[-1]
    kept = _first_rows(final, False, EXAMPLES)
    if kept is not None:
        out.append({"title": f"kept by {final.manifest()['stage']} (first {kept.num_rows})",
                    "dataset": final.url, "reason": None, "items": _items(kept, final)})
    for ds in chain:
        for reason in ds.manifest()["totals"]["drops"]:
            rows = _first_rows(ds, True, REJECT_EXAMPLES, reason)
            if rows is None:
                continue
            out.append({"title": f"rejected: {reason}", "dataset": ds.url, "reason": reason,
                        "items": _items(rows, ds, schema.ERROR_MESSAGE)})
    return out


def dup_clusters(chain: list[Dataset], limit: int = DUP_CLUSTERS) -> list[dict[str, Any]]:
    """The largest duplicate clusters of every dataset in the lineage whose rejects carry ``dup_of``
    (dedup's exact / near / caption clusters, semdedup's), labelled by stage. Each member shows its
    drop reason and, where the stage recorded them (dedup), its pHash distance to the kept row and
    the confirmation score (colour Delta-E or CLIP cosine)."""
    out = []
    for ds in chain:
        rej, _ = _read(ds, [schema.UID, schema.DUP_OF, schema.DROP_REASON], True, MAX_ROWS)
        if rej is None or rej.num_rows == 0 or schema.DUP_OF not in rej.column_names:
            continue
        groups: dict[str, list[tuple[str, str]]] = {}
        reasons = rej.column(schema.DROP_REASON).to_pylist()
        for uid, rep, why in zip(rej.column(0).to_pylist(), rej.column(1).to_pylist(), reasons, strict=True):
            if rep:
                groups.setdefault(rep, []).append((uid, why))
        if not groups:
            continue
        stage = ds.manifest()["stage"]
        detail: dict[str, dict[str, Any]] = {}
        if stage == "dedup":
            from curate.stages.dedup import cluster_members

            detail = cluster_members(ds)
        top = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:limit]
        wanted = {u for rep, members in top for u in [rep, *(m for m, _ in members[:5])]}
        found: dict[str, pa.Table] = {}
        for it in (ds.iter_shards(), ds.iter_rejects()):
            for _, t in it:
                hit = t.filter(pc.is_in(t.column(schema.UID), pa.array(sorted(wanted))))
                for i in range(hit.num_rows):
                    found[hit.column(schema.UID)[i].as_py()] = hit.slice(i, 1)
        for rep, members in top:
            why = dict(members)
            uids = [rep, *(m for m, _ in members[:5])]
            rows = [found[u] for u in uids if u in found]
            items = _items(pa.concat_tables(rows, promote_options="permissive"), ds) if rows else []
            for item in items:
                item["note"] = _member_note(item["uid"] == rep, why.get(item["uid"]), detail.get(item["uid"]))
            kinds = Counter(w for _, w in members)
            out.append({"representative": rep, "size": 1 + len(members), "dataset": ds.url, "stage": stage,
                        "reasons": dict(kinds), "items": items})
    return out


def _member_note(kept: bool, reason: str | None, detail: dict[str, Any] | None) -> str:
    if kept:
        return "kept"
    parts = [reason or "duplicate"]
    if detail and detail.get("distance") is not None:
        where = "a crop of " if detail.get("crop") else ""
        parts.append(f"{detail['distance']} bits from {where}the kept row")
    if detail and detail.get("confirm") is not None:
        parts.append(f"{detail.get('signal') or 'confirmation'} {detail['confirm']:.2f}")
    return ", ".join(parts)


# -- plots --------------------------------------------------------------------------------------
def _svg(fig) -> str:
    """The figure as a base64 SVG (text kept as text, so it stays sharp and searchable when zoomed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _legend_outside(ax, ncol: int = 1) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False,
                  ncol=ncol)


def _short(stage: str) -> str:
    return stage.rsplit(":", 1)[-1]


def plots(data: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "curate-report"})
    colors = data["colors"]
    out = {}
    fun = data["funnel"]
    if fun:
        fig, ax = plt.subplots(figsize=(13, 0.9 + 0.45 * len(fun)))
        labels = [f"{i + 1}. {_short(f['stage'])}" for i, f in enumerate(fun)][::-1]
        y = np.arange(len(fun))
        kept = np.array([f["kept"] for f in fun][::-1], dtype=float)
        ax.barh(y, kept, color=KEPT_COLOR, label="kept")
        left = kept.copy()
        for reason, color in colors.items():
            vals = np.array([f["drops"].get(reason, 0) for f in fun][::-1], dtype=float)
            if vals.any():
                ax.barh(y, vals, left=left, color=color, label=reason)
                left += vals
        ax.set_yticks(y, labels)
        ax.set_xlabel("rows (kept + dropped by reason = rows in)")
        ax.set_ylabel("stage")
        ax.set_title("funnel", loc="left")
        _legend_outside(ax, ncol=1 if len(colors) <= 12 else 2)
        out["funnel"] = _svg(fig)
        thr = [(_short(f["stage"]), f["rows_per_second"] or 0.0) for f in fun]
        fig, ax = plt.subplots(figsize=(13, 0.9 + 0.3 * len(thr)))
        ax.barh(np.arange(len(thr))[::-1], [t for _, t in thr], color="#5c946e")
        ax.set_yticks(np.arange(len(thr))[::-1], [s for s, _ in thr])
        ax.set_xlabel("rows in per second (stage wall time)")
        ax.set_ylabel("stage")
        ax.set_title("throughput per stage", loc="left")
        out["throughput"] = _svg(fig)
    for name, h in data["histograms"].items():
        fig, ax = plt.subplots(figsize=(6.4, 3.0))
        if name == "language":
            kept = h["categories"]["kept"]
            by_reason = h.get("categories_by_reason", {})
            cats = sorted(set(kept) | {c for r in by_reason.values() for c in r},
                          key=lambda c: (-kept.get(c, 0), -sum(r.get(c, 0) for r in by_reason.values()), c))[:15]
            x = np.arange(len(cats))
            ax.bar(x - 0.2, [kept.get(c, 0) for c in cats], 0.4, color=KEPT_COLOR, label="kept")
            bottom = np.zeros(len(cats))
            for reason, counts in sorted(by_reason.items()):
                vals = np.array([counts.get(c, 0) for c in cats], dtype=float)
                ax.bar(x + 0.2, vals, 0.4, bottom=bottom, color=colors.get(reason, "#999"), label=reason)
                bottom += vals
            ax.set_xticks(x, cats, rotation=45)
            ax.set_xlabel("detected language (ISO 639-1)")
        else:
            edges = np.array(h["edges"])
            if h["n"]["kept"]:
                ax.stairs(h["counts"]["kept"], edges, fill=True, alpha=0.45, color=KEPT_COLOR,
                          label=f"kept (n={h['n']['kept']:,})")
            for reason, counts in h.get("counts_by_reason", {}).items():
                ax.stairs(counts, edges, fill=False, linewidth=1.8, color=colors.get(reason, "#999"),
                          label=f"{reason} (n={sum(counts):,})")
            ax.set_xlabel(h["title"])
        ax.set_ylabel("rows")
        ax.set_title(f"{h['title']}: kept by {_short(h['stage'])} vs dropped, by reason", loc="left", fontsize=9)
        _legend_outside(ax)
        out[name] = _svg(fig)
    return out


# -- the page -----------------------------------------------------------------------------------
def build_report(ds: Dataset, max_rows: int = MAX_ROWS) -> Report:
    chain = lineage(ds)
    data: dict[str, Any] = {
        "dataset": ds.url,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lineage": [d.url for d in chain],
        "fingerprint": fingerprint(chain),
        "funnel": funnel(chain),
        "histograms": histograms(chain, max_rows),
    }
    data["colors"] = reason_colors(data["funnel"])
    g = grids(chain)
    clusters = dup_clusters(chain)
    data["examples"] = [{"title": x["title"], "dataset": x["dataset"], "reason": x["reason"],
                         "uids": [i["uid"] for i in x["items"]]} for x in g]
    data["duplicate_clusters"] = [{"representative": c["representative"], "size": c["size"],
                                   "stage": c["stage"], "reasons": c["reasons"], "dataset": c["dataset"],
                                   "uids": [i["uid"] for i in c["items"]],
                                   "notes": [i["note"] for i in c["items"]]}
                                  for c in clusters]
    data["safety"] = safety_section(chain, max_rows)
    data["decontamination"] = decontamination_section(chain)
    return Report(data=data, plots=plots(data), grids=g, clusters=clusters)


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;padding:20px 28px;color:#222;
 width:100%;line-height:1.35}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:18px 0 4px}
table{border-collapse:collapse;font-size:13px;width:100%} td,th{padding:4px 8px;border-bottom:1px solid #eee;
 text-align:right;vertical-align:top} td:first-child,th:first-child,td.l,th.l{text-align:left}
th.sort{cursor:pointer;user-select:none;background:#f6f7f9} th.sort:after{content:" \\2195";color:#aaa}
th.asc:after{content:" \\2191";color:#333} th.desc:after{content:" \\2193";color:#333}
.muted{color:#6b6b6b;font-size:12px;overflow-wrap:anywhere}
.chip{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px}
.plot{border:1px solid #e6e6e6;border-radius:6px;overflow:hidden;position:relative;background:#fff;cursor:zoom-in}
.plot img{width:100%;height:auto;display:block;transform-origin:0 0} .zoom{overflow:hidden}
.plot .hint{display:block;text-align:right;padding:0 8px 3px;font-size:11px;color:#999;pointer-events:none}
.wide{grid-column:1/-1}
.lineage{display:flex;flex-wrap:wrap;align-items:stretch;gap:0;margin:8px 0}
.step{border:1px solid #cfd6e0;border-radius:6px;padding:6px 10px;min-width:120px;background:#f8fafc;font-size:12px}
.step b{font-size:13px} .step.last{border-color:#1f4e8c;background:#eef3fb}
.arrow{align-self:center;padding:0 6px;color:#888;font-size:18px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px}
.card{font-size:11.5px;border:1px solid #e3e3e3;padding:5px;border-radius:5px;background:#fff}
.card img,.card .noimg{width:100%;height:130px;object-fit:contain;display:block;background:#f6f6f6}
.card .noimg{line-height:130px;text-align:center;color:#aaa}
.cap{overflow-wrap:anywhere;white-space:normal;margin-top:3px}
.drop{font-weight:600}
"""

# Plain JavaScript, inline: shift/ctrl + wheel zooms a plot around the pointer (a plain wheel scrolls
# the page until a plot is zoomed), drag pans, double-click resets; a click on a table header sorts by
# that column (numbers as numbers).
_JS = """
document.querySelectorAll('.plot').forEach(function(box){
  var img=box.querySelector('img'),s=1,x=0,y=0,drag=null;
  function draw(){img.style.transform='translate('+x+'px,'+y+'px) scale('+s+')';box.style.cursor=s>1?'grab':'zoom-in';}
  box.addEventListener('wheel',function(e){if(!(e.ctrlKey||e.shiftKey||e.metaKey||s>1))return;
    e.preventDefault();var r=box.getBoundingClientRect(),
    px=e.clientX-r.left,py=e.clientY-r.top,k=e.deltaY<0?1.25:0.8,n=Math.min(Math.max(s*k,1),12);
    x=px-(px-x)*n/s;y=py-(py-y)*n/s;s=n;if(s===1){x=0;y=0;}draw();},{passive:false});
  box.addEventListener('mousedown',function(e){drag=[e.clientX-x,e.clientY-y];e.preventDefault();});
  window.addEventListener('mouseup',function(){drag=null;});
  window.addEventListener('mousemove',function(e){if(drag&&s>1){x=e.clientX-drag[0];y=e.clientY-drag[1];draw();}});
  box.addEventListener('dblclick',function(){s=1;x=0;y=0;draw();});
});
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.classList.add('sort');th.addEventListener('click',function(){
    var asc=!th.classList.contains('asc');t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc?'asc':'desc');var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    function v(r){var c=r.cells[i],d=c.getAttribute('data-v');var s=d!==null?d:c.textContent.trim();
      var n=parseFloat(s.replace(/,/g,''));return isNaN(n)?s.toLowerCase():n;}
    rows.sort(function(a,b){var p=v(a),q=v(b);return (p<q?-1:p>q?1:0)*(asc?1:-1);});
    rows.forEach(function(r){body.appendChild(r);});});});
});
"""


def _chip(color: str) -> str:
    return f"<span class='chip' style='background:{color}'></span>"


def _plot_html(report: Report, name: str, alt: str, wide: bool = False) -> str:
    return (f"<div class='plot{' wide' if wide else ''}'><div class='zoom'><img alt='{html.escape(alt)}' "
            f"src='data:image/svg+xml;base64,{report.plots[name]}'></div>"
            "<span class='hint'>shift+wheel: zoom · drag: pan · double-click: reset</span></div>")


def _lineage_html(d: dict[str, Any]) -> str:
    """The lineage as a row of boxes, oldest first: stage, rows in, kept, dropped."""
    e = html.escape
    boxes = []
    for i, f in enumerate(d["funnel"]):
        last = " last" if i == len(d["funnel"]) - 1 else ""
        boxes.append(f"<div class='step{last}' title='{e(f['dataset'])}'><b>{i + 1}. {e(f['stage'])}</b><br>"
                     f"{f['rows_in']:,} in → {f['kept']:,} kept<br><span class='muted'>{f['dropped']:,} dropped · "
                     f"{e(f['dataset'].rstrip('/').rsplit('/', 1)[-1])}</span></div>")
    return "<div class='lineage'>" + "<span class='arrow'>→</span>".join(boxes) + "</div>"


def _funnel_table(d: dict[str, Any]) -> str:
    e = html.escape
    colors = d["colors"]
    rows = ["<table class='sortable'><thead><tr><th>#</th><th class='l'>stage</th><th>shards</th><th>rows in</th>"
            "<th>kept</th><th>dropped</th><th class='l'>drops by reason</th><th>seconds</th><th>rows/s</th>"
            "<th>rows/shard-s</th></tr></thead><tbody>"]
    for i, f in enumerate(d["funnel"]):
        drops = "<br>".join(f"{_chip(colors.get(k, '#999'))}<span class='drop'>{e(k)}</span> {v:,}"
                            for k, v in f["drops"].items()) or "-"
        rps = f"{f['rows_per_second']:,.1f}" if f["rows_per_second"] else "-"
        rpss = f"{f['rows_per_shard_second']:,.1f}" if f["rows_per_shard_second"] else "-"
        removed = f"<br><span class='muted'>{f['removals']} removed on request</span>" if f["removals"] else ""
        rows.append(f"<tr><td>{i + 1}</td><td class='l' title='{e(f['dataset'])}'>{e(f['stage'])}{removed}</td>"
                    f"<td>{f['shards']:,}</td><td>{f['rows_in']:,}</td><td>{f['kept']:,}</td><td>{f['dropped']:,}</td>"
                    f"<td class='l' data-v='{f['dropped']}'>{drops}</td><td>{f['seconds']:.1f}</td><td>{rps}</td>"
                    f"<td>{rpss}</td></tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def _legend_html(colors: dict[str, str]) -> str:
    items = [f"{_chip(KEPT_COLOR)}kept"] + [f"{_chip(c)}{html.escape(r)}" for r, c in colors.items()]
    return "<div class='muted'>" + " &nbsp; ".join(items) + "</div>"


def render_html(report: Report) -> str:
    d = report.data
    e = html.escape
    colors = d["colors"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
             f"content='width=device-width,initial-scale=1'><meta name='curate-fingerprint' content='{d['fingerprint']}'>"
             f"<title>curate report: {e(d['dataset'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>curate report</h1><div class='muted'>{e(d['dataset'])} — generated {e(d['generated'])}</div>",
             "<h2>Lineage</h2>", _lineage_html(d), "<h2>Funnel</h2>", _legend_html(colors)]
    if "funnel" in report.plots:
        parts.append("<div class='plots'>" + _plot_html(report, "funnel", "funnel", wide=True) + "</div>")
    parts.append(_funnel_table(d))
    hist = [k for k in d["histograms"] if k in report.plots]
    if hist:
        parts.append("<h2>Distributions</h2><div class='muted'>kept rows (filled) against the rows each reason "
                     "dropped (one outline per reason, same colours as the funnel)</div><div class='plots'>")
        for k in hist:
            sampled = " (sampled)" if d["histograms"][k].get("sampled") else ""
            parts.append(_plot_html(report, k, f"{k}{sampled}"))
        parts.append("</div>")
    if "throughput" in report.plots:
        parts.append("<h2>Throughput</h2><div class='plots'>" + _plot_html(report, "throughput", "throughput", True)
                     + "</div>")
    parts.append("<h2>Examples</h2>")
    for g in report.grids:
        chip = _chip(colors.get(g["reason"], "#999")) if g["reason"] else _chip(KEPT_COLOR)
        parts.append(f"<h3>{chip}{e(g['title'])}</h3><div class='muted'>{e(g['dataset'])}</div>")
        parts.append(_grid_html(g["items"]))
    parts.append(_clusters_html(report))
    parts.append(safety_html(d.get("safety")) + decontamination_html(d.get("decontamination")))
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def _clusters_html(report: Report) -> str:
    """Duplicate clusters of every stage in the lineage: the kept row and the rows naming it, with
    each member's reason, pHash distance and confirmation score where the stage recorded them."""
    if not report.clusters:
        return ""
    e = html.escape
    parts = ["<h2>Duplicate clusters</h2>"]
    for c in report.clusters:
        why = ", ".join(f"{e(k)} x{v}" for k, v in c["reasons"].items())
        parts.append(f"<div class='muted'>{e(c['stage'])}: cluster of {e(str(c['size']))} ({why}); "
                     f"kept {e(c['representative'])}</div>")
        parts.append(_grid_html(c["items"]))
    return "\n".join(parts)


def _grid_html(items: list[dict[str, Any]]) -> str:
    e = html.escape
    cards = []
    for it in items:
        img = (f"<img alt='' src='data:image/jpeg;base64,{it['thumb']}'>" if it["thumb"]
               else "<div class='noimg'>no image</div>")
        re_cap = f"<div class='cap muted'>↻ {e(it['recaption'])}</div>" if it.get("recaption") else ""
        cards.append(f"<div class='card' title='{e(it['uid'] or '')}'>{img}<div class='cap'>{e(it['caption'])}</div>"
                     f"{re_cap}<div class='muted'>{e(it['note'])}</div></div>")
    return "<div class='grid'>" + "".join(cards) + "</div>"


def write_html(report: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))


# -- safety and decontamination (issue 13) ---------------------------------------------------------
def safety_section(chain: list[Dataset], max_rows: int = MAX_ROWS) -> list[dict[str, Any]]:
    """Per safety stage of the lineage: drops by rule and each score column over kept and dropped rows."""
    out = []
    for ds in chain:
        m = ds.manifest()
        if m["stage"] != "safety":
            continue
        heads = [h["name"] for h in (m.get("config") or {}).get("heads", [])]
        scores = {}
        for name in heads:
            col = schema.head_column(name)
            kept, _ = _read(ds, [col], False, max_rows)
            rej, _ = _read(ds, [col], True, max_rows)
            vals = {k: [x for x in t.column(0).to_pylist() if x is not None] if t is not None else []
                    for k, t in (("kept", kept), ("rejected", rej))}
            scores[name] = {"column": col, **{f"{k}_{stat}": (f(v) if v else None) for k, v in vals.items()
                                              for stat, f in (("n", len), ("min", min), ("max", max),
                                                              ("mean", lambda v: sum(v) / len(v)))}}
        drops = {k: v for k, v in m["totals"]["drops"].items() if k.startswith("safety:")}
        out.append({"dataset": ds.url, "drops": drops, "heads": scores, "kept": m["totals"]["kept"]})
    return out


def decontamination_section(chain: list[Dataset]) -> list[dict[str, Any]]:
    """Per decontaminate stage of the lineage: one row per reference set (images, hits)."""
    from curate.stages.decontaminate import hits_table

    return [{"dataset": ds.url, "references": t} for ds in chain if (t := hits_table(ds)) is not None]


def safety_html(sections: list[dict[str, Any]] | None) -> str:
    if not sections:
        return ""
    e = html.escape
    parts = ["<h2>Content safety</h2>"]
    for sec in sections:
        drops = ", ".join(f"<span class='drop'>{e(str(k))}</span> {e(str(v))}" for k, v in sec["drops"].items()) or "none"
        parts.append(f"<div class='muted'>{e(sec['dataset'])}: dropped {drops}</div>")
        if sec["heads"]:
            parts.append("<table><tr><th>head</th><th>column</th><th>kept</th><th>kept mean</th><th>kept max</th>"
                         "<th>dropped</th><th>dropped mean</th></tr>")
            for name, h in sec["heads"].items():
                def f(x):
                    return "-" if x is None else f"{x:.3f}"
                parts.append(f"<tr><td>{e(name)}</td><td>{e(h['column'])}</td><td>{e(str(h['kept_n']))}</td>"
                             f"<td>{f(h['kept_mean'])}</td><td>{f(h['kept_max'])}</td><td>{e(str(h['rejected_n']))}</td>"
                             f"<td>{f(h['rejected_mean'])}</td></tr>")
            parts.append("</table>")
    return "\n".join(parts)


def decontamination_html(sections: list[dict[str, Any]] | None) -> str:
    if not sections:
        return ""
    e = html.escape
    parts = ["<h2>Decontamination</h2>"]
    for sec in sections:
        parts.append(f"<div class='muted'>{e(sec['dataset'])}</div>")
        parts.append("<table><tr><th>reference set</th><th>images</th><th>undecodable</th><th>hits</th>"
                     "<th>path</th></tr>")
        for r in sec["references"]:
            parts.append(f"<tr><td>{e(str(r['reference']))}</td><td>{e(str(r['images']))}</td>"
                         f"<td>{e(str(r['undecodable']))}</td><td>{e(str(r['hits']))}</td><td>{e(str(r['path']))}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def up_to_date(path: str, report_fingerprint: str) -> bool:
    """Whether the page at ``path`` was made from exactly these manifests by this layout."""
    import os

    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
    return f"name='curate-fingerprint' content='{report_fingerprint}'" in head
