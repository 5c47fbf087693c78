"""Fault injection: a process stopped at every storage change of a commit, a plan, a removal, a retry
and an overwrite, then the same command again, must give what an uninterrupted run gives (Parquet
row sets, tar sha256s, stats, manifest) and a clean ``verify``. Two attempts at one shard never mix.

The stop is curate.dataset's failpoint: a BaseException raised before the k-th write, rename or
delete of the process (nothing in curate catches it, as nothing survives a SIGKILL), for every k
an uninterrupted run goes through. One SIGKILL of a real subprocess checks that the failpoint and a
real kill agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.config import ConfigError
from curate.dataset import PLAN_DIR, TMP_MARK, Dataset, set_failpoint
from curate.removal import Request, remove
from curate.runner import ShardEnv, execute_shard, run_stage, write_manifest
from curate.stage import PlanContext, RunOptions
from curate.testing.stages import Synth, SynthConfig
from curate.verify import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "download"))

pytestmark = pytest.mark.timeout(900)

SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"
# Timings, ids, and the input manifest's fingerprint (it covers the input's creation time).
VOLATILE = {"seconds", "timings", "created", "shard_seconds", "time", "id", "duration", "plan_seconds",
            "attempt", "requests", "manifest", "call"}


class Stop(BaseException):
    """The injected fault: like a kill, nothing in curate handles it."""


@contextlib.contextmanager
def stop_at(k: int):
    """Raise Stop before the k-th storage change of this process (k=0: count only)."""
    seen: list[str] = []

    def hook(op: str, path: str) -> None:
        seen.append(f"{op} {path}")
        if len(seen) == k:
            raise Stop(seen[-1])

    set_failpoint(hook)
    try:
        yield seen
    finally:
        set_failpoint(None)


def steps_of(fn) -> list[str]:
    with stop_at(0) as seen:
        fn()
    return list(seen)


def interrupted(fn, k: int) -> str:
    with stop_at(k) as seen, pytest.raises(Stop):
        fn()
    return seen[-1]


# -- what is compared ----------------------------------------------------------------------------
def _scrub(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub(v, root) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_scrub(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    return obj


def snapshot(root: str | Path) -> dict[str, Any]:
    """Every file of a dataset as compared: Parquet as its set of rows, tars by sha256, JSON without
    timings and ids; commit records (they name attempts) left out. Temp files would show up."""
    root = str(root)
    out: dict[str, Any] = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir() or p.name.endswith(".commit.json"):
            continue
        if p.suffix == ".parquet":
            rows = [json.dumps(_scrub(r, root), sort_keys=True, default=str) for r in pq.read_table(p).to_pylist()]
            out[rel] = sorted(rows)
        elif p.suffix == ".json" and TMP_MARK not in p.name:
            out[rel] = _scrub(json.loads(p.read_text()), root)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_same(got: str | Path, want: dict[str, Any], where: str) -> None:
    snap = snapshot(got)
    assert snap.keys() == want.keys(), (where, sorted(snap.keys() ^ want.keys()))
    for k in want:
        assert snap[k] == want[k], (where, k)
    assert verify(Dataset(str(got)))[0] == [], where


# -- commit: in-process, shard by shard ---------------------------------------------------------
def _synth_run(out: str, tmp: Path, seed: int = 0, only: list[int] | None = None, finish: bool = True):
    stage = Synth(SynthConfig(shards=2, rows_per_shard=5, seed=seed))
    env = ShardEnv("synth", str(tmp), out, 5, RunOptions())
    for n in only if only is not None else [0, 1]:
        execute_shard(stage, n, env)
    if finish:
        ds = Dataset(out)
        ds.sweep_tmp()
        record = {"stage": SYNTH, "config": {"seed": seed}, "input": {"url": str(tmp)}}
        write_manifest(ds, Synth, record, {"shards": [0, 1], "shard_digits": 5}, 0.0)


def test_commit_stopped_at_every_step_then_rerun(tmp_path):
    out = str(tmp_path / "out")  # the reference is made at the same path: pointers name it
    _synth_run(out, tmp_path)
    want = snapshot(out)
    shutil.rmtree(out)
    steps = steps_of(lambda: _synth_run(out, tmp_path, only=[0], finish=False))
    assert any(s.endswith(".commit.json") for s in steps) and sum(".stats.json" in s for s in steps) == 2
    for k in range(1, len(steps) + 1):
        shutil.rmtree(out, ignore_errors=True)
        where = interrupted(lambda: _synth_run(out, tmp_path, only=[0], finish=False), k)
        assert not Dataset(out).is_committed(1)
        _synth_run(out, tmp_path)  # the rerun: every shard, sweep, manifest
        assert_same(out, want, f"stopped before {where}")


def test_two_attempts_at_one_shard_never_mix(tmp_path):
    """Attempts A (seed 1) and B (seed 2) write different bytes for the same shard, as two downloads
    of a changing web do. Whatever the interleaving, the shard is one attempt's, whole."""
    def solo(out: str, seed: int) -> dict[str, Any]:
        _synth_run(out, tmp_path, seed=seed, only=[0], finish=False)
        Dataset(out).sweep_tmp()
        snap = snapshot(out)
        shutil.rmtree(out)
        return snap

    def race(out: str, pause_a_before: tuple[str, str], sweep_while_paused: bool = False) -> None:
        """A runs until the step (op, part of the path) ``pause_a_before`` and waits there while B
        runs whole."""
        paused, resume = threading.Event(), threading.Event()

        def hook(op: str, path: str) -> None:
            if (threading.current_thread().name == "A" and op == pause_a_before[0] and pause_a_before[1] in path
                    and not paused.is_set()):
                paused.set()
                resume.wait(60)

        set_failpoint(hook)
        try:
            a = threading.Thread(target=_synth_run, args=(out, tmp_path, 1, [0], False), name="A")
            a.start()
            assert paused.wait(60)
            _synth_run(out, tmp_path, 2, [0], False)
            if sweep_while_paused:
                Dataset(out).sweep_tmp()  # the driver's clean-up while a zombie still runs
            resume.set()
            a.join(60)
        finally:
            set_failpoint(None)
        Dataset(out).sweep_tmp()

    # A staged everything but had not claimed: B commits, A finds the claim taken and leaves.
    r1, r2, r3 = (str(tmp_path / r) for r in ("r1", "r2", "r3"))
    want = solo(r1, 2)
    race(r1, ("rename", "shards/00000.commit.json"))
    assert snapshot(r1) == want
    # A claimed and was renaming its files: B finishes A's commit instead of its own.
    want = solo(r2, 1)
    race(r2, ("rename", "shards/00000.parquet"))
    assert snapshot(r2) == want
    # B committed and the driver swept A's temp files away while A was still staging.
    want = solo(r3, 2)
    race(r3, ("write", "00000.stats.json" + TMP_MARK), sweep_while_paused=True)
    assert snapshot(r3) == want
    for r in ("r1", "r2", "r3"):
        assert [p for p in verify(Dataset(str(tmp_path / r)))[0] if "_manifest.json" not in p] == []
        assert not [p for p in (tmp_path / r).rglob("*") if TMP_MARK in p.name]


