"""The download stage: URL lists in, a dataset that owns its image bytes out (tars + Parquet).

``plan`` cuts the URL list(s) into deterministic input shards of ``shard_size`` rows under the
output's plan folder (a repeated input uid is marked there and rejected later, never fetched).
Each shard then runs as one task with one asyncio event loop: many connections through the guarded
client of :mod:`curate.fetch`, decode / resize / encode of :mod:`curate.images` in a small thread pool
(Pillow releases the GIL), and samples appended to the shard's tar in row order, so the same
responses always give the same tar. Where an image is decoded anyway its pHash is computed too.

Every row ends with img2dataset's ``status`` and ``error_message``; failures are rejected with
``download:<status>``. ``--retry-failed`` re-plans: transient failures of committed shards are moved
into new shards, and the old shards' rejects (and their stats) are rewritten without them, so every
input uid stays exactly once in shards + rejects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import schema
from curate.dataset import PLAN_DIR, Dataset, make_key
from curate.fetch import FetchConfig, retryable_message
from curate.images import ImageConfig
from curate.stage import PlanContext, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

STAGE = "download"
PLAN_SUBDIR = "download"
STATE_FILE = "download.json"
DUP_COL = "__curate_duplicate_uid"  # plan-only marker, never written to the output
RETRY_COL = "__curate_retry_of"  # plan-only: the committed shard whose failed row this is
STATUS_DICT_CAP = 100


class DownloadConfig(StageConfig):
    url_col: str = "url"
    caption_col: str | None = "caption"
    uid_col: str = "uid"
    extra_columns: tuple[str, ...] | None = None  # None: carry every other input column
    input_format: Literal["parquet", "csv", "tsv", "json", "jsonl", "txt"] | None = None  # None: by extension
    shard_size: int = Field(10_000, ge=1)
    # A list shorter than shard_size x min_shards is cut into min_shards equal shards, so every
    # task slot has work (a small list in one shard is one task's connections doing everything).
    # None: the cluster's task slots for this stage; 1: always shards of shard_size.
    min_shards: int | None = Field(None, ge=1)
    decode_threads: int = Field(2, ge=1)
    compute_phash: bool = True
    # Finished samples waiting for a slower earlier row before being written in row order.
    reorder_buffer_mb: int = Field(256, ge=1)
    fetch: FetchConfig = FetchConfig()
    image: ImageConfig = ImageConfig()


def _plan_file(n: int) -> str:
    """Input rows of shard n, in download's plan store."""
    return f"{n:08d}.parquet"


def shard_stats(statuses: list[str], errors: list[str | None]) -> dict[str, Any]:
    """img2dataset's per-shard stats fields from the rows' status / error_message."""
    by_status = Counter(statuses)
    messages = Counter(e if s != schema.STATUS_SUCCESS else "success" for s, e in zip(statuses, errors, strict=True))
    return {
        "count": len(statuses),
        "successes": by_status.get(schema.STATUS_SUCCESS, 0),
        "failed_to_download": by_status.get(schema.STATUS_FAILED_TO_DOWNLOAD, 0),
        "failed_to_resize": by_status.get(schema.STATUS_FAILED_TO_RESIZE, 0),
        "failed_to_decode": by_status.get(schema.STATUS_FAILED_TO_DECODE, 0),
        "status_dict": dict(messages.most_common(STATUS_DICT_CAP)),
    }


