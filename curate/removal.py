"""Removal requests: make listed samples disappear from every dataset given, without breaking others.

``curate remove --uids FILE DATASET...`` (or ``--urls`` / ``--domains`` / ``--sha256``):

1. The request is resolved to a set of uids by scanning every given dataset (kept and rejected
   rows), so a URL matched in one dataset removes that sample from all of them.
2. Per dataset (a dataset before those made from it), per affected shard, one
   :meth:`Dataset.rewrite_shard`: the kept and rejected Parquet lose the removed rows, ``dup_of``
   values naming a removed uid are cleared, and where the dataset owns the shard's tar the removed
   samples' members are blanked in place: their headers and bytes are overwritten by one PAX global
   header of the same length (a comment of zeros), which every tar reader skips. Offsets of every
   other member stay where they were, so no pointer into the tar breaks, in datasets given here or
   not; the DALI ``.idx`` loses the samples. The shard's stats are recounted from its new rows.
3. Parquet decision tables under ``_plan/`` lose the removed rows; clip's clip-retrieval-style
   files (``embeddings/*/*.npy`` + ``embeddings/metadata``) lose them too. Near-duplicates of a
   removed sample stay rejected (only exact copies share its sha256: ask by ``--sha256`` to remove
   those too).
4. The removal record goes to ``_plan/removals.json``, then ``sizes.json`` and the manifest are
   rebuilt from the shards' stats. Downstream manifests given in the same call record their input's
   new manifest fingerprint, so rerunning the pipeline still skips them.

Adopted (imported) tars are never written: there removal drops the rows and the record says which
source tars still hold the bytes, as it does whenever the dataset owning a tar was not given.
The removed uids themselves are never written anywhere (records hold counts only).

Interrupted? Run the same command again: shard rewrites are finished or redone, a journal under
``_plan/`` keeps the totals from before the first attempt, so the record counts every removed row
once, and stats and totals are recounted from the files.
"""

from __future__ import annotations

import dataclasses
import getpass
import io
import logging
import posixpath
import tarfile
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema
from curate.config import fingerprint
from curate.dataset import MANIFEST, PLAN_DIR, REMOVALS_FILE, RUN_FILE, TMP_MARK, Dataset, new_attempt
from curate.wds import BLOCK, FIXED_MTIME, TarScan, index_text, iter_tar, split_name

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
        ds.recover()  # shard rewrites an interrupted call left half done
    dss = _lineage_order(dss)
    doomed = resolve(dss, request)
    owned_roots = {ds.root: ds for ds in dss if ds.owns_images()}
    # Journals of every dataset first and dropped last: a rerun after a kill anywhere replaces this
    # call's records instead of adding empty ones for the datasets it had already finished.
    earlier = [ds.read_json(PLAN_DIR, JOURNAL) or {} for ds in dss]
    call = next((j["call"] for j in earlier if "call" in j), uuid.uuid4().hex)
    journals = [_journal(ds, request, call) for ds in dss]
    new_fp: dict[str, str] = {}
    results = []
    for ds, journal in zip(dss, journals, strict=True):
        res = _remove_from(ds, doomed, owned_roots, journal)
        _finish(ds, journal, res, new_fp)
        new_fp[ds.url] = fingerprint(ds.manifest())
        results.append(res)
    for ds in dss:
        ds.delete(ds.path(PLAN_DIR, JOURNAL))
        ds.sweep_tmp()  # what an interrupted call left staged and never used
    return results


def _journal(ds: Dataset, request: Request, call: str) -> dict[str, Any]:
    """This call's entry under ``_plan/``: written before the first change, kept until every dataset
    of the call is done, so a rerun after a kill counts from the totals the dataset had before.
    ``finished``: a rerun found this dataset already done by the interrupted call."""
    journal = ds.read_json(PLAN_DIR, JOURNAL)
    if journal is None:
        totals = ds.manifest()["totals"]
        before = {k: totals[k] for k in ("rows_in", "kept", "dropped")}
        before["removed"] = {ds.shard_name(n): ds.stats(n).get("removed", 0) for n in ds.shard_ids()}
        before["plan_rows"] = _plan_rows(ds)
        journal = {"id": uuid.uuid4().hex, "call": call, "time": _now(), "before": before, "elsewhere": [],
                   "finished": any(r.get("call") == call for r in ds.removals())}
    journal["request"] = {"kind": request.kind, "entries": request.size, "reason": request.reason,
                          "by": request.by or _user()}
    ds.write_json(journal, PLAN_DIR, JOURNAL)
    return journal


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
        parent = ds.parent()
        if parent is not None and by_url.get(parent.url, ds) is not ds:
            visit(by_url[parent.url], (*seen, ds.url))
        done.append(ds)

    for ds in dss:
        visit(ds)
    return done


