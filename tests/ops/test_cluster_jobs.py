"""Stages as Ray jobs on a real local cluster (head + 1 worker): one job per stage, the same output
as embedded mode, failures named with their job id, resubmission resumes, stop_job loses nothing,
and the runner's row counters reach the cluster's Prometheus endpoints."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.runner import run_stage
from curate.verify import verify

SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"


def _pipeline(path: Path, output: Path, input_: str, stages: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"name": path.stem, "output": str(output), "input": input_,
                                    "stages": stages}))
    return str(path)


def _tables(root: Path) -> dict[str, object]:
    """Every data file under a dataset, comparable across roots: Parquet as tables without the
    image_tar column (it names each root's own tar), everything else as bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if not p.is_file() or rel.startswith("_") or p.name.endswith((".stats.json", ".commit.json")):
            continue
        if p.suffix == ".parquet":
            t = pq.read_table(p)
            out[rel] = t.drop_columns([c for c in (schema.IMAGE_TAR,) if c in t.column_names])
        else:
            out[rel] = p.read_bytes()
    return out


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name] == tb[name] if isinstance(ta[name], bytes) else ta[name].equals(tb[name]), name


def _uids(ds: Dataset) -> list[str]:
    uids = []
    for _, t in ds.iter_shards([schema.UID]):
        uids += t.column(0).to_pylist()
    for _, t in ds.iter_rejects([schema.UID]):
        uids += t.column(0).to_pylist()
    return uids


def _scrape(ports: list[int], metric: str, stage: str) -> float:
    """Sum of a curate counter for one stage over every node's metrics endpoint."""
    total = 0.0
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(f"ray_{metric}_total{{") and f'stage="{stage}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_metric(ports, metric, stage, want, timeout=40.0) -> float:
    deadline = time.time() + timeout
    got = _scrape(ports, metric, stage)
    while got != want and time.time() < deadline:
        time.sleep(1)
        got = _scrape(ports, metric, stage)
    return got


def test_pipeline_one_job_per_stage_equals_embedded(cluster, ray_session, tmp_path):
    stages = [
        {"stage": SYNTH, "name": "synth", "config": {"shards": 3, "rows_per_shard": 12}},
        # a real stage: captions "synthetic picture S I" longer than 21 characters (I >= 10) go
        {"stage": "filter", "config": {"caption_max_chars": 21}},
        {"stage": "export", "config": {"samples_per_shard": 7, "seed": 1}},
    ]
    cl_out, emb_out = tmp_path / "cluster", tmp_path / "embedded"
    cl_pipe = _pipeline(tmp_path / "cl.yaml", cl_out, str(tmp_path), stages)
    emb_pipe = _pipeline(tmp_path / "emb.yaml", emb_out, str(tmp_path), stages)
    in_before = _scrape(cluster.metrics_ports, "curate_rows_in", "filter")
    dropped_before = _scrape(cluster.metrics_ports, "curate_rows_dropped", "filter")

    proc = cluster.curate("run", cl_pipe, "--address", cluster.address)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(["run", emb_pipe]) == 0  # embedded mode, in this process

    jobs = {j["metadata"]["curate_output"]: j for j in cluster.jobs() if j["metadata"].get("curate_output")}
    for step in ("synth", "filter", "export"):
        out = str(cl_out / step)
        job = jobs[out]  # each stage ran as its own job, and it succeeded
        assert job["status"] == "SUCCEEDED" and job["id"].endswith("-1")
        assert f"--output {out}" in job["entrypoint"]
        assert job["id"] in proc.stderr  # the client followed that job's log
        _assert_same(cl_out / step, emb_out / step)
        assert verify(Dataset(out))[0] == []
    assert jobs[str(cl_out / "export")]["entrypoint"].startswith("curate export ")

    # Rerunning the same pipeline submits nothing: every output is complete with the same config.
    n_jobs = len(cluster.jobs())
    again = cluster.curate("run", cl_pipe, "--address", cluster.address)
    assert again.returncode == 0 and "skipped (complete)" in again.stdout
    assert len(cluster.jobs()) == n_jobs

    # The runner's counters reached the cluster's Prometheus endpoints (scraped over 127.0.0.1).
    totals = Dataset(str(cl_out / "filter")).manifest()["totals"]
    assert totals["dropped"] == 6 and totals["kept"] == 30
    assert _wait_metric(cluster.metrics_ports, "curate_rows_in", "filter", in_before + totals["rows_in"]) \
        == in_before + totals["rows_in"]
    assert _wait_metric(cluster.metrics_ports, "curate_rows_dropped", "filter",
                        dropped_before + totals["dropped"]) == dropped_before + totals["dropped"]


def _synth(tmp_path: Path, shards: int, rows: int) -> str:
    src = str(tmp_path / "src")
    run_stage(SYNTH, str(tmp_path), src, config={"shards": shards, "rows_per_shard": rows})
    return src