class DownloadStage(Stage):
    name = STAGE
    Config = DownloadConfig
    writes_images = True
    reads_dataset = False
    fingerprints_input = True
    retries_failed = True

    def __init__(self, config: DownloadConfig):
        super().__init__(config)
        self.config: DownloadConfig = config
        self._phash = None

    def setup(self) -> None:
        import PIL

        from curate.images import pillow_simd

        # Resizing is a large share of the CPU per image; Pillow-SIMD (same API) does it 3-7x faster.
        log.debug("images: %s %s", "Pillow-SIMD" if pillow_simd() else "Pillow", PIL.__version__)
        if self.config.compute_phash:
            try:
                from curate.phash import signature_pil

                self._phash = signature_pil
            except ImportError:
                log.warning("curate.phash is not available; phash left empty")

    # -- plan ------------------------------------------------------------------------------------
    def plan(self, ctx: PlanContext) -> list[int]:
        out = ctx.output
        state = out.read_json(PLAN_DIR, STATE_FILE)
        if state is None:
            state = self._plan_input(ctx)
        if ctx.options.retry_failed:
            state = self._plan_retry(ctx, state)
        return list(state["shards"])

    def _plan_input(self, ctx: PlanContext) -> dict[str, Any]:
        from curate.inputs import read_url_list

        cfg = self.config
        out = ctx.output
        store = out.plan_store(PLAN_SUBDIR)
        out.fs.makedirs(store.path(), exist_ok=True)
        seen: set = set()
        duplicates = 0
        pending: list[pa.Table] = []
        pending_rows = 0
        shards: list[int] = []
        rows = 0
        want = cfg.min_shards or ctx.slots
        size = cfg.shard_size

        def flush(force: bool) -> None:
            nonlocal pending, pending_rows, size
            if not shards and not force and pending_rows < cfg.shard_size * want:
                return  # until the list is known to fill `want` full shards, it may be split finer
            if not shards and force:
                size = min(cfg.shard_size, max(1, -(-pending_rows // want)))
            while pending_rows >= size or (force and pending_rows):
                table = pa.concat_tables(pending, promote_options="permissive")
                head, rest = table.slice(0, size), table.slice(size)
                n = len(shards)
                self._write_plan_shard(out, n, head)
                shards.append(n)
                pending = [rest] if rest.num_rows else []
                pending_rows = rest.num_rows

        for batch in read_url_list(ctx.input_path, cfg.url_col, cfg.caption_col, cfg.uid_col,
                                   cfg.extra_columns, cfg.input_format):
            dup = []
            for uid in batch.column(schema.UID).to_pylist():
                k = _uid_key(uid)
                dup.append(k in seen)
                seen.add(k)
            n_dup = sum(dup)
            duplicates += n_dup
            batch = batch.append_column(DUP_COL, pa.array(dup, pa.bool_()))
            pending.append(batch)
            pending_rows += batch.num_rows
            rows += batch.num_rows
            flush(False)
        flush(True)
        if duplicates:
            log.warning("%d input rows repeat an earlier uid; they are rejected as download:duplicate_uid",
                        duplicates)
        state = {"version": 1, "rows": rows, "duplicates": duplicates, "shards": shards, "retry_rounds": []}
        out.write_json(state, PLAN_DIR, STATE_FILE)  # the plan's commit point
        return state

    def _write_plan_shard(self, out: Dataset, n: int, table: pa.Table) -> None:
        out.plan_store(PLAN_SUBDIR).write_table(table, _plan_file(n))

    def _plan_retry(self, ctx: PlanContext, state: dict[str, Any]) -> dict[str, Any]:
        """Copy transient failures of committed shards into new input shards.

        The old shard's rejects still hold those rows until the new shard that re-fetches them is
        processed: its task removes them from the old rejects (and recounts the old stats) just
        before it commits. All failed rows of one old shard go to the same new shard, so no two
        tasks ever rewrite the same rejects file, and a crash at any point leaves every uid in
        shards + rejects exactly once after the rerun (the rewrite is idempotent).
        """
        out = ctx.output
        rounds = state.setdefault("retry_rounds", [])
        planned = set(state["shards"])
        committed = [n for n in out.shard_ids() if n in planned]
        # Rows already waiting in an uncommitted retry shard are not planned twice.
        waiting: set[str] = set()
        for rnd in rounds:
            for n in rnd["shards"]:
                if n not in committed:
                    waiting.update(out.plan_store(PLAN_SUBDIR).read_table(_plan_file(n), columns=[schema.UID])
                                   .column(schema.UID).to_pylist())
        groups: list[pa.Table] = []
        for n in committed:
            if not out.fs.exists(out.shard_path(n, "rejects.parquet")):
                continue
            rej = out.read_rejects(n)
            if rej.num_rows == 0:
                continue
            want = [r == schema.reason(STAGE, schema.STATUS_FAILED_TO_DOWNLOAD) and retryable_message(e)
                    and u not in waiting
                    for r, e, u in zip(rej.column(schema.DROP_REASON).to_pylist(),
                                       rej.column(schema.ERROR_MESSAGE).to_pylist(),
                                       rej.column(schema.UID).to_pylist(), strict=True)]
            if not any(want):
                continue
            input_cols = [c for c in out.plan_store(PLAN_SUBDIR).read_schema(_plan_file(n)).names
                          if c not in (DUP_COL, RETRY_COL) and c in rej.column_names]
            t = _plain(rej.filter(pa.array(want)).select(input_cols))
            groups.append(t.append_column(RETRY_COL, pa.array([n] * t.num_rows, pa.int64())))
        if not groups:
            log.info("retry-failed: no transient failures to retry")
            return state
        # Whole groups per new shard (a group is at most one old shard's rows, so it always fits).
        packs: list[list[pa.Table]] = [[]]
        for g in groups:
            if packs[-1] and sum(t.num_rows for t in packs[-1]) + g.num_rows > self.config.shard_size:
                packs.append([])
            packs[-1].append(g)
        first = max(state["shards"]) + 1
        new_ids = []
        for i, pack in enumerate(packs):
            self._write_plan_shard(out, first + i, pa.concat_tables(pack, promote_options="permissive"))
            new_ids.append(first + i)
        rows = sum(g.num_rows for g in groups)
        rounds.append({"round": len(rounds) + 1, "shards": new_ids, "rows": rows})
        state["shards"] = list(state["shards"]) + new_ids
        out.write_json(state, PLAN_DIR, STATE_FILE)
        log.info("retry-failed: %d rows of %d shards planned again in new shards %s", rows, len(groups), new_ids)
        return state

    def _take_over(self, out: Dataset, source: int, uids: list[str]) -> None:
        """Remove ``uids`` (now re-fetched by another shard) from shard ``source``'s rejects and
        recount its stats, in one crash-safe rewrite of that shard (Dataset.rewrite_shard)."""
        out.recover_shard(source)
        rej = out.read_rejects(source)
        gone = pc.is_in(rej.column(schema.UID), value_set=pa.array(uids, pa.string()))
        if not pc.any(gone).as_py():
            return  # already done by an earlier attempt of this shard
        keep = rej.filter(pc.invert(gone))
        kept = out.read_shard(source)
        statuses = kept.column(schema.STATUS).to_pylist() + keep.column(schema.STATUS).to_pylist()
        errors = [None] * kept.num_rows + keep.column(schema.ERROR_MESSAGE).to_pylist()
        moved = rej.num_rows - keep.num_rows
        update = {**shard_stats(statuses, errors), "retried_out": out.stats(source).get("retried_out", 0) + moved}
        out.rewrite_shard(source, kept, keep, update)

    # -- one shard -------------------------------------------------------------------------------
    def load(self, shard: int, ctx: ShardContext) -> pa.Table:
        return ctx.plan_store(PLAN_SUBDIR).read_table(_plan_file(shard))

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        if self._phash is None and self.config.compute_phash:
            self.setup()
        t0 = time.perf_counter()
        if DUP_COL in table.column_names:
            dup = table.column(DUP_COL).to_pylist()
            table = table.drop_columns([DUP_COL])
        else:
            dup = [False] * table.num_rows
        retry_of = None
        if RETRY_COL in table.column_names:
            retry_of = table.column(RETRY_COL).to_pylist()
            table = table.drop_columns([RETRY_COL])
        results, timing, counts = asyncio.run(self._download(table, dup, ctx))
        for k, v in timing.items():
            ctx.add_time(k, v)

        cols: dict[str, list] = {c: [] for c in (
            schema.KEY, schema.STATUS, schema.ERROR_MESSAGE, schema.WIDTH, schema.HEIGHT,
            schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, schema.SHA256, schema.IMAGE_TAR,
            schema.IMAGE_OFFSET, schema.IMAGE_LENGTH, schema.IMAGE_FORMAT, schema.PHASH, schema.COLOR_SIG,
            schema.PHASH_CROPS, schema.DROP_REASON)}
        for r in results:
            for c in cols:
                cols[c].append(r.get(c))
        out = table
        for c, values in cols.items():
            out = schema.with_column(out, c, values)
        ctx.stats.update(shard_stats(cols[schema.STATUS], cols[schema.ERROR_MESSAGE]))
        ctx.stats["duration"] = time.perf_counter() - t0
        ctx.stats["requests"] = counts["requests"]
        ctx.stats["connections"] = counts["connections"]  # the most this shard's task used at once
        import PIL

        ctx.stats["pillow"] = PIL.__version__  # ".postN": Pillow-SIMD
        if retry_of is not None:
            # Last, after every fetch: the old shard gives these rows up only once they are in hand.
            uids = table.column(schema.UID).to_pylist()
            for source in sorted(set(retry_of)):
                self._take_over(ctx.output, source, [u for u, s in zip(uids, retry_of, strict=True) if s == source])
        return out

    # Over 80 lines: the shard's event loop; fetches, decodes in threads and in-order tar writes share one
    # reorder buffer, and splitting it needs that state moved into its own class.
    async def _download(self, table: pa.Table, dup: list[bool], ctx: ShardContext):
        from curate.fetch import ConcurrencyTuner, Fetcher, Gate
        from curate.images import process_image

        cfg = self.config
        n_rows = table.num_rows
        urls = table.column(schema.URL).to_pylist()
        captions = table.column(schema.CAPTION).to_pylist()
        rows = table.to_pylist()
        digits = ctx.output.shard_digits
        # Same width in every shard (the last one is shorter): wide enough for the shard size.
        index_digits = max(4, len(str(max(cfg.shard_size, n_rows) - 1)))
        keys = [make_key(ctx.shard, i, digits, index_digits) for i in range(n_rows)]
        results: list[dict[str, Any] | None] = [None] * n_rows
        timing = {"network": 0.0, "decode": 0.0, "resize": 0.0, "phash": 0.0, "write": 0.0}
        pool = concurrent.futures.ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="curate-decode")
        bridge = _Bridge(asyncio.get_running_loop(), pool)
        budget = cfg.reorder_buffer_mb * 1024 * 1024
        state = {"head": 0, "buffered": 0, "finished": 0}
        cond = asyncio.Condition()
        # Bodies alive at once: those downloading plus a short queue for the decode threads. The
        # tuner raises the connections while latency, not CPU, bounds the task.
        queue = 4 * cfg.decode_threads
        bodies = Gate(cfg.fetch.connections + queue)
        tuner = ConcurrencyTuner(bodies, cfg.fetch.connections, cfg.fetch.max_connections, extra=queue)

        def cpu(data: bytes) -> tuple[Any, str | None, int | None, float]:
            p = process_image(data, cfg.image, keep_image=self._phash is not None)
            sha = hashlib.sha256(p.data).hexdigest() if p.data is not None else None
            ph, t = (None, None, None), 0.0
            if p.image is not None:
                t = time.perf_counter()
                try:
                    ph = self._phash(p.image)  # (pHash, colour signature, crop hashes) from this decode
                except Exception:  # noqa: BLE001 - a hash failure must not lose the image
                    log.debug("phash failed", exc_info=True)
                t = time.perf_counter() - t
                p.image = None
            return p, sha, ph, t

        def write_ready() -> None:
            # Append finished rows to the tar in row order.
            while state["head"] < n_rows and results[state["head"]] is not None:
                i = state["head"]
                r = results[i]
                blob = r.pop("_bytes", None)
                if blob is not None:
                    state["buffered"] -= len(blob)
                    t = time.perf_counter()
                    meta = {k: v for k, v in rows[i].items()}
                    meta.update({k: r.get(k) for k in (
                        schema.KEY, schema.STATUS, schema.ERROR_MESSAGE, schema.WIDTH, schema.HEIGHT,
                        schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT, schema.SHA256)})
                    where = ctx.tar.add(keys[i], {
                        r[schema.IMAGE_FORMAT]: blob,
                        "txt": captions[i] or "",
                        "json": json.dumps(meta, default=str, ensure_ascii=False),
                    })
                    off, size = where[r[schema.IMAGE_FORMAT]]
                    r[schema.IMAGE_TAR] = ctx.tar_url
                    r[schema.IMAGE_OFFSET] = off
                    r[schema.IMAGE_LENGTH] = size
                    timing["write"] += time.perf_counter() - t
                state["head"] += 1

        async def one(i: int, fetcher: Fetcher) -> None:
            async with cond:
                await cond.wait_for(lambda: state["buffered"] < budget or i == state["head"])
            r: dict[str, Any] = {schema.KEY: keys[i], schema.DROP_REASON: None}
            try:
                if dup[i]:
                    r[schema.STATUS] = schema.STATUS_FAILED_TO_DOWNLOAD
                    r[schema.ERROR_MESSAGE] = "duplicate_uid: this uid appears earlier in the input"
                    r[schema.DROP_REASON] = schema.reason(STAGE, "duplicate_uid")
                else:
                    f = await fetcher.fetch(urls[i] or "")
                    timing["network"] += f.seconds
                    if f.data is None:
                        r[schema.STATUS] = schema.STATUS_FAILED_TO_DOWNLOAD
                        r[schema.ERROR_MESSAGE] = f.error
                    else:
                        try:
                            p, sha, ph, t_ph = await bridge.run(cpu, f.data)
                        finally:
                            f.release()
                        del f
                        timing["decode"] += p.decode_seconds
                        timing["resize"] += p.resize_seconds
                        timing["phash"] += t_ph
                        r[schema.STATUS] = p.status
                        r[schema.ERROR_MESSAGE] = p.error
                        if p.data is not None:
                            r.update({
                                schema.WIDTH: p.width, schema.HEIGHT: p.height,
                                schema.ORIGINAL_WIDTH: p.original_width,
                                schema.ORIGINAL_HEIGHT: p.original_height,
                                schema.SHA256: sha, schema.IMAGE_FORMAT: p.ext,
                                schema.PHASH: ph[0], schema.COLOR_SIG: ph[1], schema.PHASH_CROPS: ph[2],
                                "_bytes": p.data,
                            })
                    if r[schema.STATUS] != schema.STATUS_SUCCESS:
                        r[schema.DROP_REASON] = schema.reason(STAGE, r[schema.STATUS])
            except Exception as e:  # noqa: BLE001 - one row's bug must not lose the shard's other rows
                log.exception("download of row %d failed unexpectedly", i)
                r[schema.STATUS] = schema.STATUS_FAILED_TO_DOWNLOAD
                r[schema.ERROR_MESSAGE] = f"internal: {type(e).__name__}: {e}"
                r[schema.DROP_REASON] = schema.reason(STAGE, schema.STATUS_FAILED_TO_DOWNLOAD)
                r.pop("_bytes", None)
            async with cond:
                results[i] = r
                state["buffered"] += len(r.get("_bytes") or b"")
                state["finished"] += 1
                tuner.done()
                write_ready()
                cond.notify_all()
            ctx.rows_done(state["finished"])

        tuning = asyncio.create_task(tuner.run())
        try:
            async with Fetcher(cfg.fetch, bodies) as fetcher:
                await asyncio.gather(*(one(i, fetcher) for i in range(n_rows)))
        finally:
            tuning.cancel()
            pool.shutdown(wait=True)
        return results, timing, {"requests": fetcher.requests, "connections": tuner.peak}

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        cols = [schema.UID, schema.URL, schema.KEY, schema.STATUS, schema.ERROR_MESSAGE, schema.DROP_REASON]
        for n in output.shard_ids():
            for kind, reader in (("kept", output.read_shard), ("rejected", output.read_rejects)):
                try:
                    t = reader(n, columns=cols)
                except FileNotFoundError:
                    continue
                hit = t.filter(pc.equal(t.column(schema.UID), uid))
                if hit.num_rows:
                    row = hit.to_pylist()[0]
                    return {"stage": STAGE, "decision": kind, "shard": output.shard_name(n), **row}
        return None


class _Bridge:
    """Runs CPU work in a thread pool for one event loop, and hands results back in batches: a
    finishing thread queues its result and wakes the loop only if no wake-up is already pending.
    When the CPU is the bound (the loop busy whenever a decode ends), one wake-up carries several
    results, where ``run_in_executor`` pays a future chain and a self-pipe write for each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: concurrent.futures.Executor):
        self.loop, self.pool = loop, pool
        self._done: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        self._lock = threading.Lock()
        self._wake_pending = False

    def run(self, fn: Any, *args: Any) -> asyncio.Future:
        fut = self.loop.create_future()
        self.pool.submit(self._call, fut, fn, args)
        return fut

    def _call(self, fut: asyncio.Future, fn: Any, args: tuple) -> None:
        try:
            item = (fut, fn(*args), None)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            item = (fut, None, e)
        with self._lock:
            self._done.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._wake_pending = False
        for fut, result, error in done:
            if fut.cancelled():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)


def _uid_key(uid: str) -> bytes | str:
    # 16 bytes per seen uid instead of a 32-character string: the plan keeps every uid in memory.
    try:
        return bytes.fromhex(uid) if len(uid) == 32 else uid
    except ValueError:
        return uid


def _plain(t: pa.Table) -> pa.Table:
    """Dictionary columns back to plain values, so tables from different shards concatenate."""
    for i, f in enumerate(t.schema):
        if pa.types.is_dictionary(f.type):
            t = t.set_column(i, pa.field(f.name, f.type.value_type), t.column(i).cast(f.type.value_type))
    return t