# -- one dataset --------------------------------------------------------------------------------
def _remove_from(ds: Dataset, doomed: set[str], owned_roots: dict[str, Dataset],
                 journal: dict[str, Any]) -> dict[str, Any]:
    doomed_arr = pa.array(sorted(doomed), pa.string())
    res: dict[str, Any] = {"dataset": ds.url, "removed_kept": 0, "removed_rejected": 0,
                           "elsewhere": set(journal["elsewhere"])}
    for n in ds.shard_ids():
        _remove_from_shard(ds, n, doomed_arr, owned_roots, res, journal)
    res["plan_rows_removed"] = _clean_plan(ds, doomed_arr)
    _clean_npy_embeddings(ds, doomed_arr)
    res["leftovers"] = _plan_text_mentions(ds, doomed)
    return res


def _remove_from_shard(ds: Dataset, n: int, doomed: pa.Array, owned_roots: dict[str, Dataset],
                       res: dict[str, Any], journal: dict[str, Any]) -> None:
    """Rewrite shard ``n`` without the doomed rows (and their tar members), if it holds any."""
    kept = ds.read_shard(n)
    rej = ds.read_rejects(n) if ds.fs.exists(ds.shard_path(n, "rejects.parquet")) else None
    k_hit = pc.fill_null(pc.is_in(kept.column(schema.UID), doomed), False)
    r_hit = pc.fill_null(pc.is_in(rej.column(schema.UID), doomed), False) if rej is not None else None
    n_k = pc.sum(k_hit).as_py() or 0
    n_r = (pc.sum(r_hit).as_py() or 0) if r_hit is not None else 0
    if not (n_k or n_r or any(_mentions_dup(t, doomed) for t in (kept, rej) if t is not None)):
        return
    own_tar = ds.tar_url(n) if ds.owns_images() and ds.fs.exists(ds.shard_path(n, "tar")) else None
    gone = [kept.filter(k_hit)] + ([rej.filter(r_hit)] if n_r else [])
    for t in gone:
        res["elsewhere"] |= _foreign_tars(t, own_tar, owned_roots)
    if len(res["elsewhere"]) > len(journal["elsewhere"]):
        # journaled before the shard's rewrite lands: a rerun after a kill finds these rows gone
        journal["elsewhere"] = sorted(res["elsewhere"])
        ds.write_json(journal, PLAN_DIR, JOURNAL)
    kept = _clear_dup_of(kept.filter(pc.invert(k_hit)), doomed)
    rej = _clear_dup_of(rej.filter(pc.invert(r_hit)), doomed) if rej is not None else kept.slice(0, 0)
    attempt = new_attempt()
    tar_tmp, idx_text = None, None
    if own_tar is not None and n_k + n_r:
        tar_tmp, idx_text = _blank_tar(ds, n, set(kept.column(schema.KEY).to_pylist())
                                       if schema.KEY in kept.column_names else None, attempt)
    elif n_k and ds.fs.exists(ds.shard_path(n, "idx")):
        # Adopted tars are not ours to write, but our index of their kept samples is (import).
        idx_text = _drop_from_index(ds, n, gone[0])
    update = {"removed": ds.stats(n).get("removed", 0) + n_k + n_r} if n_k + n_r else {}
    update.update(_altered_without(ds.stats(n).get("altered"), doomed))
    ds.rewrite_shard(n, schema.conform(kept), schema.conform(rej), update, tar_tmp=tar_tmp, idx_text=idx_text,
                     attempt=attempt)
    res["removed_kept"] += n_k
    res["removed_rejected"] += n_r


def _altered_without(altered: dict[str, Any] | None, doomed: pa.Array) -> dict[str, Any]:
    """The stats' list of rows whose bytes a stage changed (export's face blurring) without the
    removed uids: a stats update, empty when none of them was listed (None drops an emptied list)."""
    if not altered or not altered.get("uids"):
        return {}
    uids = pa.array(altered["uids"], pa.string())
    left = uids.filter(pc.invert(pc.is_in(uids, doomed))).to_pylist()
    if len(left) == len(uids):
        return {}
    return {"altered": {**altered, "rows": len(left), "uids": left} if left else None}


def _foreign_tars(table: pa.Table, own_tar: str | None, owned_roots: dict[str, Dataset]) -> set[str]:
    """Tars that hold bytes of these (removed) rows and that this call does not blank."""
    if schema.IMAGE_TAR not in table.column_names:
        return set()
    out = set()
    for t in table.column(schema.IMAGE_TAR).to_pylist():
        if t is None or t == own_tar:
            continue
        if any(t.startswith(ds.url.rstrip("/") + "/") for ds in owned_roots.values()):
            continue  # owned by a dataset given in this call: its own pass rewrites it
        out.add(t)
    return out


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


