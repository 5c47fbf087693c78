"""Render the demo report in headless Chromium and save a screenshot: the page must open from a file
with no network and show the funnel and the plots.

    .venv/bin/python bench/checks/report_screenshot.py [--dataset DATASET] [--out bench/out/report.png]

DATASET defaults to the last output of pipelines/demo.yaml (``make demo``) when it is complete;
otherwise a small demo lineage is built first: the bundled corpus served on 127.0.0.1, ``download``
(real images, real broken entries), then ``export``. Chromium comes from Debian (``apt-get install
chromium``) and is installed here when missing; the test suite never needs it. The browser runs with
networking off where it can be (no background, sync or component traffic, fresh profile), so a page
that needed the network would show holes.

It also loads a copy of the page with a few probe lines appended (a click on a table header, a
shift+wheel over a plot) and reads the DOM Chromium dumps afterwards: the page's own inline script
must have sorted the table and zoomed the plot.

This is a check, not a benchmark (so it lives under bench/checks/): it prints what it rendered and
exits non-zero unless the screenshot was written, the page had no external references and the
interactive parts worked.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    print("installing Debian's chromium (apt-get) ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True,
                   env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    found = shutil.which("chromium")
    if not found:
        raise SystemExit("chromium did not install")
    return found


def demo_dataset(work: Path) -> str:
    """The demo pipeline's final output if complete, else a small download -> export lineage."""
    import yaml

    from curate.dataset import Dataset

    demo = REPO / "pipelines" / "demo.yaml"
    if demo.exists():
        pipe = yaml.safe_load(demo.read_text())
        last = pipe["stages"][-1]
        out = Path(pipe["output"]) / (last.get("name") or last["stage"])
        out = out if out.is_absolute() else REPO / out
        if Dataset(str(out)).is_complete():
            return str(out)
    from curate.demo import CORPUS, DemoServer, write_url_list
    from curate.runner import run_stage

    down, exp = work / "download", work / "export"
    if not Dataset(str(exp)).is_complete():
        with DemoServer(CORPUS) as server:
            urls = work / "urls.parquet"
            write_url_list(urls, server.base_url)
            run_stage("download", str(urls), str(down), config={
                "shard_size": 100, "fetch": {"allowed_networks": ["127.0.0.1/32"]}})
        run_stage("export", str(down), str(exp), config={"samples_per_shard": 100})
    return str(exp)


# Appended to a copy of the page: click the funnel table's "kept" header (ascending: the reverse of
# the funnel's own order, where each stage keeps at most what the one before it kept), then
# shift+wheel over the first plot; the DOM Chromium dumps afterwards shows whether the page's own
# script sorted the rows and zoomed the plot.
_PROBE = """<script>
var th=[].filter.call(document.querySelectorAll('table.sortable th'),function(h){return h.textContent.trim()==='kept';})[0];
th.click();
var box=document.querySelector('.plot'),r=box.getBoundingClientRect();
box.dispatchEvent(new WheelEvent('wheel',{deltaY:-100,shiftKey:true,clientX:r.left+50,clientY:r.top+50,
  bubbles:true,cancelable:true}));
document.body.setAttribute('data-probe','done');
</script>"""


def interactive_check(browser: str, page: Path) -> bool:
    """The page's inline script works in a real browser: tables sort, plots zoom."""
    from html.parser import HTMLParser

    probe = page.with_name("report-probe.html")
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000",
                               "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    dom = proc.stdout

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.kept, self.col, self.cell, self.in_table, self.zoom = [], -1, "", False, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table" and "sortable" in (a.get("class") or ""):
                self.in_table = True
            if self.in_table and tag == "tr":
                self.col = -1
            if self.in_table and tag == "td":
                self.col += 1
                self.cell = ""
            if tag == "img" and self.zoom is None and "scale(" in (a.get("style") or ""):
                self.zoom = a["style"]

        def handle_data(self, data):
            if self.in_table and self.col == 4:
                self.cell += data

        def handle_endtag(self, tag):
            if self.in_table and tag == "td" and self.col == 4:
                self.kept.append(int(self.cell.replace(",", "")))
            if tag == "table":
                self.in_table = False

    r = Rows()
    r.feed(dom)
    sorted_ok = (len(set(r.kept)) > 1 and r.kept == sorted(r.kept) and 'data-probe="done"' in dom)
    zoom_ok = r.zoom is not None and "scale(1.25)" in r.zoom
    print(f"interactive: funnel table sorted by kept (ascending): {sorted_ok} {r.kept}; "
          f"first plot zoomed by shift+wheel: {zoom_ok} ({r.zoom})")
    return sorted_ok and zoom_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset")
    ap.add_argument("--out", default=str(OUT / "report.png"))
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "report-demo"
    work.mkdir(exist_ok=True)
    dataset = args.dataset or demo_dataset(work)

    from curate.dataset import Dataset
    from curate.report import build_report, write_html

    report = build_report(Dataset(dataset))
    page = OUT / "report.html"
    write_html(report, str(page))
    text = page.read_text()
    external = re.findall(r"""(?:src|href)=['"](?!data:)[^'"]+""", text) + re.findall(r"url\(", text)
    print(f"dataset: {dataset}")
    print(f"report: {page} ({page.stat().st_size / 1e6:.2f} MB), stages: "
          + " -> ".join(f"{f['stage']} ({f['rows_in']} in, {f['kept']} kept)" for f in report.data["funnel"]))
    print(f"plots: {', '.join(report.plots)}; grids: {len(report.grids)}; duplicate clusters: {len(report.clusters)}")
    print(f"external references in the page: {len(external)}")

    browser = chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size=1280,{args.height}",
               f"--screenshot={args.out}", page.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    shot = Path(args.out)
    ok = proc.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000
    ok &= interactive_check(browser, page)
    print(f"browser: {browser}; exit {proc.returncode}; screenshot: {shot} "
          f"({shot.stat().st_size if shot.exists() else 0} bytes)")
    if not ok:
        print(proc.stderr[-2000:])
    print("check passed" if ok and not external else "check FAILED")
    return 0 if ok and not external else 1


if __name__ == "__main__":
    sys.exit(main())
