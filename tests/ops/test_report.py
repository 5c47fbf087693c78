"""`curate report`: the numbers on the page are the manifests' numbers; the page is self-contained."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.report import build_report, render_html
from curate.runner import write_manifest
from curate.stage import Stage

SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"


class _Dedup(Stage):
    name = "dedup"


def _dedup_like(src: Dataset, out: Path) -> Dataset:
    """A dataset shaped like dedup's output, written through the dataset API: in every shard, rows 1-2
    are duplicates of row 0 (rejected with dup_of), the rest are kept."""
    ds = Dataset(str(out))
    for n in src.shard_ids():
        t = src.read_shard(n)
        uids = t.column(schema.UID).to_pylist()
        dup = [None, uids[0], uids[0]] + [None] * (t.num_rows - 3)
        t = t.append_column(schema.DUP_OF, pa.array(dup, pa.string()))
        mask = pc.is_valid(t.column(schema.DUP_OF))
        rej = t.filter(mask).append_column(schema.DROP_REASON, pa.array(["dedup:phash"] * 2, pa.string()))
        ds.commit_shard(n, t.filter(pc.invert(mask)), rej, {
            "shard": ds.shard_name(n), "rows_in": t.num_rows, "rows_out": t.num_rows - 2, "rejected": 2,
            "drops": {"dedup:phash": 2}, "seconds": 0.5})
    record = {"stage": "dedup", "config": {}, "input": {"url": src.url}}
    write_manifest(ds, _Dedup, record, {"shards": src.shard_ids(), "shard_digits": 5}, 2.0)
    return Dataset(str(out))


@pytest.fixture(scope="module")
def lineage(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    pipe = {"name": "rep", "output": str(root / "out"), "input": str(root), "stages": [
        {"stage": SYNTH, "name": "synth", "config": {"shards": 3, "rows_per_shard": 9, "size": 40}},
        {"stage": PASS, "name": "pass", "config": {"drop_every": 3}},
    ]}
    (root / "pipe.yaml").write_text(yaml.safe_dump(pipe))
    assert main(["run", str(root / "pipe.yaml")]) == 0
    dedup = _dedup_like(Dataset(str(root / "out" / "pass")), root / "out" / "dedup")
    return root, [Dataset(str(root / "out" / n)) for n in ("synth", "pass")] + [dedup]


def test_report_numbers_equal_the_manifests(lineage):
    _, chain = lineage
    rep = build_report(chain[-1])
    d = rep.data
    assert d["lineage"] == [ds.url for ds in chain]
    assert len(d["funnel"]) == 3
    for f, ds in zip(d["funnel"], chain, strict=True):
        m = ds.manifest()
        assert f["stage"] == m["stage"] and f["dataset"] == ds.url
        assert (f["rows_in"], f["kept"], f["dropped"], f["drops"]) == (
            m["totals"]["rows_in"], m["totals"]["kept"], m["totals"]["dropped"], m["totals"]["drops"])
        assert f["shards"] == len(m["shards"])
        assert f["rows_per_second"] == pytest.approx(m["totals"]["rows_in"] / m["seconds"])
    assert d["funnel"][1]["drops"]["passthrough:divisible"] > 0
    # histograms: kept rows of the latest dataset with the column vs every stage's rejects carrying it
    width = d["histograms"]["width"]
    final = chain[-1].manifest()["totals"]
    assert width["dataset"] == chain[-1].url
    assert width["n"] == {"kept": final["kept"], "rejected": sum(ds.manifest()["totals"]["dropped"] for ds in chain)}
    assert width["rejected_by"] == [PASS, "dedup"]
    assert sum(width["counts"]["kept"]) == final["kept"]
    caps = [c for _, t in chain[-1].iter_shards([schema.CAPTION]) for c in t.column(0).to_pylist()]
    assert d["histograms"]["caption_length"]["mean"]["kept"] == pytest.approx(sum(map(len, caps)) / len(caps))
    assert d["histograms"]["aspect_ratio"]["mean"]["kept"] == pytest.approx(1.0)
    assert "clip_score" not in d["histograms"]  # no dataset in this lineage has the column
    # example grids: kept, and rejected per reason, with thumbnails read through the pointers
    titles = [g["title"] for g in rep.grids]
    assert any(t.startswith("kept by dedup") for t in titles)
    assert "rejected: passthrough:divisible" in titles and "rejected: dedup:phash" in titles
    for g in rep.grids:
        assert g["items"] and all(i["thumb"] for i in g["items"]), g["title"]
    # duplicate clusters: a representative (kept) and the rejects naming it
    assert len(d["duplicate_clusters"]) == 3
    for c in rep.clusters:
        assert c["size"] == 3 and c["items"][0]["uid"] == c["representative"]
        assert [i["note"] for i in c["items"]] == ["kept", "dedup:phash", "dedup:phash"]
        assert c["stage"] == "dedup" and c["reasons"] == {"dedup:phash": 2}
        assert all(i["thumb"] for i in c["items"])


class _Srcs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.links.append(a["href"])
        if tag == "script":
            self.scripts.append(a.get("src"))


def test_cli_writes_self_contained_html_and_json_twin(lineage, tmp_path):
    _, chain = lineage
    out, js = tmp_path / "r.html", tmp_path / "r.json"
    assert main(["report", chain[-1].url, "--out", str(out), "--json", str(js)]) == 0
    page = out.read_text()
    p = _Srcs()
    p.feed(page)
    # plots (funnel, histograms, throughput) and every thumbnail are inline; nothing is fetched
    assert len(p.srcs) >= 5 + 9 and all(s.startswith("data:image/") for s in p.srcs)
    assert not p.links and "@import" not in page and "url(" not in page
    assert p.scripts == [None]  # one script, inline (zoom and sort), nothing loaded from anywhere
    assert "alt='funnel'" in page and "alt='throughput'" in page and "alt='width'" in page
    data = json.loads(js.read_text())
    assert data["funnel"] == json.loads(json.dumps(build_report(chain[-1]).data["funnel"]))
    assert render_html(build_report(chain[-1])).count("<h2>") == page.count("<h2>")
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_one_colour_per_reason_and_overlays_per_reason(lineage):
    _, chain = lineage
    rep = build_report(chain[-1])
    d = rep.data
    reasons = [r for f in d["funnel"] for r in f["drops"]]
    colors = d["colors"]
    assert set(colors) == set(reasons)
    assert len(set(colors.values())) == len(colors)  # no two reasons share a colour ...
    from curate.report import KEPT_COLOR

    assert KEPT_COLOR not in colors.values()  # ... and none shares the kept colour
    width = d["histograms"]["width"]
    # one overlay per reason, each counting exactly the rejects of that reason
    drops = {r: n for f in d["funnel"] for r, n in f["drops"].items()}
    assert {r: sum(c) for r, c in width["counts_by_reason"].items()} == drops
    page = render_html(rep)
    for reason, color in colors.items():  # the legend above the funnel names each reason in its colour
        assert f"background:{color}'></span>{reason}" in page


def test_report_fingerprint_follows_the_manifests(lineage, tmp_path):
    from curate.report import fingerprint, up_to_date, write_html
    from curate.report import lineage as walk

    _, chain = lineage
    rep = build_report(chain[-1])
    out = tmp_path / "r.html"
    write_html(rep, str(out))
    assert up_to_date(str(out), fingerprint(walk(chain[-1])))
    assert not up_to_date(str(out), fingerprint(walk(chain[-2])))  # another lineage: not this page