# -- tars ---------------------------------------------------------------------------------------
def _blank_tar(ds: Dataset, n: int, keep_keys: set[str] | None, attempt: str) -> tuple[str | None, str | None]:
    """Stage a copy of the shard's tar in which every sample whose key is not kept is blanked in
    place (one PAX global header of the same length), and its new DALI index.

    Returns (staged tar, index text), or (None, None) when no member needed blanking."""
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
    blank = [(ms[0].offset - BLOCK, ms[-1].offset + ms[-1].size + (-ms[-1].size) % BLOCK)
             for key, ms in groups if key not in keep_keys]
    if not blank:
        return None, None
    kept = [[(split_name(m.name)[1], m.offset, m.size, m.name) for m in ms] for key, ms in groups if key in keep_keys]
    # Tar readers expect a member after a PAX header: past the last kept member the tar just ends.
    last = max((e[-1][1] + e[-1][2] + (-e[-1][2]) % BLOCK for e in kept), default=0)
    blank = [(start, end) for start, end in blank if end <= last]

    def fill(dst: Any) -> None:
        with ds.fs.open(path, "rb") as src:
            pos = 0
            for start, end in [*blank, (last, last)]:
                _copy(src, dst, pos, start - pos, ds.tar_url(n))
                if end > start:
                    dst.write(_blank_region(end - start))
                pos = end
        dst.write(b"\0" * (2 * BLOCK))

    tar_tmp = ds.stage_file(path, fill, attempt)
    return tar_tmp, index_text(kept)


def _blank_region(length: int) -> bytes:
    """``length`` bytes (a multiple of 512, at least 1024) of tar that every reader skips: a PAX
    global header whose one record is a comment of zeros."""
    size = length - BLOCK
    record = f"{size} comment={'0' * (size - len(str(size)) - len(' comment=') - 1)}\n".encode()
    info = tarfile.TarInfo("pax_global_header")
    info.type, info.size, info.mtime, info.mode = tarfile.XGLTYPE, size, FIXED_MTIME, 0o644
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT) + record


def _copy(src: Any, dst: Any, start: int, length: int, where: str) -> None:
    src.seek(start)
    while length > 0:
        chunk = src.read(min(_COPY_CHUNK, length))
        if not chunk:
            raise RemovalError(f"{where}: short read at {start}")
        dst.write(chunk)
        length -= len(chunk)


def _drop_from_index(ds: Dataset, n: int, gone: pa.Table) -> str | None:
    """The shard's DALI index without the samples holding the removed rows' images (None: unchanged)."""
    if schema.IMAGE_OFFSET not in gone.column_names:
        return None
    offsets = {o for o in gone.column(schema.IMAGE_OFFSET).to_pylist() if o is not None}
    with ds.fs.open(ds.shard_path(n, "idx"), "rb") as f:
        lines = f.read().decode().splitlines()
    version = lines[0].split()[0]
    entries = [ln for ln in lines[1:] if ln.strip()]
    keep = [ln for ln in entries if not any(int(x) in offsets for x in ln.split()[1::4])]
    if len(keep) == len(entries):
        return None
    return "\n".join([f"{version} {len(keep)}", *keep]) + "\n"


# -- _plan and manifest -------------------------------------------------------------------------
def _clean_plan(ds: Dataset, doomed: pa.Array) -> int:
    """Drop rows of removed uids from Parquet decision tables under _plan/; clear dup_of links."""
    dropped = 0
    try:
        files = [p for p in ds.fs.find(ds.path(PLAN_DIR)) if p.endswith(".parquet") and TMP_MARK not in p]
    except FileNotFoundError:
        return 0
    for p in files:
        table = pq.read_table(p, filesystem=ds.fs)
        if schema.UID not in table.column_names and schema.DUP_OF not in table.column_names:
            continue
        keep = (pc.invert(pc.fill_null(pc.is_in(table.column(schema.UID), doomed), False))
                if schema.UID in table.column_names else pa.array([True] * table.num_rows))
        out = _clear_dup_of(table.filter(keep), doomed)
        if out.num_rows == table.num_rows and out.equals(table):
            continue
        dropped += table.num_rows - out.num_rows
        # Plan parts may be read by row group (export): keep one row group per original one.
        md = pq.read_metadata(p, filesystem=ds.fs)
        sizes, start = [], 0
        for g in range(md.num_row_groups):
            rows = md.row_group(g).num_rows
            sizes.append(pc.sum(keep.slice(start, rows)).as_py() or 0)
            start += rows
        ds.write_table(out, posixpath.relpath(p, ds.root), row_group_sizes=sizes or None)
    return dropped