def test_failed_job_named_with_log_then_fixed_resubmission_completes(cluster, ray_session, tmp_path):
    src = _synth(tmp_path, 4, 5)
    out = tmp_path / "out"
    bad = [{"stage": PASS, "name": "first", "config": {"drop_every": 2}},
           {"stage": PASS, "name": "second", "config": {"fail_on_shard": 2}}]
    proc = cluster.curate("run", _pipeline(tmp_path / "bad.yaml", out, src, bad), "--address", cluster.address)
    assert proc.returncode == 1
    failed = re.search(r"job (curate-passthrough-[0-9a-f]{16}-1) FAILED", proc.stderr)
    assert failed, proc.stderr[-3000:]
    job_id = failed.group(1)
    # the error of the shard, from the job's log, is in the message
    assert "injected failure on shard 2" in proc.stderr.split(job_id + " FAILED", 1)[1]
    status = {j["id"]: j for j in cluster.jobs()}
    assert status[job_id]["status"] == "FAILED"
    assert status[job_id]["metadata"]["curate_output"] == str(out / "second")
    assert Dataset(str(out / "first")).is_complete() and not Dataset(str(out / "second")).is_complete()

    # The fix changes the config, so the half-written output must be replaced (--overwrite); the
    # complete first step is not redone.
    fixed = [bad[0], {"stage": PASS, "name": "second", "config": {"fail_on_shard": None}}]
    fixed_pipe = _pipeline(tmp_path / "fixed.yaml", out, src, fixed)
    refused = cluster.curate("run", fixed_pipe, "--address", cluster.address)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    n_first = sum(1 for j in cluster.jobs() if j["metadata"].get("curate_output") == str(out / "first"))
    proc = cluster.curate("run", fixed_pipe, "--overwrite", "--address", cluster.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(1 for j in cluster.jobs() if j["metadata"].get("curate_output") == str(out / "first")) == n_first
    second = Dataset(str(out / "second"))
    first_kept = sum(t.num_rows for _, t in Dataset(str(out / "first")).iter_shards([schema.UID]))
    assert second.manifest()["totals"]["rows_in"] == first_kept == second.manifest()["totals"]["kept"]
    assert sorted(_uids(second)) == sorted(u for _, t in Dataset(str(out / "first")).iter_shards([schema.UID])
                                           for u in t.column(0).to_pylist())


def test_stopped_job_resubmitted_loses_and_duplicates_nothing(cluster, ray_session, tmp_path):
    src = _synth(tmp_path, 6, 5)
    step = {"stage": PASS, "name": "slow",
            "config": {"drop_every": 3, "sleep_per_shard": 2.5, "resources": {"concurrency": 1}}}
    out = tmp_path / "out"
    pipe = _pipeline(tmp_path / "slow.yaml", out, src, [step])
    client = cluster.popen_curate("run", pipe, "--address", cluster.address)
    stats = out / "slow" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(stats.glob("*.stats.json"))) < 2:
        time.sleep(0.2)
    # find the stage's job and stop it, in one client call (the job is still running: 4+ shards left)
    job_id, stopped = cluster.jobs_api(f"""
        job = next(j for j in client.list_jobs() if (j.metadata or {{}}).get("curate_output") == {str(out / "slow")!r})
        result = [job.submission_id, client.stop_job(job.submission_id)]
    """)
    assert stopped is True
    log, _ = client.communicate(timeout=120)
    assert client.returncode == 1 and f"job {job_id} STOPPED" in log
    partial = Dataset(str(out / "slow"))
    committed = {p.name: p.read_bytes() for p in stats.glob("*.stats.json")}
    assert not partial.is_complete() and 2 <= len(committed) < 6

    # resubmit the one stage with `curate submit`: same stage, config, input and output, so the same
    # job prefix, next attempt number
    proc = cluster.curate("submit", PASS, "--input", src, "--output", str(out / "slow"),
                          "--set", "drop_every=3", "--set", "sleep_per_shard=2.5",
                          "--set", "resources.concurrency=1", "--address", cluster.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    attempts = sorted((j["id"], j["status"]) for j in cluster.jobs()
                      if j["metadata"].get("curate_output") == str(out / "slow"))
    prefix = job_id.rsplit("-", 1)[0]
    assert attempts == [(f"{prefix}-1", "STOPPED"), (f"{prefix}-2", "SUCCEEDED")]
    # shards committed before the stop were skipped by the resubmission, not redone
    assert {n: (stats / n).read_bytes() for n in committed} == committed
    ds = Dataset(str(out / "slow"))
    uids = _uids(ds)
    assert len(uids) == len(set(uids)) == 30
    assert sorted(uids) == sorted(_uids(Dataset(src)))
    assert not [p for p in (out / "slow").rglob("*") if ".tmp-" in p.name]
    # and the result is the embedded run's, byte for byte (both point into the same source tars)
    emb = tmp_path / "emb"
    run_stage(PASS, src, str(emb), config=step["config"])
    for p in sorted((emb / "shards").glob("*.parquet")) + sorted((emb / "rejects").glob("*.parquet")):
        assert p.read_bytes() == (out / "slow" / p.relative_to(emb)).read_bytes(), p.name
