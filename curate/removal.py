"""Removal requests: make listed samples disappear from every dataset given, without touching others.

``curate remove --uids FILE DATASET...`` (or ``--urls`` / ``--domains`` / ``--sha256``):

1. The request is resolved to a set of uids by scanning every given dataset (kept and rejected
   rows), so a URL matched in one dataset removes that sample from all of them.
2. Datasets are processed in lineage order (a dataset before those that read it). Per committed
   shard that is affected, everything is written under temporary names first and renamed into place
   together, the stats file (the commit marker) last:
   - the shard's own tar (download, export) is rewritten without the removed samples' members by
     copying every other member's header and data verbatim, so other samples keep their bytes; a
     new DALI ``.idx`` goes with it;
   - kept and rejected Parquet lose the removed rows (their embedding columns go with them), and
     every pointer into a tar rewritten by this or an earlier interrupted call is recomputed from
     that tar's members by key: downstream datasets given in the same call follow the new offsets;
   - ``dup_of`` values naming a removed uid are cleared, in rejects and in Parquet tables under
     ``_plan/`` (dedup decisions), whose rows for removed uids are dropped. Near-duplicates of a
     removed sample stay rejected (only exact copies share its sha256: ask by ``--sha256`` to
     remove those too);
   - clip's clip-retrieval-style files (``embeddings/*/*.npy`` + ``embeddings/metadata``) lose the
     removed rows; embedding columns go with their rows.
3. ``sizes.json``, then the manifest: row counts, totals, and a removal record
   ``{time, count, by, reason, ...}``. Downstream manifests given in the same call record their
   input's new manifest fingerprint, so rerunning the pipeline still skips them.

Adopted (imported) tars are never written: there removal drops the rows and the record says which
source tars still hold the bytes, as it does whenever the dataset owning a tar was not given.
The removed uids themselves are never written anywhere (records hold counts only).

Interrupted? Run the same command again: a journal under ``_plan/`` names the tars being
rewritten, so pointers into them are recomputed even where the rows were already gone.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import posixpath
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema
from curate.config import fingerprint
from curate.dataset import MANIFEST, PLAN_DIR, SHARDS, Dataset, tmp_name, write_parquet
from curate.wds import TarScan, index_text, iter_tar, split_name

log = logging.getLogger(__name__)

JOURNAL = "removal-pending.json"
_COPY_CHUNK = 8 << 20
_TEXT_PLAN_EXT = (".json", ".jsonl", ".txt", ".csv", ".tsv")


class RemovalError(ValueError):
    """A removal that cannot be carried out as asked; one line."""


@dataclasses.dataclass(frozen=True)
class Request:
    uids: frozenset[str] = frozenset()
    urls: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()
    reason: str = "removal request"
    by: str | None = None

    @property
    def kind(self) -> str:
        return next(k for k in ("uids", "urls", "domains", "sha256") if getattr(self, k)) if self.size else "none"

    @property
    def size(self) -> int:
        return len(self.uids) + len(self.urls) + len(self.domains) + len(self.sha256)

    @classmethod
    def from_files(cls, uids: str | None = None, urls: str | None = None, domains: str | None = None,
                   sha256: str | None = None, reason: str = "removal request", by: str | None = None) -> Request:
        def lines(path: str | None, lower: bool = False) -> frozenset[str]:
            if not path:
                return frozenset()
            try:
                with open(path, encoding="utf-8") as f:
                    items = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
            except FileNotFoundError:
                raise RemovalError(f"request file not found: {path}") from None
            return frozenset(i.lower() for i in items) if lower else frozenset(items)

        return cls(uids=lines(uids, lower=True), urls=lines(urls), domains=lines(domains, lower=True),
                   sha256=lines(sha256, lower=True), reason=reason, by=by)


def remove(datasets: list[str], request: Request) -> list[dict[str, Any]]:
    """Carry out ``request`` on every dataset; return one result per dataset (counts, notes)."""
    if request.size == 0:
        raise RemovalError("the removal request lists nothing")
    dss = [Dataset(d) for d in datasets]
    for ds in dss:
        if not ds.is_complete():
            raise RemovalError(f"{ds.url} is not a complete curate dataset (no {MANIFEST})")
    dss = _lineage_order(dss)
    doomed = resolve(dss, request)
    owned_roots = {ds.root: ds for ds in dss if ds.owns_images()}
    rewritten: set[str] = set()  # tars rewritten by this call or a journaled earlier one
    for ds in dss:
        rewritten |= set((ds.read_json(PLAN_DIR, JOURNAL) or {}).get("tars", []))
    new_fp: dict[str, str] = {}
    results = []
    for ds in dss:
        res = _remove_from(ds, doomed, request, rewritten, owned_roots, new_fp)
        new_fp[ds.url] = fingerprint(ds.manifest())
        results.append(res)
    for ds in dss:
        if ds.exists(PLAN_DIR, JOURNAL):
            ds.fs.rm(ds.path(PLAN_DIR, JOURNAL))
    return results


def resolve(dss: Iterable[Dataset], request: Request) -> set[str]:
    """The uids the request names, found in any of the datasets (kept or rejected rows)."""
    doomed = set(request.uids)
    if not (request.urls or request.domains or request.sha256):
        return doomed
    cols = [schema.UID, schema.URL, schema.SHA256, schema.ORIGINAL_SHA256]
    for ds in dss:
        for table in _all_tables(ds, cols):
            names = table.column_names
            mask = pa.array([False] * table.num_rows, pa.bool_())
            if schema.URL in names and request.urls:
                mask = pc.or_(mask, pc.is_in(table.column(schema.URL), pa.array(sorted(request.urls))))
            if schema.URL in names and request.domains:
                hosts = [_host(u) for u in table.column(schema.URL).to_pylist()]
                mask = pc.or_(mask, pa.array([h is not None and _domain_hit(h, request.domains) for h in hosts],
                                              pa.bool_()))
            for col in (schema.SHA256, schema.ORIGINAL_SHA256):
                if col in names and request.sha256:
                    mask = pc.or_(mask, pc.fill_null(
                        pc.is_in(pc.utf8_lower(table.column(col)), pa.array(sorted(request.sha256))), False))
            doomed.update(table.filter(mask).column(schema.UID).to_pylist())
    return doomed


def _host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return (urlsplit(url).hostname or "").lower().rstrip(".") or None
    except ValueError:
        return None


def _domain_hit(host: str, domains: frozenset[str]) -> bool:
    parts = host.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts)))


def _all_tables(ds: Dataset, columns: list[str]) -> Iterable[pa.Table]:
    for _, t in ds.iter_shards(columns):
        yield t
    for _, t in ds.iter_rejects(columns):
        yield t


def _lineage_order(dss: list[Dataset]) -> list[Dataset]:
    """Each dataset after the dataset it read, when both are given (stable otherwise)."""
    by_url = {ds.url: ds for ds in dss}
    done: list[Dataset] = []

    def visit(ds: Dataset, seen: tuple[str, ...] = ()) -> None:
        if ds in done or ds.url in seen:
            return
        parent = by_url.get((ds.manifest().get("input") or {}).get("url", ""))
        if parent is not None and parent is not ds:
            visit(parent, (*seen, ds.url))
        done.append(ds)

    for ds in dss:
        visit(ds)
    return done


# -- one dataset --------------------------------------------------------------------------------
def _remove_from(ds: Dataset, doomed: set[str], request: Request, rewritten: set[str],
                 owned_roots: dict[str, Dataset], new_fp: dict[str, str]) -> dict[str, Any]:
    manifest = ds.manifest()
    owns = ds.owns_images()
    removed_kept = removed_rej = 0
    drops_removed: dict[str, int] = {}
    tars_done: list[str] = []
    elsewhere: set[str] = set()
    moved = 0
    doomed_arr = pa.array(sorted(doomed), pa.string())

    # Which of this dataset's tars will be rewritten: journal them before the first rename.
    if owns:
        plan = []
        for n in ds.shard_ids():
            uids = ds.read_shard(n, [schema.UID]).column(schema.UID)
            if pc.any(pc.is_in(uids, doomed_arr)).as_py():
                plan.append(ds.tar_url(n))
        if plan:
            ds.write_json({"tars": plan, "created": _now()}, PLAN_DIR, JOURNAL)
            rewritten |= set(plan)

    members_cache: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for n in ds.shard_ids():
        kept = ds.read_shard(n)
        rej = ds.read_rejects(n) if ds.fs.exists(ds.shard_path(n, "rejects.parquet")) else None
        k_hit = pc.is_in(kept.column(schema.UID), doomed_arr)
        r_hit = pc.is_in(rej.column(schema.UID), doomed_arr) if rej is not None else None
        n_k = pc.sum(k_hit).as_py() or 0
        n_r = (pc.sum(r_hit).as_py() or 0) if r_hit is not None else 0
        own_tar = ds.tar_url(n) if owns and ds.fs.exists(ds.shard_path(n, "tar")) else None
        touches_rewritten = any(_points_into(t, rewritten) for t in (kept, rej) if t is not None)
        dup_hit = any(_mentions_dup(t, doomed_arr) for t in (kept, rej) if t is not None)
        if not (n_k or n_r or touches_rewritten or dup_hit):
            continue
        staged: list[tuple[str, str]] = []
        stats = ds.stats(n)
        gone_reasons: dict[str, int] = {}
        gone = kept.slice(0, 0)
        if n_k:
            gone = kept.filter(k_hit)
            elsewhere |= _foreign_tars(gone, own_tar, rewritten, owned_roots)
            kept = kept.filter(pc.invert(k_hit))
        if n_r:
            gone_rej = rej.filter(r_hit)
            elsewhere |= _foreign_tars(gone_rej, own_tar, rewritten, owned_roots)
            gone_reasons = _reasons(gone_rej)
            for reason, c in gone_reasons.items():
                drops_removed[reason] = drops_removed.get(reason, 0) + c
            rej = rej.filter(pc.invert(r_hit))
        if own_tar is not None and own_tar in rewritten:
            keep_keys = set(kept.column(schema.KEY).to_pylist()) if schema.KEY in kept.column_names else None
            tar_tmp, idx_tmp, tar_bytes, changed = _rewrite_tar(ds, n, keep_keys)
            if changed:
                staged += [(tar_tmp, ds.shard_path(n, "tar")), (idx_tmp, ds.shard_path(n, "idx"))]
                members_cache[own_tar] = _members_of_file(ds.fs, tar_tmp)
                stats["tar_bytes"] = tar_bytes
                tars_done.append(own_tar)
        elif n_k and ds.fs.exists(ds.shard_path(n, "idx")):
            # Adopted tars are not ours to write, but our index of their kept samples is (import).
            idx_tmp = _drop_from_index(ds, n, gone)
            if idx_tmp:
                staged.append((idx_tmp, ds.shard_path(n, "idx")))
        before = (kept, rej)
        kept = _repoint(kept, rewritten, members_cache)
        rej = _repoint(rej, rewritten, members_cache) if rej is not None else None
        moved += sum(_moved(a, b) for a, b in zip(before, (kept, rej), strict=True) if a is not None)
        kept, rej = _clear_dup_of(kept, doomed_arr), (_clear_dup_of(rej, doomed_arr) if rej is not None else None)
        staged.append((_stage_parquet(ds, kept, ds.shard_path(n, "parquet")), ds.shard_path(n, "parquet")))
        if rej is not None:
            p = ds.shard_path(n, "rejects.parquet")
            staged.append((_stage_parquet(ds, rej, p), p))
        for tmp, final in staged:
            ds.rename(tmp, final)
        if n_k or n_r:
            stats["rows_out"] = kept.num_rows
            stats["rejected"] = rej.num_rows if rej is not None else 0
            stats["rows_in"] = stats["rows_in"] - n_k - n_r
            drops = dict(stats.get("drops", {}))
            for reason, c in gone_reasons.items():
                drops[reason] = drops.get(reason, 0) - c
            drops = {k: v for k, v in drops.items() if v > 0}
            stats["drops"] = drops
            stats["removed"] = stats.get("removed", 0) + n_k + n_r
        ds.write_json(stats, SHARDS, f"{ds.shard_name(n)}.stats.json")  # the commit marker, last
        removed_kept += n_k
        removed_rej += n_r

    plan_rows = _clean_plan(ds, doomed_arr)
    _clean_npy_embeddings(ds, doomed_arr)
    leftovers = _plan_text_mentions(ds, doomed)
    _rewrite_manifest(ds, manifest, request, removed_kept, removed_rej, drops_removed, tars_done,
                      sorted(elsewhere), plan_rows, leftovers, new_fp)
    note = None
    if elsewhere:
        note = (f"bytes of removed samples remain in {len(elsewhere)} tar(s) not rewritten here "
                f"(adopted source tars or a dataset not given), e.g. {sorted(elsewhere)[0]}")
    if leftovers:
        note = (note + "; " if note else "") + f"uids still mentioned in {', '.join(leftovers)}"
    return {"dataset": ds.url, "removed": removed_kept + removed_rej, "removed_kept": removed_kept,
            "removed_rejected": removed_rej, "tar_rewritten": len(tars_done), "pointers_moved": moved,
            "plan_rows_removed": plan_rows, "bytes_remain_in": sorted(elsewhere), "note": note}


def _reasons(table: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in table.column(schema.DROP_REASON).to_pylist():
        out[r] = out.get(r, 0) + 1
    return out


def _foreign_tars(table: pa.Table, own_tar: str | None, rewritten: set[str],
                  owned_roots: dict[str, Dataset]) -> set[str]:
    """Tars that hold bytes of these (removed) rows and that this call does not rewrite."""
    if schema.IMAGE_TAR not in table.column_names:
        return set()
    out = set()
    for t in table.column(schema.IMAGE_TAR).to_pylist():
        if t is None or t == own_tar or t in rewritten:
            continue
        if any(t.startswith(ds.url.rstrip("/") + "/") for ds in owned_roots.values()):
            continue  # owned by a dataset given in this call: its own pass rewrites it
        out.add(t)
    return out


def _points_into(table: pa.Table, tars: set[str]) -> bool:
    if not tars or schema.IMAGE_TAR not in table.column_names or table.num_rows == 0:
        return False
    col = table.column(schema.IMAGE_TAR).cast(pa.string())
    return bool(pc.any(pc.is_in(col, pa.array(sorted(tars)))).as_py())


def _mentions_dup(table: pa.Table, doomed: pa.Array) -> bool:
    return schema.DUP_OF in table.column_names and bool(
        pc.any(pc.fill_null(pc.is_in(table.column(schema.DUP_OF), doomed), False)).as_py())


def _clear_dup_of(table: pa.Table, doomed: pa.Array) -> pa.Table:
    """A kept duplicate's representative was removed: its ``dup_of`` no longer names anything."""
    if not _mentions_dup(table, doomed):
        return table
    col = table.column(schema.DUP_OF)
    hit = pc.fill_null(pc.is_in(col, doomed), False)
    cleared = pc.if_else(hit, pa.scalar(None, col.type), col)
    return table.set_column(table.column_names.index(schema.DUP_OF), table.schema.field(schema.DUP_OF), cleared)