def test_commit_fsyncs_files_and_folders(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    out = tmp_path / "out"
    _synth_run(str(out), tmp_path, only=[0], finish=False)
    for name in ("00000.tar", "00000.idx", "00000.parquet", "00000.stats.json"):
        assert any(Path(s).name.startswith(name + TMP_MARK) for s in synced), name
    assert str(out / "shards") in synced and str(out / "rejects") in synced
    synced.clear()
    monkeypatch.setenv("CURATE_DURABLE", "0")
    _synth_run(str(tmp_path / "fast"), tmp_path, only=[0], finish=False)
    assert synced == []


# -- plan, manifest and overwrite: the driver of a real run --------------------------------------
def test_run_stopped_at_every_driver_step_then_rerun(ray_session, tmp_path):
    out = str(tmp_path / "out")
    run_stage(SYNTH, str(tmp_path), out, config={"shards": 2, "rows_per_shard": 3})
    want = snapshot(out)
    shutil.rmtree(out)
    steps = steps_of(lambda: run_stage(SYNTH, str(tmp_path), out, config={"shards": 2, "rows_per_shard": 3}))
    assert steps[0].startswith("write") and "run.json" in steps[0]
    for k in range(1, len(steps) + 1):
        shutil.rmtree(out, ignore_errors=True)
        where = interrupted(lambda: run_stage(SYNTH, str(tmp_path), out,
                                              config={"shards": 2, "rows_per_shard": 3}), k)
        summary = run_stage(SYNTH, str(tmp_path), out, config={"shards": 2, "rows_per_shard": 3})
        assert summary["kept"] == 6, where
        assert_same(out, want, f"stopped before {where}")


def test_a_run_killed_while_recording_itself_is_resumed(ray_session, tmp_path):
    """Killed after creating the plan folder, before its run record landed: the plain rerun runs."""
    out = tmp_path / "out"
    (out / "_plan").mkdir(parents=True)
    (out / "_plan" / ("run.json" + TMP_MARK + "1234-dead")).write_text("{")
    assert run_stage(SYNTH, str(tmp_path), str(out), config={"shards": 1, "rows_per_shard": 2})["kept"] == 2
    assert verify(Dataset(str(out)))[0] == []


def test_overwrite_stopped_at_every_step_then_rerun(ray_session, tmp_path):
    out, base = tmp_path / "out", tmp_path / "pristine"
    run_stage(SYNTH, str(tmp_path), str(out), config={"shards": 2, "rows_per_shard": 3, "seed": 2})
    want = snapshot(out)
    shutil.rmtree(out)
    run_stage(SYNTH, str(tmp_path), str(out), config={"shards": 2, "rows_per_shard": 3, "seed": 1})
    shutil.copytree(out, base)
    overwrite = RunOptions(overwrite=True)

    def go():
        return run_stage(SYNTH, str(tmp_path), str(out), config={"shards": 2, "rows_per_shard": 3, "seed": 2},
                         options=overwrite)

    steps = steps_of(go)
    deletes = [i for i, s in enumerate(steps) if s.startswith("delete")]
    assert steps[deletes[0]].endswith("_manifest.json") and "run.json" in steps[deletes[-2]]
    for k in range(1, deletes[-1] + 3):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        where = interrupted(go, k)
        left = Dataset(str(out))
        # never a manifest whose shards are gone
        assert not left.is_complete() or verify(left)[0] == [], where
        go()
        assert_same(out, want, f"stopped before {where}")


def test_real_sigkill_of_an_overwrite_then_rerun(ray_session, tmp_path):
    """The failpoint stands for a kill: a subprocess killed by SIGKILL at a delete of an overwrite
    leaves a folder the same command finishes, as the in-process stop does."""
    base = tmp_path / "out"
    (tmp_path / "in").mkdir()
    run_stage(SYNTH, str(tmp_path / "in"), str(base), config={"shards": 2, "rows_per_shard": 2, "seed": 2})
    want = snapshot(base)
    shutil.rmtree(base)
    run_stage(SYNTH, str(tmp_path / "in"), str(base), config={"shards": 2, "rows_per_shard": 2, "seed": 1})
    cmd = [sys.executable, "-m", "curate.cli", "stage", SYNTH, "--input", str(tmp_path / "in"), "--output",
           str(base), "--set", "shards=2", "--set", "rows_per_shard=2", "--set", "seed=2", "--overwrite"]
    env = {**os.environ, "CURATE_KILL_AT_STEP": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not Dataset(str(base)).is_complete()
    # the same command again (in this process: the killed one died before starting Ray)
    run_stage(SYNTH, str(tmp_path / "in"), str(base), config={"shards": 2, "rows_per_shard": 2, "seed": 2},
              options=RunOptions(overwrite=True))
    assert_same(base, want, "SIGKILL at step 3")


# -- removal ---------------------------------------------------------------------------------------
@pytest.fixture
def lineage(ray_session, tmp_path):
    """synth (owns tars) -> passthrough (points into them) -> export (owns its own), kept pristine."""
    base = tmp_path / "lin"
    run_stage(SYNTH, str(tmp_path), str(base / "synth"), config={"shards": 2, "rows_per_shard": 6})
    run_stage(PASS, str(base / "synth"), str(base / "pass"), config={"drop_every": 3})
    run_stage("export", str(base / "pass"), str(base / "export"), config={"samples_per_shard": 4, "seed": 1})
    shutil.copytree(base, tmp_path / "pristine")
    return base, tmp_path / "pristine"


def _restore(base: Path, pristine: Path) -> None:
    shutil.rmtree(base)
    shutil.copytree(pristine, base)


def test_removal_stopped_at_every_step_then_rerun(lineage):
    base, pristine = lineage
    names = ("synth", "pass", "export")
    victims = [Dataset(str(base / "pass")).read_shard(n).column(schema.UID)[0].as_py() for n in (0, 1)]
    victims.append(Dataset(str(base / "pass")).read_rejects(0).column(schema.UID)[0].as_py())
    request = Request(uids=frozenset(victims), reason="test")
    paths = [str(base / n) for n in names]
    remove(paths, request)
    want = {n: snapshot(base / n) for n in names}
    counts = {n: [r["count"] for r in Dataset(str(base / n)).manifest()["removals"]] for n in names}
    assert counts == {"synth": [3], "pass": [3], "export": [2]}
    _restore(base, pristine)
    steps = steps_of(lambda: remove(paths, request))
    for k in range(1, len(steps) + 1):
        _restore(base, pristine)
        where = interrupted(lambda: remove(paths, request), k)
        remove(paths, request)
        for n in names:
            assert_same(base / n, want[n], f"{n}: stopped before {where}")
            assert [r["count"] for r in Dataset(str(base / n)).manifest()["removals"]] == counts[n], where


def test_removal_never_breaks_a_dataset_it_was_not_given(lineage):
    """Removing a sample from the dataset owning its tar leaves every pointer of a dataset made from
    it (and not named) landing on the same bytes; verify there names only the removed sample's row
    and the dataset it was removed from, and removing it there too makes verify clean."""
    base, _ = lineage
    down = Dataset(str(base / "pass"))
    victim = down.read_shard(0).column(schema.UID)[1].as_py()
    before = {r[schema.UID]: r for _, t in down.iter_shards() for r in t.to_pylist()}
    remove([str(base / "synth")], Request(uids=frozenset({victim})))
    problems, _ = verify(Dataset(str(base / "pass")))
    assert len(problems) == 2, problems
    assert victim in problems[0] and "blanked" in problems[0]
    assert str(base / "synth") in problems[1]
    after = {r[schema.UID]: r for _, t in Dataset(str(base / "pass")).iter_shards() for r in t.to_pylist()}
    assert after == before
    remove([str(base / "pass"), str(base / "export")], Request(uids=frozenset({victim})))
    for n in ("pass", "export", "synth"):
        assert verify(Dataset(str(base / n)))[0] == [], n


# -- download --retry-failed -----------------------------------------------------------------------
def _plan(stage, inp: str, out: Dataset, retry: bool) -> list[int]:
    ctx = PlanContext(input_path=inp, input=None, output=out, plan_dir=out.path(PLAN_DIR),
                      options=RunOptions(retry_failed=retry), map=lambda f, xs: [f(x) for x in xs])
    return stage.plan(ctx)


@pytest.fixture
def failed_download(tmp_path):
    """A committed download whose shards 0 and 1 hold a transient failure each, and its server."""
    from dlserver import Server

    from curate.stages.download import DownloadConfig, DownloadStage

    server = Server()
    paths = ["/img/a.jpg", "/sometimes.jpg", "/img/b.png", "/sometimes.jpg?2", "/status/404"]
    inp = str(tmp_path / "urls.parquet")
    pq.write_table(pa.table({"url": [server.base_url + p for p in paths],
                             "caption": [f"caption {i}" for i in range(len(paths))]}), inp)
    cfg = DownloadConfig(shard_size=2, fetch={"allowed_networks": ["127.0.0.1/32"], "timeout_s": 2.0,
                                              "retries": 0, "backoff_s": 0.05})
    stage = DownloadStage(cfg)
    base = tmp_path / "dl"
    ds = Dataset(str(base))
    env = ShardEnv("download", inp, ds.url, 5, RunOptions())
    shards = _plan(stage, inp, ds, retry=False)
    for n in shards:
        execute_shard(stage, n, env)
    write_manifest(ds, DownloadStage, {"stage": "download", "config": {}, "input": {"url": inp}},
                   {"shards": shards, "shard_digits": 5}, 0.0)
    server.routes.healthy = True
    shutil.copytree(base, tmp_path / "pristine")
    yield stage, inp, base, tmp_path / "pristine", env
    server.close()


def test_retry_failed_stopped_at_every_step_then_rerun(failed_download):
    from curate.stages.download import DownloadStage

    stage, inp, base, pristine, env = failed_download
    ds = Dataset(str(base))

    def retry():
        for n in _plan(stage, inp, ds, retry=True):
            execute_shard(stage, n, env)

    def rerun():  # the runner's end: plan from the stage's state, run what is pending, manifest
        shards = _plan(stage, inp, ds, retry=False)
        for n in shards:
            execute_shard(stage, n, env)
        ds.sweep_tmp()
        write_manifest(ds, DownloadStage, {"stage": "download", "config": {}, "input": {"url": inp}},
                       {"shards": shards, "shard_digits": 5}, 0.0)

    retry()
    rerun()
    want = snapshot(base)
    assert Dataset(str(base)).shard_ids() == [0, 1, 2, 3] and ds.stats(0)["retried_out"] == 1
    _restore(base, pristine)
    steps = steps_of(retry)
    assert any("rejects/00000.parquet" in s for s in steps)  # the take-over is among them
    for k in range(1, len(steps) + 1):
        _restore(base, pristine)
        where = interrupted(retry, k)
        retry()  # the same command again
        rerun()
        assert_same(base, want, f"stopped before {where}")
        uids = [u for _, t in ds.iter_shards([schema.UID]) for u in t.column(schema.UID).to_pylist()]
        uids += [u for _, t in ds.iter_rejects([schema.UID]) for u in t.column(schema.UID).to_pylist()]
        assert len(uids) == len(set(uids)) == 5, where


def test_killed_retry_is_not_complete_and_the_plain_rerun_finishes_it(tmp_path, ray_session, monkeypatch):
    from dlserver import Server

    server = Server()
    try:
        paths = ["/img/a.jpg", "/sometimes.jpg", "/img/b.png", "/status/404"]
        inp = str(tmp_path / "urls.parquet")
        pq.write_table(pa.table({"url": [server.base_url + p for p in paths],
                                 "caption": [f"c{i}" for i in range(4)]}), inp)
        out = str(tmp_path / "out")
        cfg = {"shard_size": 2, "fetch": {"allowed_networks": ["127.0.0.1/32"], "retries": 0, "timeout_s": 2.0}}
        run_stage("download", inp, out, config=cfg)
        server.routes.healthy = True

        # killed as the retry records its plan (the new shard is planned, nothing ran yet)
        real = Dataset.write_json

        def killed_at_plan(self, obj, *parts):
            if parts[-1] == "plan.json":
                raise Stop("/".join(parts))
            return real(self, obj, *parts)

        monkeypatch.setattr(Dataset, "write_json", killed_at_plan)
        with pytest.raises(Stop):
            run_stage("download", inp, out, config=cfg, options=RunOptions(retry_failed=True))
        monkeypatch.setattr(Dataset, "write_json", real)
        summary = run_stage("download", inp, out, config=cfg)
        assert not summary["skipped"] and summary["kept"] == 3
        assert verify(Dataset(out))[0] == []
        # the input is its files: rewritten in place with another row, it is not "complete"
        pq.write_table(pa.table({"url": [server.base_url + p for p in [*paths, "/img/c.webp"]],
                                 "caption": [f"c{i}" for i in range(5)]}), inp)
        with pytest.raises(ConfigError, match="different input"):
            run_stage("download", inp, out, config=cfg)
    finally:
        server.close()


def test_retry_failed_is_refused_where_it_means_nothing(tmp_path, ray_session):
    run_stage(SYNTH, str(tmp_path), str(tmp_path / "s"), config={"shards": 1, "rows_per_shard": 2})
    for stage, inp in (("import", str(tmp_path / "s" / "shards")), (PASS, str(tmp_path / "s"))):
        with pytest.raises(ConfigError, match="--retry-failed applies to download only"):
            run_stage(stage, inp, str(tmp_path / stage.replace(":", "_")), options=RunOptions(retry_failed=True))
    # import knows its input by its files: a tar added to the folder is another input, not "complete"
    tars = tmp_path / "tars"
    tars.mkdir()
    shutil.copy(tmp_path / "s" / "shards" / "00000.tar", tars / "a.tar")
    run_stage("import", str(tars), str(tmp_path / "imp"))
    assert run_stage("import", str(tars), str(tmp_path / "imp"))["skipped"]
    shutil.copy(tars / "a.tar", tars / "b.tar")
    with pytest.raises(ConfigError, match="different input"):
        run_stage("import", str(tars), str(tmp_path / "imp"))


def test_a_second_attempt_never_overwrites_a_commit_on_object_storage(s3_bucket):
    """The claim on S3 is a conditional put: the later attempt finds it and keeps the first's files."""
    ds = Dataset(f"s3://{s3_bucket}/ds")
    rows = {a: pa.table({schema.UID: [f"{a}{i:031d}" for i in range(3)]}) for a in ("a", "b")}
    rejects = pa.table({schema.UID: pa.array([], pa.string()), schema.DROP_REASON: pa.array([], pa.string())})
    for a in ("a", "b"):
        got = ds.commit_shard(0, rows[a], rejects, {"rows_in": 3, "rows_out": 3, "rejected": 0, "drops": {},
                                                    "by": a}, attempt=a)
        assert got["by"] == "a"
    ds.refresh()
    assert ds.read_shard(0).equals(rows["a"]) and ds.stats(0)["by"] == "a"
    assert not ds.exists("shards", "00000.commit.json")  # dropped once the files were in place
    assert ds.sweep_tmp() == 0 and not [p for p in ds.fs.find(ds.root) if TMP_MARK in p]