def _plan_rows(ds: Dataset) -> int:
    """Rows of the Parquet decision tables under _plan/ that carry uids (from their footers)."""
    try:
        files = [p for p in ds.fs.find(ds.path(PLAN_DIR)) if p.endswith(".parquet") and TMP_MARK not in p]
    except FileNotFoundError:
        return 0
    rows = 0
    for p in files:
        md = pq.read_metadata(p, filesystem=ds.fs)
        if schema.UID in md.schema.names:
            rows += md.num_rows
    return rows


def _clean_npy_embeddings(ds: Dataset, doomed: pa.Array) -> int:
    """clip's clip-retrieval-style export (``embeddings/{img_emb,text_emb}/*.npy`` row-aligned with
    ``embeddings/metadata/*.parquet``): drop the removed rows from all three. The arrays go first and
    the metadata last, so a rerun after a kill still finds the rows to drop by the metadata."""
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
        for folder in ("img_emb", "text_emb"):
            parts = ("embeddings", folder, f"{folder}_{name}.npy")
            if not ds.exists(*parts):
                continue
            with ds.fs.open(ds.path(*parts), "rb") as f:
                arr = np.load(io.BytesIO(f.read()))
            if len(arr) == table.num_rows - int(pc.sum(hit).as_py()):
                continue  # already done by an interrupted call
            if len(arr) != table.num_rows:
                raise RemovalError(f"{ds.path(*parts)} has {len(arr)} rows but its metadata has {table.num_rows}")
            buf = io.BytesIO()
            np.save(buf, arr[keep.to_numpy(zero_copy_only=False)])
            ds.write_bytes(buf.getvalue(), *parts)
        ds.write_table(table.filter(keep), posixpath.relpath(meta, ds.root))
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


def _finish(ds: Dataset, journal: dict[str, Any], res: dict[str, Any], new_fp: dict[str, str]) -> None:
    """Record the removal, rebuild sizes.json and the manifest from the shards' stats, drop the journal."""
    m = {k: v for k, v in ds.manifest().items() if k not in ("shards", "totals", "splits", "altered")}
    # The input was amended in the same call: record its new fingerprint, so a pipeline rerun
    # still recognises this output as made from that input.
    inp = m.get("input") or {}
    if inp.get("url") in new_fp and "manifest" in inp:
        inp = {**inp, "manifest": new_fp[inp["url"]]}
        m["input"] = inp
        m["run"] = {**m.get("run", {}), "input": inp}
        if ds.read_json(PLAN_DIR, RUN_FILE) is not None:
            ds.write_json(m["run"], PLAN_DIR, RUN_FILE)
    manifest = ds.build_manifest(m)
    before, after = journal["before"], manifest["totals"]
    # tars this call blanked: of the shards whose removed count grew since the call began
    tars = [ds.tar_url(n) for n in ds.shard_ids() if m.get("owns_images") and ds.fs.exists(ds.shard_path(n, "tar"))
            and ds.stats(n).get("removed", 0) > before["removed"].get(ds.shard_name(n), 0)]
    record = {"id": journal["id"], "call": journal["call"], "time": journal["time"], "count": before["rows_in"] - after["rows_in"],
              "kept_rows": before["kept"] - after["kept"], "rejected_rows": before["dropped"] - after["dropped"],
              "by": journal["request"]["by"], "reason": journal["request"]["reason"],
              "request": {k: journal["request"][k] for k in ("kind", "entries")},
              "tars_rewritten": sorted(tars), "plan_rows_removed": before["plan_rows"] - _plan_rows(ds)}
    elsewhere = sorted(res["elsewhere"])
    if elsewhere:
        record["bytes_remain_in"] = elsewhere
        record["note"] = "these tars were not rewritten (adopted source tars or datasets not given)"
    if res["leftovers"]:
        record["uids_still_in"] = res["leftovers"]
    records = [r for r in ds.removals() if r.get("id") != journal["id"]]
    if not (journal.get("finished") and not record["count"] and not record["plan_rows_removed"]):
        records.append(record)
    ds.write_json(records, PLAN_DIR, REMOVALS_FILE)
    ds.write_manifest({**manifest, "removals": records})
    note = None
    if elsewhere:
        note = (f"bytes of removed samples remain in {len(elsewhere)} tar(s) not rewritten here "
                f"(adopted source tars or a dataset not given), e.g. {elsewhere[0]}")
    if res["leftovers"]:
        note = (note + "; " if note else "") + f"uids still mentioned in {', '.join(res['leftovers'])}"
    res.update({"removed": res["removed_kept"] + res["removed_rejected"], "tar_rewritten": len(tars),
                "plan_rows_removed": record["plan_rows_removed"],
                "bytes_remain_in": elsewhere, "note": note})
    for k in ("elsewhere", "leftovers"):
        res.pop(k)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