def _moved(a: pa.Table, b: pa.Table) -> int:
    if schema.IMAGE_OFFSET not in a.column_names or a.num_rows != b.num_rows:
        return 0
    return int(pc.sum(pc.not_equal(a.column(schema.IMAGE_OFFSET), b.column(schema.IMAGE_OFFSET))).as_py() or 0)


def _stage_parquet(ds: Dataset, table: pa.Table, final: str) -> str:
    tmp = tmp_name(final)
    write_parquet(schema.conform(table), tmp, ds.fs)
    return tmp


# -- tars ---------------------------------------------------------------------------------------
def _rewrite_tar(ds: Dataset, n: int, keep_keys: set[str] | None) -> tuple[str, str, int, bool]:
    """Copy the shard's tar without the samples whose key is not kept; headers and data verbatim.

    Returns (tmp tar, tmp idx, new size, whether anything was dropped)."""
    if keep_keys is None:
        raise RemovalError(f"{ds.url}: shard {ds.shard_name(n)} has no {schema.KEY} column; cannot "
                           "tell which tar members belong to which row")
    path = ds.shard_path(n, "tar")
    size = ds.fs.size(path)
    scan = TarScan()
    with ds.fs.open(path, "rb") as f:
        members = list(iter_tar(f, size, scan))
    if scan.truncated:
        raise RemovalError(f"{ds.tar_url(n)} is damaged ({scan.error}); run `curate verify` first")
    groups: list[tuple[str, list[Any]]] = []
    for m in members:
        if m.type not in (b"0", b"\0"):
            raise RemovalError(f"{ds.tar_url(n)}: member {m.name!r} is not a regular file; not written by curate")
        key, _ = split_name(m.name)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(m)
        else:
            groups.append((key, [m]))
    if all(key in keep_keys for key, _ in groups):
        return "", "", size, False
    tar_tmp, idx_tmp = tmp_name(path), tmp_name(ds.shard_path(n, "idx"))
    samples = []
    pos = 0
    with ds.fs.open(path, "rb") as src, ds.fs.open(tar_tmp, "wb") as dst:
        for key, ms in groups:
            if key not in keep_keys:
                continue
            entry = []
            for m in ms:
                start = m.offset - 512  # ustar: one header block right before the data
                length = 512 + m.size + (-m.size) % 512
                src.seek(start)
                remaining = length
                while remaining:
                    chunk = src.read(min(_COPY_CHUNK, remaining))
                    if not chunk:
                        raise RemovalError(f"{ds.tar_url(n)}: short read at {start}")
                    dst.write(chunk)
                    remaining -= len(chunk)
                entry.append((split_name(m.name)[1], pos + 512, m.size, m.name))
                pos += length
            samples.append(entry)
        dst.write(b"\0" * 1024)
        pos += 1024
    with ds.fs.open(idx_tmp, "wb") as f:
        f.write(index_text(samples).encode())
    return tar_tmp, idx_tmp, pos, True


