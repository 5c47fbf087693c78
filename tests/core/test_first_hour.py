"""A new user's first mistakes: each gets one line naming the fix, exit 2, no traceback, and (for
input errors) before Ray is even imported; a failed start never blocks the corrected command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.runner import run_stage

REPO = Path(__file__).resolve().parents[2]
SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"

# Runs the CLI in a fresh interpreter and reports, after it returns, whether `ray` was ever imported:
# an input error must be found before any Ray start, whatever the machine's speed.
_PROBE = """
import json, sys
from curate.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "ray": "ray" in sys.modules}))
"""


def cli(*args: str) -> tuple[int, str, bool]:
    """(exit code, stderr, ray imported) of `curate ARGS` in a fresh process."""
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=REPO,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=300)
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    return probe["rc"], r.stderr, probe["ray"]


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def url_list(path: Path, columns: dict[str, list]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), str(path))
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writerow(list(columns))
            w.writerows(zip(*columns.values(), strict=True))
    return path


# -- URL lists ---------------------------------------------------------------------------------
def test_url_column_that_cannot_be_found_names_the_setting(tmp_path):
    p = url_list(tmp_path / "urls.csv", {"address": ["www.a.example/1.jpg"], "words": ["a cat"]})
    rc, err, ray = cli("download", "--input", str(p), "--output", str(tmp_path / "out"))
    assert one_line(err) == ("curate: error: download: urls.csv has no column 'url' (columns: address, words); "
                             "name the URL column with --set url_col=COLUMN")
    assert (rc, ray) == (2, False)
    assert not (tmp_path / "out").exists()


def test_url_column_named_by_the_user_but_missing(tmp_path):
    p = url_list(tmp_path / "urls.parquet", {"URL": ["http://a.example/1.jpg"], "TEXT": ["a cat"]})
    rc, err, ray = cli("download", "--input", str(p), "--output", str(tmp_path / "out"), "--set", "url_col=link")
    assert one_line(err) == ("curate: error: download: urls.parquet has no column 'link' (columns: URL, TEXT); "
                             "name the URL column with --set url_col=COLUMN")
    assert (rc, ray) == (2, False)


def test_dataset_stage_given_a_url_list(tmp_path):
    p = url_list(tmp_path / "urls.parquet", {"url": ["http://a.example/1.jpg"]})
    rc, err, ray = cli("filter", "--input", str(p), "--output", str(tmp_path / "out"))
    assert one_line(err) == (f"curate: error: filter: input {p} is not a curate dataset: this is a URL list: "
                             f"use `curate download --input {p} --output DIR` first")
    assert (rc, ray) == (2, False)


def test_verify_and_inspect_given_a_url_list(tmp_path):
    p = url_list(tmp_path / "urls.parquet", {"url": ["http://a.example/1.jpg"]})
    want = (f"curate: error: {p} is not a curate dataset: this is a URL list: "
            f"use `curate download --input {p} --output DIR` first")
    for command in ("verify", "inspect"):
        rc, err, ray = cli(command, str(p))
        assert one_line(err) == want
        assert (rc, ray) == (2, False)


def test_verify_given_a_shard_file_names_its_dataset(ray_session, tmp_path, capsys):
    run_stage(SYNTH, str(tmp_path), str(tmp_path / "ds"), config={"shards": 1, "rows_per_shard": 2})
    shard = tmp_path / "ds" / "shards" / "00000.parquet"
    assert main(["verify", str(shard)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"curate: error: {shard} is one file of the curate dataset {tmp_path / 'ds'}: "
        f"give the dataset folder, {tmp_path / 'ds'}")


def test_import_given_a_url_list(tmp_path):
    p = url_list(tmp_path / "urls.parquet", {"url": ["http://a.example/1.jpg"]})
    rc, err, ray = cli("import", "--input", str(p), "--output", str(tmp_path / "out"))
    assert one_line(err) == (f"curate: error: import: {p} is a URL list, not WebDataset tars: "
                             f"use `curate download --input {p} --output DIR` to fetch its images")
    assert (rc, ray) == (2, False)


def test_verify_and_inspect_on_a_folder_curate_never_wrote(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("my own folder")
    want = f"curate: error: {tmp_path / 'mine'} is not a curate dataset (no _manifest.json): curate did not write it"
    for command in ("verify", "inspect"):
        rc, err, ray = cli(command, str(tmp_path / "mine"))
        assert one_line(err) == want
        assert (rc, ray) == (2, False)
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "00000.tar").write_bytes(b"")
    rc, err, _ = cli("verify", str(tmp_path / "tars"))
    assert one_line(err) == (f"curate: error: {tmp_path / 'tars'} holds tar files but is not a curate dataset: "
                             f"use `curate import --input {tmp_path / 'tars'} --output DIR` to adopt them first")
    assert rc == 2


# -- config keys -------------------------------------------------------------------------------
def test_unknown_key_gets_the_nearest_and_the_list(tmp_path, capsys):
    rc = main(["download", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "image.image_sze=256"])
    err = one_line(capsys.readouterr().err)
    assert rc == 2
    assert err.startswith("curate: error: download config: image.image_sze: unknown key; did you mean "
                          "image.image_size? known keys in image: image_size, resize_mode, ")


def test_config_lists_keys_with_type_default_and_meaning(capsys):
    assert main(["config", "filter"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(ln for ln in out if ln.startswith("min_side "))
    assert row.split()[:5] == ["min_side", "int", "|", "null", "(>="]
    assert "shorter side" in row
    lang = next(ln for ln in out if ln.startswith("languages "))
    assert "ISO 639-1" in lang and "null" in lang
    assert any(ln.startswith("resources.num_cpus ") for ln in out)


def test_unknown_stage_for_config(capsys):
    assert main(["config", "frobnicate"]) == 2
    assert "unknown stage 'frobnicate'" in one_line(capsys.readouterr().err)


def test_stage_options_only_where_they_mean_something(capsys):
    assert main(["download", "--help"]) == 0
    dl = capsys.readouterr().out
    assert "--retry-failed" in dl and "url_col (str, default \"url\"): input column holding the image URL" in dl
    assert main(["filter", "--help"]) == 0
    flt = capsys.readouterr().out
    assert "--retry-failed" not in flt and "--explain" not in flt  # filter records no per-sample detail
    assert "min_side (int | null (>= 1), default null): shorter side >=" in flt
    rc = main(["filter", "--input", "x", "--output", "y", "--retry-failed"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == (
        "curate: error: No such option '--retry-failed'. (only `curate download` retries failed rows)")


# -- a failed start does not block the corrected command ----------------------------------------
def test_corrected_command_runs_after_a_run_that_committed_nothing(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 1, "rows_per_shard": 4})
    out = tmp_path / "out"
    rc = main(["stage", PASS, "--input", str(src), "--output", str(out), "--set", "fail_on_shard=0"])
    assert rc == 1
    assert "injected failure on shard 0" in capsys.readouterr().err
    assert (out / "_plan" / "run.json").exists()  # the failed run left its plan ...
    assert "injected failure" in json.loads((out / "_plan" / "failed.json").read_text())["error"]
    rc = main(["stage", PASS, "--input", str(src), "--output", str(out), "--set", "drop_every=3"])
    assert rc == 0, capsys.readouterr().err  # ... which does not block a run with another config
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["config"]["drop_every"] == 3 and manifest["config"]["fail_on_shard"] is None
    assert manifest["totals"]["rows_in"] == 4


def test_killed_run_with_another_config_is_still_refused(ray_session, tmp_path, capsys):
    """A run that left no failure mark (killed: its workers may still be writing) is not wiped."""
    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 1, "rows_per_shard": 4})
    out = tmp_path / "out"
    assert main(["stage", PASS, "--input", str(src), "--output", str(out), "--set", "fail_on_shard=0"]) == 1
    (out / "_plan" / "failed.json").unlink()  # as if the driver had been killed instead
    capsys.readouterr()
    rc = main(["stage", PASS, "--input", str(src), "--output", str(out)])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == (
        f"curate: error: output {out} holds an unfinished {PASS} run with a different config "
        "(config.fail_on_shard: was 0, now None); use --overwrite to replace it or choose another --output")
    assert (out / "_plan" / "run.json").exists()


def test_different_config_names_the_keys_and_values(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 1, "rows_per_shard": 4})
    out = tmp_path / "out"
    assert main(["stage", PASS, "--input", str(src), "--output", str(out)]) == 0
    capsys.readouterr()
    rc = main(["stage", PASS, "--input", str(src), "--output", str(out), "--set", "drop_every=2"])
    assert rc == 2
    assert one_line(capsys.readouterr().err) == (
        f"curate: error: output {out} holds a complete {PASS} run with a different config "
        "(config.drop_every: was 0, now 2); use --overwrite to replace it or choose another --output")


def test_download_plan_failure_then_fixed_list(ray_session, tmp_path, capsys):
    """The second file of a folder lacks the column: found while planning (after the first file's
    check), one line; once the file is fixed the same command completes."""
    from curate.demo import CORPUS, DemoServer, urls

    with DemoServer(CORPUS) as srv:
        u, c = urls(srv.base_url)
        folder = tmp_path / "lists"
        folder.mkdir()
        url_list(folder / "a.csv", {"url": u[:3], "caption": c[:3]})
        url_list(folder / "b.csv", {"link": u[3:5], "caption": c[3:5]})
        args = ["download", "--input", str(folder), "--output", str(tmp_path / "out"),
                "--set", "fetch.allowed_networks=[127.0.0.1/32]"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [ln for ln in err.splitlines() if ln.startswith("curate: error:")]
        assert len(errors) == 1 and "b.csv: no url column 'url'" in errors[0], err
        assert errors[0].endswith("name the URL column with --set url_col=COLUMN (every file needs it)")
        url_list(folder / "b.csv", {"url": u[3:5], "caption": c[3:5]})
        assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["totals"]["rows_in"] == 5


# -- recognised URL columns and headerless lists, end to end ------------------------------------
def test_laion_style_columns_are_used_with_a_note(ray_session, tmp_path, capsys):
    from curate.demo import CORPUS, DemoServer, read_entries, urls

    entries = read_entries()
    ok = [i for i, e in enumerate(entries) if e.get("kind", "ok") == "ok"][:4]
    with DemoServer(CORPUS) as srv:
        u, c = urls(srv.base_url)
        p = url_list(tmp_path / "laion.parquet", {"URL": [u[i] for i in ok], "TEXT": [c[i] for i in ok]})
        rc = main(["download", "--input", str(p), "--output", str(tmp_path / "out"),
                   "--set", "fetch.allowed_networks=[127.0.0.1/32]"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert ("laion.parquet has no column 'url'; using 'URL' as the URL column "
            "(say --set url_col=URL to make it explicit)") in err
    assert "using 'TEXT' as the caption column" in err
    from curate.dataset import Dataset

    ds = Dataset(str(tmp_path / "out"))
    rows = [r for _, t in ds.iter_shards(["url", "caption"]) for r in t.to_pylist()]
    rej = [r for _, t in ds.iter_rejects(["url", "caption"]) for r in t.to_pylist()]
    assert sorted(r["url"] for r in rows + rej) == sorted(u[i] for i in ok)
    assert sorted(r["caption"] for r in rows + rej) == sorted(c[i] for i in ok)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_headerless_list_is_detected(tmp_path, suffix, caplog):
    from curate.inputs import check_url_list, read_url_list

    p = tmp_path / f"urls{suffix}"
    d = "\t" if suffix == ".tsv" else ","
    p.write_text(f"http://a.example/1.jpg{d}a cat\nhttp://a.example/2.jpg{d}a dog\n")
    updates, notes = check_url_list(str(p), "url", "caption", None, False, False)
    assert updates == {}
    assert notes == [f"urls{suffix} has no header row (its first line holds a URL): "
                     "reading it as column 1 = url, column 2 = caption"]
    t = pa.concat_tables(list(read_url_list(str(p))))
    assert t.column("url").to_pylist() == ["http://a.example/1.jpg", "http://a.example/2.jpg"]
    assert t.column("caption").to_pylist() == ["a cat", "a dog"]


def test_url_column_found_by_its_values(tmp_path):
    from curate.inputs import check_url_list

    p = url_list(tmp_path / "urls.csv", {"id": ["1", "2"], "where": ["https://a.example/1.jpg", "http://b/2.png"]})
    updates, notes = check_url_list(str(p), "url", "caption", None, False, False)
    assert updates == {"url_col": "where"}
    assert notes[0] == ("urls.csv has no column 'url'; using 'where' as the URL column "
                        "(say --set url_col=where to make it explicit)")


# -- inspect follows the lineage ---------------------------------------------------------------
def test_inspect_follows_a_sample_to_where_it_left(ray_session, tmp_path, capsys):
    from curate.dataset import Dataset
    from curate.demo import CORPUS, DemoServer, read_entries, urls

    entries = read_entries()
    ok = [i for i, e in enumerate(entries) if e["kind"] == "ok"][:3]
    missing = next(i for i, e in enumerate(entries) if e["kind"] == "missing")
    with DemoServer(CORPUS) as srv:
        u, c = urls(srv.base_url)
        p = url_list(tmp_path / "urls.parquet", {"url": [u[i] for i in [*ok, missing]],
                                                 "caption": [c[i] for i in [*ok, missing]]})
        assert main(["download", "--input", str(p), "--output", str(tmp_path / "raw"),
                     "--set", "fetch.allowed_networks=[127.0.0.1/32]"]) == 0
    assert main(["stage", PASS, "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "a"),
                 "--set", "drop_every=1"]) == 0  # every row that reaches it is dropped here
    capsys.readouterr()
    # a sample that failed to download, asked of the last dataset by its URL
    assert main(["inspect", str(tmp_path / "a"), "--url", u[missing]]) == 0
    cap = capsys.readouterr()
    found = json.loads(cap.out)
    assert found["found"] is False  # not in the dataset asked about ...
    assert found["verdict"].startswith("dropped at download: failed_to_download: ")  # ... but traced
    assert "404" in found["verdict"]
    assert [s["stage"] for s in found["lineage"]] == ["download", PASS]
    assert found["lineage"][0]["reason"] == "download:failed_to_download"
    assert cap.err.startswith(f"{found['uid']}: dropped at download")
    # a sample that was kept by download and dropped by the next stage, by uid
    kept_uid = Dataset(str(tmp_path / "raw")).read_shard(0).column("uid")[0].as_py()
    assert main(["inspect", str(tmp_path / "a"), "--uid", kept_uid]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["verdict"] == f"dropped at {PASS}: divisible"
    assert [s.get("kept") for s in found["lineage"]] == [True, False]
    # an unknown URL is one line, exit 2
    assert main(["inspect", str(tmp_path / "a"), "--url", "http://nowhere.example/x.jpg"]) == 2
    assert one_line(capsys.readouterr().err).startswith("curate: error: no row with url http://nowhere.example/x.jpg")


# -- progress ------------------------------------------------------------------------------------
def test_progress_fields_in_rows_with_rate_and_eta():
    from curate.progress import progress_fields
    from curate.runner import StageProgress

    p = StageProgress("filter", "shards", shards_done=3, shards_total=10, rows_done=300, kept=250, dropped=50,
                      rows_total=1000, rows_this_run=200, shards_this_run=2, started=100.0)
    f = progress_fields(p, now=110.0)  # 200 rows in 10 s: 20 rows/s, 700 rows left: 35 s
    assert f == {"rows": "300/1,000 rows (3/10 shards)", "counts": "ok 250  dropped 50",
                 "rate": "20 rows/s", "eta": "ETA 35s"}
    unknown = StageProgress("download", "shards", shards_done=2, shards_total=4, rows_done=20, kept=20,
                            rows_this_run=20, shards_this_run=2, started=100.0)
    assert progress_fields(unknown, now=110.0)["eta"] == "ETA 10s"  # by shards: 5 s each, 2 left
    assert progress_fields(StageProgress("dedup", "plan", started=100.0), now=175.0)["rows"] == "planning (1m15s)"


def test_plain_progress_lines_off_a_terminal(ray_session, tmp_path, capsys):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(json.dumps({"name": "t", "output": str(tmp_path / "out"), "input": str(tmp_path),
                                "stages": [{"stage": SYNTH, "name": "s", "config": {"shards": 2, "rows_per_shard": 5}},
                                           {"stage": PASS, "name": "p", "config": {"drop_every": 1}}]}))
    assert main(["run", str(pipe)]) == 0
    err = capsys.readouterr().err
    assert "\x1b[" not in err  # no ANSI codes when stderr is not a terminal
    lines = err.splitlines()
    assert lines[0].endswith("pipeline t: 2 stages")
    assert any(ln.endswith(f"[1/2] {SYNTH}: done: 10 rows in " + ln.split(" rows in ")[-1]) for ln in lines)
    done = [ln for ln in lines if f"[2/2] {PASS}: done: " in ln]
    assert len(done) == 1 and "ok 0  dropped 10" in done[0] and "rows/s" in done[0]


# -- quiet unless -v -------------------------------------------------------------------------------
def test_v_shows_curates_own_events(ray_session, tmp_path, capsys):
    args = ["stage", SYNTH, "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--set", "shards=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0  # complete: skipped, silently
    assert "skipping" not in capsys.readouterr().err
    from curate.cli import setup_logging

    try:
        assert main(["-v", *args]) == 0
        assert f"{SYNTH}: output {tmp_path / 'out'} is complete with the same config and input; skipping" in \
            capsys.readouterr().err
        assert main(["-v", *args[:4], "--output", str(tmp_path / "out2"), "--set", "shards=1"]) == 0
        err = capsys.readouterr().err
        assert f"{SYNTH}: 1 shards planned, 0 committed by an earlier run" in err
        assert f"{SYNTH}: shard 00000 committed: 10 rows in, 10 kept, 0 dropped" in err
    finally:
        setup_logging(0)  # back to the quiet default for the tests that follow


def test_native_stderr_goes_to_a_file_unless_verbose(tmp_path):
    """A library writing to file descriptor 2 directly (faiss's C++ warnings) cannot reach the
    terminal or a log file during a quiet run; curate's own lines still do."""
    script = """
import os, click
from curate.cli import setup_logging
from curate.progress import ProgressView
setup_logging(int(os.environ["V"]))
with ProgressView("t", 1, live=False, interval=3600):
    os.write(2, b"native noise\\n")
    click.echo("curate line", err=True)
"""
    for v, noise in (("0", False), ("1", True)):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                           env={**__import__("os").environ, "PYTHONPATH": str(REPO), "V": v}, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "curate line" in r.stderr
        assert ("native noise" in r.stderr) is noise, r.stderr
