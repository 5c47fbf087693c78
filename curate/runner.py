"""Runs a stage over every shard of its input on Ray; the only module that imports ray.

One Ray task per shard for CPU stages, one actor call per shard for model stages (an actor pool keeps
the model loaded). The number of shards in flight is bounded, so memory is bounded by the pool size,
not by the dataset. Each shard is committed atomically by the worker that ran it (see dataset.py);
the driver only plans, tracks progress and writes the manifest once every shard is committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import curate
from curate import schema, stages
from curate.config import ConfigError, fingerprint, resolved, stage_and_config
from curate.dataset import MANIFEST, PLAN_DIR, PLAN_FILE, RUN_FILE, TMP_MARK, Dataset, digits_for, new_attempt
from curate.stage import PlanContext, Resources, RunOptions, ShardContext, Stage, StageConfig
from curate.wds import TarWriter

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A shard raised: a bug or a broken input shard (per-row problems are rejects, not errors)."""


@dataclasses.dataclass(frozen=True)
class ShardEnv:
    """Everything a worker needs besides the stage: plain data, cheap to ship."""

    stage: str
    input_path: str | None
    output: str
    shard_digits: int
    options: RunOptions
    board: Any = None  # a _ProgressBoard actor when the driver shows progress within shards
    run: str = ""  # this run's key on the board


# -- rows finished inside running shards (progress only) ----------------------------------------
class _ProgressBoard:
    """A small actor the workers tell how many rows of their shard are finished, so the driver can
    show progress within shards (a URL list of a few thousand rows is often one shard). One per
    driver process and Ray session, reused by every stage: an actor ended while it is still
    starting makes Ray's GCS print an error line on the user's terminal."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], int] = {}

    def set(self, run: str, shard: int, rows: int) -> None:
        self.rows[(run, shard)] = rows

    def snapshot(self, run: str) -> dict[int, int]:
        mine = {shard: rows for (r, shard), rows in self.rows.items() if r == run}
        self.rows = {k: v for k, v in self.rows.items() if k[0] == run}  # earlier runs' are done
        return mine


_BOARD: tuple[Any, Any] | None = None


def _progress_board() -> Any:
    import ray

    global _BOARD
    session = ray.get_runtime_context().get_job_id()
    if _BOARD is None or _BOARD[0] != session:
        _BOARD = (session, ray.remote(num_cpus=0)(_ProgressBoard).remote())
    return _BOARD[1]


def _row_reporter(board: Any, run: str, shard: int, every_s: float = 0.5) -> Callable[[int], None]:
    last = [0.0]

    def report(rows: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            board.set.remote(run, shard, rows)  # fire and forget: progress must never slow the shard

    return report


# -- one shard ---------------------------------------------------------------------------------
def execute_shard(stage: Stage, n: int, env: ShardEnv) -> dict[str, Any]:
    """Load, process, split and commit shard ``n``; return its stats. Safe to retry: a committed
    shard is returned as it is, an uncommitted one is redone from scratch."""
    out = Dataset(env.output)
    out.shard_digits = env.shard_digits
    out.recover_shard(n)  # a commit a killed attempt left half done is finished, not redone
    if out.is_committed(n):
        return out.stats(n)
    # No clean-up here: a zombie attempt of a killed run may still be writing this shard. Its temp
    # files are its own, only the attempt that claims the shard renames its files into place, and
    # leftovers of dead attempts are swept once the whole run is committed.
    attempt = new_attempt()
    inp = Dataset(env.input_path) if (stage.reads_dataset and env.input_path) else None
    ctx = ShardContext(
        shard=n,
        input_path=env.input_path,
        input=inp,
        output=out,
        plan_dir=out.path(PLAN_DIR),
        options=env.options,
        on_rows=_row_reporter(env.board, env.run, n) if env.board is not None else None,
    )
    start = time.perf_counter()
    t = time.perf_counter()
    table = stage.load(n, ctx)
    ctx.add_time("load", time.perf_counter() - t)
    rows_in = table.num_rows
    tar_file = None
    if stage.writes_images:
        tar_file = out.open_tmp_tar(n, attempt)
        ctx.tar = TarWriter(tar_file)
        ctx.tar_url = out.tar_url(n)
    try:
        t = time.perf_counter()
        result = stage.process(table, ctx)
        ctx.add_time("process", time.perf_counter() - t)
    finally:
        if tar_file is not None:
            ctx.tar.close()
            tar_file.close()
    if result.num_rows != rows_in:
        raise StageFailed(
            f"stage {env.stage} returned {result.num_rows} rows for {rows_in} input rows in shard "
            f"{out.shard_name(n)}: every row must be kept or rejected with a reason"
        )
    kept, rejects = split_rejects(result)
    drops = Counter(rejects.column(schema.DROP_REASON).to_pylist()) if rejects.num_rows else Counter()
    stats = {
        "shard": out.shard_name(n),
        "rows_in": rows_in,
        "rows_out": kept.num_rows,
        "rejected": rejects.num_rows,
        "drops": dict(sorted(drops.items())),
        "tar_bytes": ctx.tar.bytes_written if ctx.tar is not None else 0,
        "timings": ctx.timings,
        "seconds": time.perf_counter() - start,
        **ctx.stats,
    }
    committed = out.commit_shard(
        n,
        kept,
        rejects,
        stats,
        attempt=attempt,
        tar_written=stage.writes_images,
        idx_text=ctx.tar.index_text() if ctx.tar is not None else None,
    )
    if committed is stats:  # not when another attempt had committed the shard first
        _record_metrics(env.stage, stats)
    return committed


def split_rejects(result: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Kept rows (drop_reason null, column removed) and rejected rows, both in canonical types."""
    if schema.DROP_REASON not in result.column_names:
        return schema.conform(result), schema.conform(result.slice(0, 0).append_column(
            schema.DROP_REASON, pa.array([], pa.string())))
    reasons = result.column(schema.DROP_REASON)
    dropped = pc.invert(pc.is_null(reasons))
    kept = result.filter(pc.invert(dropped)).drop_columns([schema.DROP_REASON])
    return schema.conform(kept), schema.conform(result.filter(dropped))


