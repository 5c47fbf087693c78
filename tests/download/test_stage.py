"""The download stage: plan/load/process without Ray, then end to end through the runner."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import schema
from curate.dataset import PLAN_DIR, Dataset, read_images
from curate.stage import PlanContext, RunOptions, ShardContext
from curate.stages.download import RETRY_COL, DownloadConfig, DownloadStage
from curate.wds import TarWriter, iter_tar

pytestmark = pytest.mark.timeout(180)

# path -> (status, drop_reason suffix or None, error kind)
CASES = {
    "/img/a.jpg": ("success", None),
    "/img/b.png": ("success", None),
    "/img/c.webp": ("success", None),
    "/img/d.gif": ("success", None),
    "/img/exif.jpg": ("success", None),
    "/redirect/3": ("success", None),
    "/ratelimited/1": ("success", None),
    "/status/404": ("failed_to_download", "http"),
    "/status/500": ("failed_to_download", "http_transient"),
    "/slow.jpg": ("failed_to_download", "timeout"),
    "/endless.jpg": ("failed_to_download", "too_large"),
    "/huge.jpg": ("failed_to_download", "too_large"),
    "/loop": ("failed_to_download", "redirects"),
    "/to-private": ("failed_to_download", "refused"),
    "/noai.jpg": ("failed_to_download", "opted_out"),
    "/html.jpg": ("failed_to_decode", None),
    "/truncated.jpg": ("failed_to_decode", None),
    "/bomb.png": ("failed_to_decode", None),
    "/bomb-anim.gif": ("failed_to_decode", None),
    "/blocked.jpg": ("failed_to_download", "blocklisted"),
}


def config(server, **over) -> DownloadConfig:
    fetch = {"allowed_networks": ["127.0.0.1/32"], "timeout_s": 2.0, "retries": 1, "backoff_s": 0.05,
             "max_bytes": 1 << 20, "url_blocklist": [server.base_url + "/blocked.jpg"],
             **over.pop("fetch", {})}
    image = {"image_size": 64, "resize_mode": "keep_ratio", "max_pixels": 1_000_000,
             "max_total_pixels": 2_000_000, **over.pop("image", {})}
    return DownloadConfig(fetch=fetch, image=image, **over)


def url_list(tmp_path, server, paths, extra=None) -> str:
    rows = {"url": [server.base_url + p for p in paths], "caption": [f"caption of {p}" for p in paths],
            "source": [f"s{i}" for i in range(len(paths))]}
    rows.update(extra or {})
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table(rows), path)
    return str(path)


def plan_ctx(inp, out: Dataset, retry=False) -> PlanContext:
    return PlanContext(input_path=inp, input=None, output=out, plan_dir=out.path(PLAN_DIR),
                       options=RunOptions(retry_failed=retry), map=lambda f, xs: [f(x) for x in xs])


def test_process_every_case_without_ray(tmp_path, server):
    paths = list(CASES) + ["/img/a.jpg"]
    inp = url_list(tmp_path, server, paths, {"uid": [f"{i:032x}" for i in range(len(paths) - 1)] + [f"{0:032x}"]})
    stage = DownloadStage(config(server, shard_size=1000))
    out = Dataset(str(tmp_path / "out"))
    assert stage.plan(plan_ctx(inp, out)) == [0]
    ctx = ShardContext(shard=0, input_path=inp, input=None, output=out, plan_dir=out.path(PLAN_DIR),
                       options=RunOptions())
    table = stage.load(0, ctx)
    assert table.num_rows == len(paths)
    tar_path = tmp_path / "shard.tar"
    f = open(tar_path, "wb")  # noqa: SIM115
    ctx.tar, ctx.tar_url = TarWriter(f), str(tar_path)
    result = stage.process(table, ctx)
    ctx.tar.close()
    f.close()

    assert result.num_rows == len(paths)
    rows = result.to_pylist()
    for p, r in zip(paths[:-1], rows, strict=False):
        status, kind = CASES[p]
        assert r[schema.STATUS] == status, (p, r[schema.ERROR_MESSAGE])
        if status == "success":
            assert r[schema.DROP_REASON] is None and r[schema.ERROR_MESSAGE] is None
        else:
            assert r[schema.DROP_REASON] == f"download:{status}"
            assert r[schema.ERROR_MESSAGE]
            if kind:
                assert r[schema.ERROR_MESSAGE].startswith(kind + ":"), (p, r[schema.ERROR_MESSAGE])
    # the repeated input uid is rejected without a request
    assert rows[-1][schema.DROP_REASON] == "download:duplicate_uid"
    assert server.paths().count("/img/a.jpg") == 1 + 1  # once for a.jpg, once at the end of /redirect/3
    assert "/blocked.jpg" not in server.paths()
    assert "source" in result.column_names  # extra input column carried

    # the tar holds exactly the successes, in row order, with pointers that match
    ok = [r for r in rows if r[schema.STATUS] == "success"]
    with open(tar_path, "rb") as fh:
        members = list(iter_tar(fh))
        blob = fh.seek(0) or fh.read()
    names = [m.name for m in members]
    assert names == [f"{r[schema.KEY]}.{e}" for r in ok for e in (r[schema.IMAGE_FORMAT], "txt", "json")]
    for r in ok:
        data = blob[r[schema.IMAGE_OFFSET]:r[schema.IMAGE_OFFSET] + r[schema.IMAGE_LENGTH]]
        assert hashlib.sha256(data).hexdigest() == r[schema.SHA256]
        img = Image.open(io.BytesIO(data))
        assert img.size == (r[schema.WIDTH], r[schema.HEIGHT])
        assert min(img.size) == 64  # keep_ratio 64
        assert r[schema.PHASH] is not None
        # five crop hashes beside the pHash (these flat test images hash to noise, so only their
        # presence is checked here; tests/dedup/test_phash.py checks the values)
        assert r[schema.PHASH_CROPS] is not None and len(r[schema.PHASH_CROPS]) == 40
    meta = json.loads(blob[members[2].offset:members[2].offset + members[2].size])
    assert meta[schema.URL] == ok[0][schema.URL] and meta[schema.STATUS] == "success"
    exif_row = next(r for r in ok if r[schema.URL].endswith("/img/exif.jpg"))
    assert (exif_row[schema.ORIGINAL_WIDTH], exif_row[schema.ORIGINAL_HEIGHT]) == (20, 40)
    s = ctx.stats
    assert s["count"] == len(paths) and s["successes"] == len(ok)
    assert s["failed_to_download"] + s["failed_to_decode"] + s["successes"] + s["failed_to_resize"] == len(paths)
    assert set(ctx.timings) >= {"network", "decode", "resize", "write"}


def test_plan_shards_deterministic(tmp_path, server):
    paths = [f"/img/a.jpg?n={i}" for i in range(25)]
    inp = url_list(tmp_path, server, paths)
    a, b = Dataset(str(tmp_path / "a")), Dataset(str(tmp_path / "b"))
    stage = DownloadStage(config(server, shard_size=10))
    assert stage.plan(plan_ctx(inp, a)) == [0, 1, 2]
    assert stage.plan(plan_ctx(inp, b)) == [0, 1, 2]
    for n in range(3):
        ta = pq.read_table(a.path(PLAN_DIR, "download", f"{n:08d}.parquet"))
        tb = pq.read_table(b.path(PLAN_DIR, "download", f"{n:08d}.parquet"))
        assert ta.equals(tb)
    sizes = [pq.read_table(a.path(PLAN_DIR, "download", f"{n:08d}.parquet")).num_rows for n in range(3)]
    assert sizes == [10, 10, 5]


def every_uid(out: Dataset) -> Counter:
    c: Counter = Counter()
    for _, t in out.iter_shards(columns=[schema.UID]):
        c.update(t.column(schema.UID).to_pylist())
    for _, t in out.iter_rejects(columns=[schema.UID]):
        c.update(t.column(schema.UID).to_pylist())
    return c


def test_end_to_end_through_runner_then_retry_failed(tmp_path, server, ray_session):
    from curate.runner import run_stage

    paths = ["/img/a.jpg", "/img/b.png", "/sometimes.jpg", "/status/404", "/html.jpg", "/img/c.webp",
             "/noai.jpg", "/img/d.gif"]
    inp = url_list(tmp_path, server, paths)
    out_url = str(tmp_path / "out")
    cfg = config(server, shard_size=4, fetch={"retries": 0}).model_dump(mode="json")
    summary = run_stage("download", inp, out_url, config=cfg)
    assert summary["rows_in"] == 8 and summary["kept"] == 4
    assert summary["drops"] == {"download:failed_to_decode": 1, "download:failed_to_download": 3}
    out = Dataset(out_url)
    assert out.is_complete() and out.shard_ids() == [0, 1]
    kept = pa.concat_tables([t for _, t in out.iter_shards()])
    blobs = read_images(kept, out)
    assert all(b is not None and hashlib.sha256(b).hexdigest() == h
               for b, h in zip(blobs, kept.column(schema.SHA256).to_pylist(), strict=True))
    sizes = json.loads((tmp_path / "out" / "shards" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 2}
    stats0 = out.stats(0)
    assert stats0["count"] == 4 and stats0["failed_to_download"] == 2 and "status_dict" in stats0
    assert every_uid(out) and set(every_uid(out).values()) == {1}

    # the 503 host recovers: --retry-failed fetches only that row again, into a new shard
    server.routes.healthy = True
    before = server.paths()
    import yaml

    from curate.cli import main

    cfg_file = tmp_path / "download.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["download", "--input", inp, "--output", out_url, "--config", str(cfg_file), "--retry-failed"]) == 0
    summary = Dataset(out_url).manifest()["totals"]
    refetched = server.paths()[len(before):]
    assert refetched == ["/sometimes.jpg"]  # the 404 and the opt-out are not retried
    out = Dataset(out_url)
    assert out.shard_ids() == [0, 1, 2]
    new = out.read_shard(2)
    assert new.column(schema.URL).to_pylist() == [server.base_url + "/sometimes.jpg"]
    counts = every_uid(out)
    assert len(counts) == 8 and set(counts.values()) == {1}  # no uid both kept and rejected
    assert summary["rows_in"] == 8 and summary["kept"] == 5 and summary["dropped"] == 3
    assert out.stats(0)["retried_out"] == 1
    why = DownloadStage(config(server)).explain(out, new.column(schema.UID)[0].as_py())
    assert why["decision"] == "kept" and why["shard"] == "00002" and why[schema.STATUS] == "success"
    gone = out.read_rejects(0).filter(pa.compute.equal(out.read_rejects(0).column(schema.URL), server.base_url + "/status/404"))
    why = DownloadStage(config(server)).explain(out, gone.column(schema.UID)[0].as_py())
    assert why["decision"] == "rejected" and why[schema.ERROR_MESSAGE].startswith("http: 404")

    # a second retry finds nothing to do and changes nothing
    summary2 = run_stage("download", inp, out_url, config=cfg, options=RunOptions(retry_failed=True))
    assert summary2["kept"] == 5 and Dataset(out_url).shard_ids() == [0, 1, 2]


def test_retry_failed_is_crash_safe_without_ray(tmp_path, server):
    """A rerun planned but not yet processed loses nothing and duplicates nothing; the old shard
    gives its failed row up only when the new shard has re-fetched it."""
    from curate.runner import ShardEnv, execute_shard

    paths = ["/img/a.jpg", "/sometimes.jpg", "/img/b.png", "/status/404"]
    inp = url_list(tmp_path, server, paths)
    out = Dataset(str(tmp_path / "out"))
    stage = DownloadStage(config(server, shard_size=2, fetch={"retries": 0}))
    env = ShardEnv("download", inp, out.url, 5, RunOptions())
    assert stage.plan(plan_ctx(inp, out)) == [0, 1]
    for n in (0, 1):
        execute_shard(stage, n, env)
    assert set(every_uid(out).values()) == {1} and len(every_uid(out)) == 4

    server.routes.healthy = True
    assert stage.plan(plan_ctx(inp, out, retry=True)) == [0, 1, 2]
    # planned, not processed (a crash here): the row is still rejected in shard 0, only there
    assert set(every_uid(out).values()) == {1} and len(every_uid(out)) == 4
    # a rerun with --retry-failed before shard 2 ran plans nothing new
    assert stage.plan(plan_ctx(inp, out, retry=True)) == [0, 1, 2]
    execute_shard(stage, 2, env)
    counts = every_uid(out)
    assert set(counts.values()) == {1} and len(counts) == 4
    assert out.read_shard(2).column(schema.URL).to_pylist() == [server.base_url + "/sometimes.jpg"]
    assert out.read_rejects(0).num_rows == 0 and out.stats(0)["rows_in"] == 1
    assert RETRY_COL not in out.read_shard(2).column_names
    # the rewrite is idempotent: doing it again (a zombie attempt) changes nothing
    before = out.read_rejects(0)
    stage._take_over(out, 0, out.read_shard(2).column(schema.UID).to_pylist())
    assert out.read_rejects(0).equals(before)


def test_progress_counts_rows_inside_a_running_shard(server, tmp_path, ray_session):
    # One shard of 40 URLs that answer after 150 ms each, 4 connections: the shard runs for ~1.5 s
    # and the driver must see rows finish inside it, not 0 until the commit.
    from curate.runner import run_stage

    n = 40
    inp = url_list(tmp_path, server, [f"/delay/150?{i}" for i in range(n)])
    cfg = config(server, fetch={"connections": 4, "per_host_connections": 4}).model_dump(mode="json")
    seen = []
    summary = run_stage("download", inp, str(tmp_path / "out"), config=cfg, progress=seen.append)
    assert summary["rows_in"] == n and summary["kept"] == n
    shards = [p for p in seen if p.phase == "shards"]
    assert shards[-1].rows_done == n and shards[-1].shards_done == 1
    inside = [p.rows_running for p in shards if p.shards_done == 0]
    assert any(0 < r < n for r in inside), inside  # rows finished before the shard committed
    # finished rows only grow, and leave the running count just before the commit counts them
    assert inside[:-1] == sorted(inside[:-1]) and inside[-1] == 0, inside
    assert all(p.rows_done + p.rows_running <= n for p in shards)  # never counted twice
