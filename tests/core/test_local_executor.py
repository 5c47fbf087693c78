"""A small stage that loads no model runs without starting Ray (a local process pool): same files
as a run on Ray, and a SIGKILL mid-run then a rerun gives the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from curate import schema
from curate.dataset import Dataset
from curate.verify import verify

SYNTH = "curate.testing.stages:Synth"

RUN = """
import json, sys
from curate.runner import run_stage
summary = run_stage(sys.argv[1], sys.argv[2], sys.argv[3], config=json.loads(sys.argv[4]))
ray = sys.modules.get("ray")
print(json.dumps({"ray_started": bool(ray is not None and ray.is_initialized()), "kept": summary["kept"]}))
"""


def _run(tmp_path: Path, out: Path, config: dict, executor: str | None = None, **popen):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CURATE_EXECUTOR")}
    if executor:
        env["CURATE_EXECUTOR"] = executor
    cmd = [sys.executable, "-c", RUN, SYNTH, str(tmp_path), str(out), json.dumps(config)]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "shards").iterdir() if p.suffix in (".parquet", ".tar", ".idx", ".json")
                   and not p.name.endswith(".stats.json"))
    assert names == sorted(p.name for p in (b / "shards").iterdir() if p.suffix in (".parquet", ".tar", ".idx", ".json")
                           and not p.name.endswith(".stats.json"))
    for name in names:
        if name.endswith(".parquet"):  # pointers name each run's own tar; the rest is equal
            ta, tb = pq.read_table(a / "shards" / name), pq.read_table(b / "shards" / name)
            assert ta.drop_columns([schema.IMAGE_TAR]).equals(tb.drop_columns([schema.IMAGE_TAR]))
        else:
            assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name


def test_small_stage_runs_without_ray_and_matches_a_ray_run(tmp_path):
    config = {"shards": 2, "rows_per_shard": 5}
    local = _run(tmp_path, tmp_path / "local", config)
    assert local == {"ray_started": False, "kept": 10}
    on_ray = _run(tmp_path, tmp_path / "ray", config, executor="ray")
    assert on_ray == {"ray_started": True, "kept": 10}
    _same(tmp_path / "local", tmp_path / "ray")
    assert verify(Dataset(str(tmp_path / "local"))) == ([], 10)


def test_sigkill_of_a_local_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    config = {"shards": 2, "rows_per_shard": 4, "sleep_per_shard": 0.0}
    _run(tmp_path, tmp_path / "clean", config)
    slow = {**config, "sleep_per_shard": 1.5, "resources": {"concurrency": 1}}  # one at a time
    killed = tmp_path / "killed"
    proc = _run(tmp_path, killed, slow, executor="local", start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "shards").glob("*.stats.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool's workers
    proc.wait()
    assert not Dataset(str(killed)).is_complete()
    assert _run(tmp_path, killed, slow, executor="local")["ray_started"] is False
    _same(tmp_path / "clean", killed)
    assert not list(killed.rglob("*.tmp"))


def test_warm_starts_every_worker_before_any_shard_is_submitted():
    """``_LocalPool.warm`` starts one worker per slot at once, each importing the stage's module, so
    their start-up overlaps the driver's plan; the pool then runs work on those same processes."""
    from curate.runner import _LocalPool

    pool = _LocalPool(2)
    try:
        pool.warm("curate.testing.stages")
        started = dict(pool.pool()._processes)
        assert len(started) == 2  # both started by warm(), none waiting for a first map()
        pids = set(pool.map(_pid, range(6)))
        assert pids <= set(started)  # no new process was needed for the work
    finally:
        pool.close()


def _pid(_: int) -> int:
    return os.getpid()


def _omp(_: int) -> str | None:
    return os.environ.get("OMP_NUM_THREADS")


def test_workers_get_one_blas_thread_per_cpu_unless_the_user_chose(monkeypatch):
    """Local workers start with OMP_NUM_THREADS = the task's CPUs, as Ray's workers do (numpy's
    OpenBLAS would otherwise spin a thread per core in each of them); a value the user set is kept,
    and the driver's own environment is left as it was."""
    from curate.runner import _LocalPool

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    pool = _LocalPool(2, threads=1)
    try:
        assert set(pool.map(_omp, range(4))) == {"1"}
        assert "OMP_NUM_THREADS" not in os.environ
    finally:
        pool.close()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    pool = _LocalPool(2, threads=1)
    try:
        assert set(pool.map(_omp, range(4))) == {"3"}
    finally:
        pool.close()


KILL_DRIVER = """
import os, signal, sys, time
from curate.runner import _LocalPool
pool = _LocalPool(2)
pool.warm("curate.runner")
print(" ".join(str(p) for p in pool.pool()._processes), flush=True)
pool.pool().submit(time.sleep, 300)  # a worker busy with a long shard
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_end_when_the_driver_is_killed():
    """A SIGKILLed driver leaves no worker behind (one would go on running, and committing, a shard
    that the rerun redoes), even one in the middle of its work."""
    r = subprocess.run([sys.executable, "-c", KILL_DRIVER], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
    assert not alive, f"workers {alive} outlived their driver"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