def _drop_from_index(ds: Dataset, n: int, gone: pa.Table) -> str | None:
    """Stage a copy of the shard's DALI index without the samples holding the removed rows' images."""
    if schema.IMAGE_OFFSET not in gone.column_names:
        return None
    offsets = {o for o in gone.column(schema.IMAGE_OFFSET).to_pylist() if o is not None}
    path = ds.shard_path(n, "idx")
    with ds.fs.open(path, "rb") as f:
        lines = f.read().decode().splitlines()
    version = lines[0].split()[0]
    entries = [ln for ln in lines[1:] if ln.strip()]
    keep = [ln for ln in entries if not any(int(x) in offsets for x in ln.split()[1::4])]
    if len(keep) == len(entries):
        return None
    tmp = tmp_name(path)
    with ds.fs.open(tmp, "wb") as f:
        f.write(("\n".join([f"{version} {len(keep)}", *keep]) + "\n").encode())
    return tmp


def _members_of_file(fs, path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> ext -> (data offset, size) of a tar's members."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    with fs.open(path, "rb") as f:
        for m in iter_tar(f, fs.size(path)):
            key, ext = split_name(m.name)
            out.setdefault(key, {})[ext] = (m.offset, m.size)
    return out


def _repoint(table: pa.Table, rewritten: set[str], cache: dict[str, dict[str, dict[str, tuple[int, int]]]]
             ) -> pa.Table:
    """Recompute ``image_offset`` of rows pointing into a rewritten tar from that tar's members."""
    if not _points_into(table, rewritten):
        return table
    if schema.KEY not in table.column_names:
        raise RemovalError("rows point into a rewritten tar but carry no key column to find their bytes")
    tars = table.column(schema.IMAGE_TAR).to_pylist()
    keys = table.column(schema.KEY).to_pylist()
    offsets = table.column(schema.IMAGE_OFFSET).to_pylist()
    lengths = table.column(schema.IMAGE_LENGTH).to_pylist()
    fmts = (table.column(schema.IMAGE_FORMAT).to_pylist() if schema.IMAGE_FORMAT in table.column_names
            else [None] * table.num_rows)
    new = list(offsets)
    for i, t in enumerate(tars):
        if t not in rewritten:
            continue
        if t not in cache:
            from curate.dataset import url_to_fs

            fs, p = url_to_fs(t)
            cache[t] = _members_of_file(fs, p)
        found = cache[t].get(keys[i])
        if not found:
            raise RemovalError(f"row {keys[i]} points into {t}, which has no member with that key")
        if fmts[i] and fmts[i] in found:
            new[i] = found[fmts[i]][0]
        else:
            hits = [off for ext, (off, size) in found.items()
                    if size == lengths[i] and ext not in ("txt", "json")]
            if len(hits) != 1:
                raise RemovalError(f"row {keys[i]}: cannot tell which member of {t} holds its image")
            new[i] = hits[0]
    idx = table.column_names.index(schema.IMAGE_OFFSET)
    return table.set_column(idx, table.schema.field(idx), pa.array(new, table.schema.field(idx).type))


# -- _plan and manifest -------------------------------------------------------------------------
def _clean_plan(ds: Dataset, doomed: pa.Array) -> int:
    """Drop rows of removed uids from Parquet decision tables under _plan/; clear dup_of links."""
    dropped = 0
    try:
        files = [p for p in ds.fs.find(ds.path(PLAN_DIR)) if p.endswith(".parquet")]
    except FileNotFoundError:
        return 0
    for p in files:
        table = pq.read_table(p, filesystem=ds.fs)
        if schema.UID not in table.column_names and schema.DUP_OF not in table.column_names:
            continue
        out = table
        if schema.UID in table.column_names:
            out = out.filter(pc.invert(pc.fill_null(pc.is_in(out.column(schema.UID), doomed), False)))
        out = _clear_dup_of(out, doomed)
        if out.num_rows == table.num_rows and out.equals(table):
            continue
        dropped += table.num_rows - out.num_rows
        tmp = tmp_name(p)
        md = pq.read_metadata(p, filesystem=ds.fs)
        with ds.fs.open(tmp, "wb") as f:
            # Plan parts may be read by row group (export): keep their row-group layout.
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            _write_like(out, table, sizes, doomed, f)
        ds.rename(tmp, p)
    return dropped


def _write_like(out: pa.Table, original: pa.Table, group_sizes: list[int], doomed: pa.Array, f) -> None:
    """Write ``out`` keeping one row group per original row group (minus removed rows)."""
    with pq.ParquetWriter(f, out.schema, compression="zstd", write_statistics=True) as w:
        start = 0
        for size in group_sizes or [original.num_rows]:
            part = original.slice(start, size)
            start += size
            if schema.UID in part.column_names:
                part = part.filter(pc.invert(pc.fill_null(pc.is_in(part.column(schema.UID), doomed), False)))
            part = _clear_dup_of(part, doomed)
            w.write_table(part.cast(out.schema), row_group_size=max(1, part.num_rows))


def _clean_npy_embeddings(ds: Dataset, doomed: pa.Array) -> int:
    """clip's clip-retrieval-style export (``embeddings/{img_emb,text_emb}/*.npy`` row-aligned with
    ``embeddings/metadata/*.parquet``): drop the removed rows from all three, renamed together."""
    import io

    import numpy as np

    meta_dir = ds.path("embeddings", "metadata")
    try:
        metas = sorted(p for p in ds.fs.ls(meta_dir, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return 0
    removed = 0
    for meta in metas:
        table = pq.read_table(meta, filesystem=ds.fs)
        if schema.UID not in table.column_names:
            continue
        hit = pc.fill_null(pc.is_in(table.column(schema.UID), doomed), False)
        if not pc.any(hit).as_py():
            continue
        keep = pc.invert(hit)
        name = posixpath.basename(meta)[len("metadata_"):-len(".parquet")]
        staged = [(_stage_parquet(ds, table.filter(keep), meta), meta)]
        for folder in ("img_emb", "text_emb"):
            path = ds.path("embeddings", folder, f"{folder}_{name}.npy")
            if not ds.fs.exists(path):
                continue
            with ds.fs.open(path, "rb") as f:
                arr = np.load(io.BytesIO(f.read()))
            if len(arr) != table.num_rows:
                raise RemovalError(f"{path} has {len(arr)} rows but its metadata has {table.num_rows}")
            buf = io.BytesIO()
            np.save(buf, arr[keep.to_numpy(zero_copy_only=False)])
            tmp = tmp_name(path)
            with ds.fs.open(tmp, "wb") as f:
                f.write(buf.getvalue())
            staged.append((tmp, path))
        for tmp, final in staged:
            ds.rename(tmp, final)
        removed += int(pc.sum(hit).as_py())
    return removed


def _plan_text_mentions(ds: Dataset, doomed: set[str]) -> list[str]:
    """Text files under _plan/ that still mention a removed uid (we do not edit formats we do not own)."""
    if not doomed:
        return []
    found = []
    try:
        files = ds.fs.find(ds.path(PLAN_DIR))
    except FileNotFoundError:
        return []
    for p in files:
        if p.endswith(_TEXT_PLAN_EXT) and not p.endswith(JOURNAL):
            with ds.fs.open(p, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            if any(u in text for u in doomed):
                found.append(posixpath.relpath(p, ds.root))
    return found


def _rewrite_manifest(ds: Dataset, manifest: dict[str, Any], request: Request, removed_kept: int,
                      removed_rej: int, drops_removed: dict[str, int], tars: list[str],
                      elsewhere: list[str], plan_rows: int, leftovers: list[str],
                      new_fp: dict[str, str]) -> None:
    m = dict(manifest)
    shards = []
    sizes = {}
    totals = dict(m["totals"])
    for entry in m["shards"]:
        n = int(entry["shard"])
        s = ds.stats(n)
        entry = {**entry, "rows": s["rows_out"], "rejected": s["rejected"],
                 "parquet_bytes": ds.fs.size(ds.shard_path(n, "parquet")), "tar_bytes": s.get("tar_bytes", 0)}
        shards.append(entry)
        if m.get("owns_images"):
            sizes[f"{entry['shard']}.tar"] = s["rows_out"]
    totals["rows_in"] = totals["rows_in"] - removed_kept - removed_rej
    totals["kept"] = totals["kept"] - removed_kept
    totals["dropped"] = totals["dropped"] - removed_rej
    drops = dict(totals.get("drops", {}))
    for reason, c in drops_removed.items():
        drops[reason] = drops.get(reason, 0) - c
    totals["drops"] = {k: v for k, v in sorted(drops.items()) if v > 0}
    totals["tar_bytes"] = sum(e["tar_bytes"] for e in shards)
    m["shards"], m["totals"] = shards, totals
    # The input was amended in the same call: record its new fingerprint, so a pipeline rerun
    # still recognises this output as made from that input.
    inp = m.get("input") or {}
    if inp.get("url") in new_fp and "manifest" in inp:
        inp = {**inp, "manifest": new_fp[inp["url"]]}
        m["input"] = inp
        m["run"] = {**m.get("run", {}), "input": inp}
        if ds.read_json(PLAN_DIR, "run.json") is not None:
            ds.write_json(m["run"], PLAN_DIR, "run.json")
    record = {"time": _now(), "count": removed_kept + removed_rej, "kept_rows": removed_kept,
              "rejected_rows": removed_rej, "by": request.by or _user(), "reason": request.reason,
              "request": {"kind": request.kind, "entries": request.size}, "tars_rewritten": tars,
              "plan_rows_removed": plan_rows}
    if elsewhere:
        record["bytes_remain_in"] = elsewhere
        record["note"] = "these tars were not rewritten (adopted source tars or datasets not given)"
    if leftovers:
        record["uids_still_in"] = leftovers
    m["removals"] = [*m.get("removals", []), record]
    if m.get("owns_images"):
        ds.write_json(sizes, SHARDS, "sizes.json")
    ds.write_json(m, MANIFEST)
    ds.refresh()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