# -- Ray plumbing ------------------------------------------------------------------------------
def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster a Ray job runs in, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    # Quiet unless -v: Ray's own start-up warnings (the token notice) and worker output.
    verbose = _worker_logs()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING if verbose else logging.ERROR,
                              "log_to_driver": verbose}
    if address and not address.startswith("http"):
        ray.init(address=address, **kwargs)
    else:
        # "local" rather than auto-detect: never attach by surprise to a cluster another user started.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)


def _worker_logs() -> bool:
    """Whether workers' stdout/stderr (model-loading bars, library warnings) reach the driver: the
    CLI sets CURATE_VERBOSE=0 unless -v; library callers keep Ray's default."""
    return os.environ.get("CURATE_VERBOSE", "1") != "0"


def _slots(res) -> int:
    import ray

    if res.concurrency:
        return res.concurrency
    total = ray.cluster_resources()
    if res.num_gpus > 0:
        return max(1, int(total.get("GPU", 0) // res.num_gpus))
    return max(1, int(total.get("CPU", 1) // res.num_cpus))


def _plan_slots(stage: Stage) -> int:
    """Shard tasks the cluster runs at once for a stage whose apply loads no model (1 otherwise)."""
    if stage.model_device("apply") is not None:
        return 1
    return _slots(stage.config.resources.model_copy(update={"num_gpus": 0.0}))


def _ray_options(res) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 1024**3)
    return opts


# -- GPU and resource requests per phase ---------------------------------------------------------
# Every worker that loads a model asks Ray for the GPU it will use, and only those do: a phase that
# loads no model, or loads it on the CPU, reserves none (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for
# zero-GPU workers, so such a worker is also shown no GPU: a model on "auto" then stays on the CPU
# instead of landing, unreserved, on cuda:0). A request that no node can hold fails before any work.
_HIDE_GPUS = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}


def phase_resources(stage: Stage, phase: str, cluster_gpus: float) -> Resources:
    """What one worker of ``phase`` asks for, from the stage's resources and its model's device.

    ``device: auto`` gets one GPU per worker when the cluster has GPUs (an explicit
    ``resources.num_gpus`` wins); ``cpu`` gets none; ``cuda`` gets one (or the explicit number) even
    when no GPU node is up yet, so an autoscaler can bring one. Contradictions are config errors."""
    res = stage.config.resources
    device = stage.model_device(phase)
    explicit = "num_gpus" in res.model_fields_set
    where = f"{stage.name}: resources.num_gpus={res.num_gpus:g}"
    if device is None or device == "cpu":
        if device == "cpu" and explicit and res.num_gpus > 0:
            raise ConfigError(f"{where} with device: cpu would hold GPUs the model never uses; "
                              "set device: cuda or drop num_gpus")
        return res.model_copy(update={"num_gpus": 0.0})
    if device == "cuda":
        if explicit and res.num_gpus == 0:
            raise ConfigError(f"{where} with device: cuda: the model would use a GPU Ray never gave it; "
                              "set num_gpus > 0 or device: cpu")
        return res if explicit else res.model_copy(update={"num_gpus": 1.0})
    if explicit:
        return res
    if not cluster_gpus:
        # On a cluster this may be GPU nodes an autoscaler has not started yet: say so loudly.
        level = logging.WARNING if os.environ.get("RAY_ADDRESS") else logging.INFO
        log.log(level, "%s: no GPU in the Ray cluster now, so its model runs on CPU (device: auto); set "
                "device: cuda to wait for GPU nodes instead", stage.name)
    return res.model_copy(update={"num_gpus": 1.0 if cluster_gpus else 0.0})


def worker_options(stage_name: str, phase: str, res: Resources, model: bool) -> dict[str, Any]:
    """Ray options for one worker, after checking that some node can hold it (see require_node)."""
    opts = _ray_options(res)
    if model and res.num_gpus == 0:
        opts["runtime_env"] = _HIDE_GPUS
    require_node(f"stage {stage_name} ({phase})", opts, res.wait_s)
    return opts


def apply_resources(name: str, stage: Stage) -> tuple[bool, Resources, dict[str, Any]]:
    """(whether the apply loads a model, its per-worker resources, its Ray options)."""
    import ray

    model = stage.model_device("apply") is not None
    res = phase_resources(stage, "apply", ray.cluster_resources().get("GPU", 0))
    return model, res, worker_options(name, "apply", res, model)


def _needs(opts: dict[str, Any]) -> dict[str, float]:
    need = {"CPU": float(opts.get("num_cpus") or 0), "GPU": float(opts.get("num_gpus") or 0)}
    if opts.get("memory"):
        need["memory"] = float(opts["memory"])
    return {k: v for k, v in need.items() if v > 0}


def missing_resource(need: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """None when one alive node can hold ``need``; else the resource that stops the closest node."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if any(all(have.get(k, 0) >= v for k, v in need.items()) for have in alive):
        return None
    for key, value in need.items():  # the first resource no node has enough of, with the best offer
        best = max((have.get(key, 0) for have in alive), default=0)
        if best < value:
            shown = f"{best / 1024**3:.1f} GiB" if key == "memory" else f"{best:g}"
            want = f"{value / 1024**3:.1f} GiB" if key == "memory" else f"{value:g}"
            return f"{key}: {want} per worker, but the largest node offers {shown}"
    return "its " + ", ".join(f"{k}: {v:g}" for k, v in need.items()) + " together on one node"


def require_node(what: str, opts: dict[str, Any], wait_s: float, poll_s: float = 5.0) -> None:
    """Fail with one line naming the resource when no node can hold one worker (Ray would wait
    forever). An embedded Ray never grows; on a cluster, wait up to ``wait_s`` for an autoscaler."""
    import ray

    need = _needs(opts)
    missing = missing_resource(need, ray.nodes())
    if missing is None:
        return
    local = not os.environ.get("RAY_ADDRESS")
    deadline = time.monotonic() + (0.0 if local else wait_s)
    if not local and wait_s:
        log.warning("%s needs %s; waiting up to %.0f s (resources.wait_s) for such a node", what, missing, wait_s)
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        missing = missing_resource(need, ray.nodes())
        if missing is None:
            return
    waited = "" if local else f" after waiting {wait_s:g} s (resources.wait_s)"
    raise ConfigError(f"{what}: no node of the Ray cluster can run a worker{waited}: {missing}; "
                      "lower the stage's resources, set device: cpu, or add such nodes")


class _MapActor:
    """A plan worker that keeps its process (and what the mapped function caches in it) across items."""

    def call(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)


def model_map(stage: Stage, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """Plan calls that load the stage's model: a pool of actors with the plan phase's resources.

    Not one task per item: Ray runs a GPU task with max_calls=1, so each item would rebuild the
    model, the CUDA context and the decoder in a fresh process."""
    import ray
    from ray.util import ActorPool

    items = list(items)
    if not items:
        return []
    res = phase_resources(stage, "plan", ray.cluster_resources().get("GPU", 0))
    opts = worker_options(stage.name, "plan", res, model=True)
    slots = min(_slots(res), len(items))
    actor_cls = ray.remote(max_restarts=2, max_task_retries=2, **opts)(_MapActor)
    actors = [actor_cls.remote() for _ in range(slots)]
    try:
        return list(ActorPool(actors).map(lambda a, item: a.call.remote(fn, item), items))
    finally:
        for a in actors:
            ray.kill(a)


def plan_map(stage: Stage) -> Callable[..., list[Any]]:
    """``PlanContext.map`` for ``stage``: plain tasks, or the model actor pool with ``model=True``."""

    def run(fn: Callable[[Any], Any], items: Iterable[Any], num_cpus: float = 1, num_gpus: float = 0,
            model: bool = False) -> list[Any]:
        if model:
            return model_map(stage, fn, list(items))
        return ray_map(fn, items, num_cpus=num_cpus, num_gpus=num_gpus)

    return run


# -- no Ray for a small stage ------------------------------------------------------------------
# Starting an embedded Ray costs seconds (7-20 here); a stage that loads no model and whose shards
# all run at once on this machine gains nothing from it. Such a stage runs its plan calls and shards
# in a pool of worker processes instead (spawned, so no thread state is copied), with the same
# execute_shard: commits, resume and stats are identical. CURATE_EXECUTOR=ray|local forces a choice.
class _LocalPool:
    """A process pool started on first use, one slot per CPU (per what a shard task asks)."""

    def __init__(self, slots: int, threads: int = 1):
        self.slots = max(1, slots)
        self.threads = max(1, threads)  # CPUs of one task: its workers' OpenMP / BLAS threads
        self._pool: Any = None

    def pool(self, module: str = "curate.runner") -> Any:
        """The pool, its workers all started at once, each importing ``module`` (the stage's, when
        the runner warms it up: their ~0.5 s of imports then overlap the driver's plan).

        Workers start with OMP_NUM_THREADS set to the task's CPUs, as Ray sets it for its workers,
        unless the user set it: numpy's OpenBLAS otherwise starts a thread per core in every worker,
        and the small matrix products of the pHash then spin on cores the other workers need (a
        download ran at 2.5x the CPU per image that way)."""
        if self._pool is None:
            import concurrent.futures
            import importlib
            import multiprocessing

            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.slots, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
                initargs=(os.getpid(),))
            with _environment({"OMP_NUM_THREADS": str(self.threads)}):
                for _ in range(self.slots):  # no worker is idle yet: each submit starts one
                    self._pool.submit(importlib.import_module, module)
        return self._pool

    def warm(self, module: str) -> None:
        """Start every worker now, importing ``module``."""
        self.pool(module)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], num_cpus: float = 1, num_gpus: float = 0,
            model: bool = False) -> list[Any]:
        items = list(items)
        return list(self.pool().map(fn, items)) if items else []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _local_pool_for(stage: Stage) -> _LocalPool | None:
    """A local pool when the stage may run without Ray: no cluster address, no Ray already up in
    this process, no model in either phase (and not forced either way by CURATE_EXECUTOR)."""
    import sys

    choice = os.environ.get("CURATE_EXECUTOR", "auto")
    if choice == "ray":
        return None
    ray = sys.modules.get("ray")
    if choice != "local" and (os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized())
                              or stage.model_device("apply") is not None or stage.model_device("plan") is not None):
        return None
    res = stage.config.resources
    slots = int((os.cpu_count() or 1) // max(res.num_cpus, 1e-9)) or 1
    return _LocalPool(min(slots, res.concurrency) if res.concurrency else slots, threads=int(res.num_cpus))


def _die_with_parent(parent: int) -> None:
    """In a local worker: end when the driver ends, however it ends. A killed driver's workers would
    otherwise go on running their shard (and commit it) beside the rerun that redoes it. Linux: the
    kernel sends SIGKILL when the parent exits (PR_SET_PDEATHSIG: strictly, when the thread that
    started the worker ends; the pool starts its workers from run_stage's own thread, which outlives
    the pool); elsewhere, and for a parent that died before this ran, a thread checks the parent
    every second."""
    import signal
    import threading

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="curate-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _environment(defaults: dict[str, str]):
    """``defaults`` in os.environ where the user has not set them, for the processes started inside
    the block (they copy the environment when they start); restored after."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run_shards_local(pool: _LocalPool, name: str, config: StageConfig, pending: list[int], env: ShardEnv,
                      on_done: Callable[[int, dict[str, Any]], None]) -> None:
    """The pending shards in the local pool (as many at once as it has slots)."""
    import concurrent.futures

    futures = {pool.pool().submit(_shard_task, name, config, n, env): n for n in pending}
    errors = []
    for fut in concurrent.futures.as_completed(futures):
        n = futures[fut]
        try:
            on_done(n, fut.result())
        except Exception as e:  # noqa: BLE001 - reported with the shard, after the others end
            errors.append(f"shard {n}: {type(e).__name__}: {e}")
    if errors:
        raise StageFailed(f"stage {name} failed on {len(errors)} shard(s); first: {errors[0]}")


def _make_stage(name: str, config: StageConfig, setup: bool) -> Stage:
    stage = stages.get(name)(config)
    if setup:
        stage.setup()
    return stage


def _shard_task(name: str, config: StageConfig, n: int, env: ShardEnv) -> dict[str, Any]:
    return execute_shard(_make_stage(name, config, setup=True), n, env)


class _ShardActor:
    """Holds one set-up stage (a loaded model) and runs shards on it, one call per shard."""

    def __init__(self, name: str, config: StageConfig):
        self.stage = _make_stage(name, config, setup=True)

    def run(self, n: int, env: ShardEnv) -> dict[str, Any]:
        return execute_shard(self.stage, n, env)


def _run_shards(
    name: str, stage_cls: type[Stage], config: StageConfig, pending: list[int], env: ShardEnv,
    on_done: Callable[[int, dict[str, Any]], None], on_rows: Callable[[int], None] | None = None,
) -> None:
    """Run the pending shards, at most a few in flight; ``on_rows`` (when given) hears the rows
    finished inside running shards about once a second."""
    import ray

    board = None
    if on_rows is not None:
        board = _progress_board()
        env = dataclasses.replace(env, board=board, run=new_attempt())
    running: dict[int, int] = {}

    # Resources as the apply phase needs them: a GPU per actor only where its model uses one.
    model, res, opts = apply_resources(name, stage_cls(config))
    slots = min(_slots(res), max(1, len(pending)))
    todo = list(pending)
    inflight: dict[Any, int] = {}
    errors: list[str] = []

    if model:
        actor_cls = ray.remote(max_restarts=2, max_task_retries=2, **opts)(_ShardActor)
        actors = [actor_cls.remote(name, config) for _ in range(slots)]
        idle = list(actors)
        owner: dict[Any, Any] = {}

        def submit() -> None:
            while todo and idle and not errors:
                actor = idle.pop()
                n = todo.pop(0)
                ref = actor.run.remote(n, env)
                inflight[ref], owner[ref] = n, actor
    else:
        task = ray.remote(max_retries=3, **opts)(_shard_task)
        limit = 2 * slots  # bounded back-pressure: a few queued beyond what can run

        def submit() -> None:
            while todo and len(inflight) < limit and not errors:
                n = todo.pop(0)
                inflight[task.remote(name, config, n, env)] = n

    submit()
    while inflight:
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0 if board is not None else None)
        if not done:
            now = ray.get(board.snapshot.remote(env.run))
            running = {k: v for k, v in now.items() if k in inflight.values()}
            on_rows(sum(running.values()))
            continue
        ref = done[0]
        n = inflight.pop(ref)
        if model:
            idle.append(owner.pop(ref))
        if board is not None and running.pop(n, None) is not None:
            on_rows(sum(running.values()))  # before the commit is counted: never both at once
        try:
            on_done(n, ray.get(ref))
        except Exception as e:  # noqa: BLE001 - reported with the shard, after in-flight work ends
            cause = getattr(e, "cause", None) or e
            errors.append(f"shard {n}: {type(cause).__name__}: {cause}")
        submit()
    if model:
        for a in actors:
            ray.kill(a)
    if errors:
        raise StageFailed(f"stage {name} failed on {len(errors)} shard(s); first: {errors[0]}")


def job_client(address: str):
    """A client of a cluster's Ray job API (``http://HEAD:8265``); curate.jobs drives it."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def ray_map(fn: Callable[[Any], Any], items: Iterable[Any], num_cpus: float = 1,
            num_gpus: float = 0) -> list[Any]:
    """Run ``fn`` over ``items`` as Ray tasks, results in order (for plan steps)."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3)(fn)
    return ray.get([remote.remote(i) for i in items])


# -- metrics -----------------------------------------------------------------------------------
_METRICS: dict[str, Any] = {}


def _record_metrics(stage: str, stats: dict[str, Any]) -> None:
    """rows in / kept / dropped per stage, exported through Ray's Prometheus metrics endpoint."""
    if "ray" not in sys.modules:
        return  # a shard run without Ray (the local executor): importing it here cost ~1 s per worker
    try:
        import ray
        from ray.util.metrics import Counter as RayCounter
    except ImportError:  # pragma: no cover
        return
    if not ray.is_initialized():
        return
    if not _METRICS:
        _METRICS["in"] = RayCounter("curate_rows_in", "rows read by a stage", tag_keys=("stage",))
        _METRICS["kept"] = RayCounter("curate_rows_kept", "rows kept by a stage", tag_keys=("stage",))
        _METRICS["dropped"] = RayCounter(
            "curate_rows_dropped", "rows dropped by a stage", tag_keys=("stage", "reason"))
        _METRICS["shards"] = RayCounter("curate_shards_committed", "shards committed", tag_keys=("stage",))
    if stats["rows_in"]:  # Ray's Counter.inc refuses 0: empty shards are legitimate
        _METRICS["in"].inc(stats["rows_in"], {"stage": stage})
    if stats["rows_out"]:
        _METRICS["kept"].inc(stats["rows_out"], {"stage": stage})
    for reason, count in stats["drops"].items():
        _METRICS["dropped"].inc(count, {"stage": stage, "reason": reason})
    _METRICS["shards"].inc(1, {"stage": stage})


# -- one stage ---------------------------------------------------------------------------------
def prepare(
    stage: str,
    input: str | None,
    output: str,
    config: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
    config_file: str | None = None,
    check: bool = True,
) -> tuple[type[Stage], StageConfig, dict[str, Any]]:
    """Validate everything a run needs before any work: stage, config, input. Raises ConfigError."""
    stage_cls, cfg = stage_and_config(stage, config_file, config, sets)
    if input is None:
        raise ConfigError(f"{stage}: --input is required")
    if stage_cls.reads_dataset:
        from curate.inputs import dataset_problem

        problem = dataset_problem(input)
        if problem:
            raise ConfigError(f"{stage}: input {problem}")
        inp = Dataset(input)
        input_id = {"url": inp.url, "manifest": fingerprint(inp.manifest())}
    else:
        from curate.dataset import url_to_fs

        fs, path = url_to_fs(input)
        if not fs.exists(path):
            raise ConfigError(f"{stage}: input {input} does not exist")
        cfg = _check_raw_input(stage, stage_cls, cfg, input)
        # by its files too: a URL list or tar folder changed in place is another input, never "complete"
        input_id = {"url": input if "://" in input else os.path.abspath(input)}
        if stage_cls.fingerprints_input:
            input_id["files"] = input_fingerprint(fs, path)
    # files the config names and models against the input: refused here, before anything is written
    stage_cls(cfg).check(Dataset(input) if stage_cls.reads_dataset else None)
    from curate.redact import redact

    # what is recorded (run.json, the manifest) never holds a URL's password or a signed query
    record = redact({
        "stage": stage,
        "config": resolved(cfg),
        "input": input_id,
    })
    if check:
        check_output(Dataset(output), record)
    return stage_cls, cfg, record


def _check_raw_input(stage: str, stage_cls: type[Stage], cfg: StageConfig, input: str) -> StageConfig:
    """A URL list or tar input looked at before Ray starts: a wrong column or the wrong command is
    one line naming the fix; a recognised column name (``URL``, ``TEXT``) is used with a note."""
    from curate.inputs import InputError, check_raw_input

    try:
        updates, notes = check_raw_input(stage_cls.name, cfg, input)
    except InputError as e:
        raise ConfigError(f"{stage}: {e}") from None
    for note in notes:
        log.warning("%s: %s", stage, note)
    return cfg.model_copy(update=updates) if updates else cfg


def check_output(out: Dataset, record: dict[str, Any]) -> str:
    """'fresh', 'resume' or 'complete'; raises ConfigError if the output belongs to another run."""
    manifest = out.manifest()
    existing = manifest.get("run") if manifest else out.read_json(PLAN_DIR, RUN_FILE)
    if existing is None:
        if out.fs.exists(out.root) and not _only_start_debris(out):
            raise ConfigError(f"output {out.url} exists and is not a curate dataset; choose another --output")
        return "fresh"
    if existing != record:
        if not manifest and not out.shard_ids() and out.exists(PLAN_DIR, FAILED_MARK):
            # An unfinished run that raised before committing any shard (it failed while planning
            # or on its first shards) holds nothing worth keeping: the corrected command starts afresh.
            return "stale"
        what = "a complete" if manifest else "an unfinished"
        diff = next((k for k in ("stage", "input", "config") if existing.get(k) != record.get(k)), "config")
        raise ConfigError(
            f"output {out.url} holds {what} {existing.get('stage')} run with a different {diff} "
            f"({record_diff(existing, record)}); use --overwrite to replace it or choose another --output")
    return "complete" if manifest else "resume"


def _only_start_debris(out: Dataset) -> bool:
    """Whether the folder holds nothing but what a run killed while recording itself leaves: an
    empty plan folder, or one holding only the temporary file of its run record."""
    entries = [posixpath.basename(p.rstrip("/")) for p in out.fs.ls(out.root, detail=False)]
    if not entries:
        return True
    if entries != [PLAN_DIR]:
        return False
    inside = [posixpath.basename(p) for p in out.fs.ls(out.path(PLAN_DIR), detail=False)]
    return all(name.startswith(RUN_FILE + TMP_MARK) for name in inside)


def input_fingerprint(fs: Any, path: str) -> str:
    """A digest of a raw input's files: name and size of each, and its content for small files (a URL
    list rewritten with the same rows is the same input) or its mtime / ETag for large ones."""
    infos = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    h = hashlib.sha256()
    for name in sorted(infos):
        info = infos[name]
        size = int(info.get("size") or 0)
        h.update(f"{posixpath.relpath(name, path)}\0{size}\0".encode())
        if size <= SMALL_INPUT_BYTES:
            h.update(hashlib.sha256(fs.cat_file(name)).digest())
        else:
            h.update(str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "").encode())
    return h.hexdigest()[:32]


SMALL_INPUT_BYTES = 16 << 20


def record_diff(old: Any, new: Any, prefix: str = "", limit: int = 3) -> str:
    """'config.url_col: was 'url', now 'URL'; ...': the first keys whose values differ, by path."""
    found: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif a != b:
            found.append(f"{path}: was {a!r}, now {b!r}")

    walk(old, new, prefix)
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


FAILED_MARK = "failed.json"  # in the plan folder: this run raised before committing any shard


def run_stage(
    stage: str,
    input: str | None,
    output: str,
    config: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
    options: RunOptions = RunOptions(),
    config_file: str | None = None,
    progress: Callable[[StageProgress], None] | None = None,
) -> dict[str, Any]:
    """Run one stage to completion (or resume it); return the manifest's summary. ``progress`` is
    called with a StageProgress when Ray starts, when planning starts and each time a shard commits.

    A run that raises before committing any shard says so in its plan folder: the corrected
    command, even with another config, then starts afresh instead of being refused. A run that was
    killed leaves no such mark (its workers may still be running), so it is still refused."""
    began: list[bool] = []
    try:
        return _run_stage(stage, input, output, config, sets, options, config_file, progress, began)
    except BaseException as e:
        out = Dataset(output)
        if began and not out.manifest() and not out.shard_ids():
            out.write_json({"error": f"{type(e).__name__}: {e}"[:2000]}, PLAN_DIR, FAILED_MARK)
        raise


def _run_stage(stage, input, output, config, sets, options, config_file, progress, began) -> dict[str, Any]:
    out = Dataset(output)
    stage_cls, cfg, record = prepare(stage, input, output, config, sets, config_file, check=False)
    if options.retry_failed and not stage_cls.retries_failed:
        raise ConfigError(f"{stage}: --retry-failed applies to download only (only it records failures "
                          "worth fetching again)")
    try:
        state = check_output(out, record)
    except ConfigError:
        # --overwrite replaces only an output made by another stage, config or input; an output of
        # this very run is still skipped (complete) or resumed (unfinished).
        if not options.overwrite:
            raise
        refuse_foreign_overwrite(out)
        out.delete_all()
        state = check_output(out, record)
    if state == "stale":
        log.info("%s: removing %s, left by a run that failed before committing any shard", stage, out.url)
        out.delete_all()
        out.refresh()
        state = check_output(out, record)
    if state == "complete" and not options.retry_failed:
        log.info("%s: output %s is complete with the same config and input; skipping", stage, out.url)
        return {**out.manifest()["totals"], "skipped": True, "stage": stage, "output": out.url}

    tracker = _Tracker(stage, progress)
    tracker.starting()
    local = _local_pool_for(stage_cls(cfg))
    try:
        if local is not None:
            local.warm(stage_cls.__module__)
        return _run_planned(stage, stage_cls, cfg, record, input, out, options, progress, began, tracker, local)
    finally:
        if local is not None:
            local.close()


def _run_planned(stage, stage_cls, cfg, record, input, out, options, progress, began, tracker,
                 local: _LocalPool | None) -> dict[str, Any]:
    if local is None:
        ensure_ray()
    started = time.time()
    out.write_json(record, PLAN_DIR, RUN_FILE)
    began.append(True)
    if out.exists(PLAN_DIR, FAILED_MARK):
        out.delete(out.path(PLAN_DIR, FAILED_MARK))
    if options.retry_failed:
        # The dataset stops being complete before any row moves, and is planned again from the
        # stage's own plan state: a killed retry is finished by the plain command, never "complete".
        out.keep_removals()
        out.delete(out.path(MANIFEST))
        out.delete(out.path(PLAN_DIR, PLAN_FILE))
        out.refresh()
    out.recover()
    driver_stage = stage_cls(cfg)
    inp = Dataset(input) if stage_cls.reads_dataset else None

    plan = out.read_json(PLAN_DIR, PLAN_FILE)
    if plan is None:
        tracker.planning()
        pctx = PlanContext(
            input_path=input, input=inp, output=out, plan_dir=out.path(PLAN_DIR), options=options,
            map=local.map if local is not None else plan_map(driver_stage),
            slots=local.slots if local is not None else _plan_slots(driver_stage),
        )
        t = time.perf_counter()
        ids = driver_stage.plan(pctx)
        plan_seconds = time.perf_counter() - t
        if ids is None:
            ids, digits = inp.shard_ids(), inp.shard_digits
        else:
            ids = sorted(int(i) for i in ids)
            digits = digits_for(max(ids) + 1 if ids else 1, 5)
        plan = {"shards": ids, "shard_digits": digits, "plan_seconds": plan_seconds}
        if pctx.splits:
            plan["splits"] = {name: sorted(int(i) for i in part) for name, part in pctx.splits.items()}
        out.write_json(plan, PLAN_DIR, PLAN_FILE)
    out.shard_digits = plan["shard_digits"]
    out.splits = plan.get("splits") or {}

    env = ShardEnv(stage, input, out.url, plan["shard_digits"], options)
    committed = set(out.shard_ids())
    pending = [n for n in plan["shards"] if n not in committed]
    tracker.start(out, plan["shards"], committed, _planned_rows(stage_cls, inp, out, options) if progress else None)

    def on_done(n: int, stats: dict[str, Any]) -> None:
        tracker.shard(stats)

    if pending and local is not None and (len(pending) <= local.slots
                                          or os.environ.get("CURATE_EXECUTOR") == "local"):
        _run_shards_local(local, stage, cfg, pending, env, on_done)
    elif pending:
        if local is not None:
            local.close()  # warmed up for the plan, not needed beside Ray's own workers
        ensure_ray()
        _run_shards(stage, stage_cls, cfg, pending, env, on_done, tracker.running if progress else None)
    out.refresh()
    out.shard_digits = plan["shard_digits"]
    out.splits = plan.get("splits") or {}
    out.sweep_tmp()
    manifest = write_manifest(out, stage_cls, record, plan, time.time() - started)
    return {**manifest["totals"], "skipped": False, "stage": stage, "output": out.url}


# -- progress ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageProgress:
    """Where one stage run stands, in rows. Rows count when their shard commits; rows_total is
    None when the input's size is not known before its shards run."""

    stage: str
    phase: str  # "start" (Ray starting), "plan" (the global step before any shard) or "shards"
    shards_done: int = 0
    shards_total: int = 0
    rows_done: int = 0  # rows in of committed shards, those committed by earlier runs included
    rows_running: int = 0  # rows finished inside shards still running (not yet committed)
    kept: int = 0
    dropped: int = 0
    rows_total: int | None = None
    rows_this_run: int = 0  # for the rate: rows committed since this run started its shards
    shards_this_run: int = 0
    started: float = 0.0  # time.time() when this run started its shards


class _Tracker:
    """Counts committed shards and their rows for run_stage's progress callback."""

    def __init__(self, stage: str, callback: Callable[[StageProgress], None] | None):
        self.callback = callback
        self.state = StageProgress(stage, "plan", started=time.time())

    def starting(self) -> None:
        """Inputs are checked; Ray is being started or joined (seconds on a laptop)."""
        self._emit(dataclasses.replace(self.state, phase="start", started=time.time()))

    def planning(self) -> None:
        self._emit(dataclasses.replace(self.state, phase="plan", started=time.time()))

    def start(self, out: Dataset, shards: list[int], committed: set[int], rows_total: int | None) -> None:
        log.info("%s: %d shards planned, %d committed by an earlier run%s", self.state.stage, len(shards),
                 len(committed & set(shards)), f", {rows_total:,} rows" if rows_total is not None else "")
        earlier = [out.stats(n) for n in shards if n in committed] if self.callback else []
        self._emit(dataclasses.replace(
            self.state, phase="shards", shards_done=len(earlier), shards_total=len(shards),
            rows_done=sum(s["rows_in"] for s in earlier), kept=sum(s["rows_out"] for s in earlier),
            dropped=sum(s["rejected"] for s in earlier), rows_total=rows_total, started=time.time()))

    def shard(self, stats: dict[str, Any]) -> None:
        s = self.state
        log.info("%s: shard %s committed: %d rows in, %d kept, %d dropped, %.1f s", s.stage, stats["shard"],
                 stats["rows_in"], stats["rows_out"], stats["rejected"], stats.get("seconds", 0.0))
        self._emit(dataclasses.replace(
            s, shards_done=s.shards_done + 1, rows_done=s.rows_done + stats["rows_in"],
            kept=s.kept + stats["rows_out"], dropped=s.dropped + stats["rejected"],
            rows_this_run=s.rows_this_run + stats["rows_in"], shards_this_run=s.shards_this_run + 1))

    def running(self, rows: int) -> None:
        """Rows finished inside the shards still running."""
        self._emit(dataclasses.replace(self.state, rows_running=rows))

    def _emit(self, state: StageProgress) -> None:
        self.state = state
        if self.callback:
            self.callback(state)


def _planned_rows(stage_cls: type[Stage], inp: Dataset | None, out: Dataset, options: RunOptions) -> int | None:
    """Rows the run will read: the input dataset's rows, or the rows download's plan cut into shards."""
    if inp is not None:
        kept = ((inp.manifest() or {}).get("totals") or {}).get("kept")
        return int(kept) if kept is not None else None
    if stage_cls.name == "download" and not options.retry_failed:
        from curate.stages.download import STATE_FILE

        return (out.read_json(PLAN_DIR, STATE_FILE) or {}).get("rows")
    return None


def write_manifest(out: Dataset, stage_cls: type[Stage], record: dict[str, Any], plan: dict[str, Any],
                   seconds: float) -> dict[str, Any]:
    """The stage's manifest, counted from the committed shards (Dataset.build_manifest)."""
    base = {
        "schema_version": schema.SCHEMA_VERSION,
        "stage": record["stage"],
        "config": record["config"],
        "input": record["input"],
        # where it was written: a copy read elsewhere rebases its pointers from here (curate.lineage)
        "location": out.url,
        "run": record,
        "code_version": curate.__version__,
        "owns_images": stage_cls.writes_images,
        "shard_digits": plan["shard_digits"],
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "removals": out.removals(),
    }
    return out.write_manifest(out.build_manifest(base, plan["shards"]))


def refuse_foreign_overwrite(out: Dataset) -> None:
    """--overwrite deletes only a curate dataset (one with a manifest or a run record): a folder
    curate did not write is refused with one line, nothing deleted."""
    if out.manifest() is None and out.read_json(PLAN_DIR, RUN_FILE) is None:
        raise ConfigError(f"--overwrite: {out.url} is not a curate dataset (no _manifest.json or _plan/run.json), "
                          "and curate deletes only what it wrote; choose another --output or empty it yourself")
