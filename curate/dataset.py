"""The dataset directory: naming, the one writer of its files, shard commit, manifest, readers.

This module is the only code that knows the on-disk format (docs/ARCHITECTURE.md describes it).
Layout under any fsspec URL::

    _manifest.json            written last; a dataset without it is incomplete
    _plan/                    what a stage's plan step decided (inputs of each shard, decision tables)
    shards/NNNNN.parquet      kept rows           shards/NNNNN.tar + .idx   (datasets that own bytes)
    shards/NNNNN.stats.json   the commit marker   shards/sizes.json          (beside the tars)
                                                  shards/SPLIT-NNNNN.tar     (a dataset cut into splits)
    shards/NNNNN.commit.json  while a shard changes: which attempt's files it takes (claim and journal)
    rejects/NNNNN.parquet     dropped rows with drop_reason

Every file is written under a temporary name private to one attempt and renamed into place. A shard
changes only through :meth:`Dataset.commit_shard` (its first commit) and :meth:`Dataset.rewrite_shard`
(removal, download's retry take-over): both stage every new file first, then publish a commit record
naming the attempt, then rename the staged files into place, the stats file last. Whoever finds a
record whose staged stats file still exists finishes the renames (:meth:`Dataset.recover`), so a
process killed at any instant leaves the shard either as it was or as the record says, never a mix
of two attempts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PLAN_DIR = "_plan"
RUN_FILE = "run.json"  # in the plan folder: the run record (stage, resolved config, input)
PLAN_FILE = "plan.json"  # in the plan folder: the shards the run applies
SHARDS = "shards"
REJECTS = "rejects"
SIZES = "sizes.json"
REMOVALS_FILE = "removals.json"  # in the plan folder: every removal's record, kept across manifests
MIN_SHARD_DIGITS = 5
TMP_MARK = ".tmp-"
STATS_EXT = "stats.json"
RECORD_EXT = "commit.json"
# Order of the renames of a commit: the stats file, the commit marker, always last.
_SHARD_FILES = ("tar", "idx", "parquet", "rejects.parquet", STATS_EXT)


def tmp_name(path: str, attempt: str | None = None) -> str:
    """A temporary name private to one attempt: two attempts at the same shard (a zombie worker of a
    killed driver, a retried task) never write to each other's files."""
    return f"{path}{TMP_MARK}{attempt or uuid.uuid4().hex[:12]}"


def tar_file_name(shard_name: str, split: str | None = None) -> str:
    """``NNNNN.tar``, or ``SPLIT-NNNNN.tar`` for a shard of a named split (see :meth:`Dataset.tar_name`)."""
    return f"{split}-{shard_name}.tar" if split else f"{shard_name}.tar"


def new_attempt() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


class DatasetError(RuntimeError):
    pass


# -- failpoints ---------------------------------------------------------------------------------
# Every change this module makes to storage (write, rename, delete) passes through _step first, so
# the fault-injection tests can stop a process at any one of them: a callback set with
# set_failpoint raises, and CURATE_KILL_AT_STEP=N makes the process SIGKILL itself before its N-th
# step (for runs in a subprocess). Both are off unless a test turns them on.
_failpoint: Callable[[str, str], None] | None = None
_steps = [0]


def set_failpoint(fn: Callable[[str, str], None] | None) -> None:
    """``fn(op, path)`` runs before every storage change of this process; None turns it off."""
    global _failpoint
    _failpoint = fn


def _step(op: str, path: str) -> None:
    _steps[0] += 1
    if _failpoint is not None:
        _failpoint(op, path)
    kill_at = os.environ.get("CURATE_KILL_AT_STEP")
    if kill_at and _steps[0] == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def make_key(shard: int, index: int, shard_digits: int = MIN_SHARD_DIGITS, index_digits: int = 4) -> str:
    """img2dataset-style key: shard digits then index-in-shard digits, digits only."""
    return f"{shard:0{shard_digits}d}{index:0{index_digits}d}"


def digits_for(count: int, minimum: int) -> int:
    """Zero-padding width that fits numbers 0..count-1."""
    return max(minimum, len(str(max(count - 1, 0))))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A location any process can open: a plain absolute path for local files, else protocol://path."""
    if _is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if "://" not in url:
        url = os.path.abspath(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def _durable_default(fs: fsspec.AbstractFileSystem) -> bool:
    """fsync at commit: on for local paths (CURATE_DURABLE=0 turns it off); object stores persist a
    finished upload by themselves."""
    return _is_local(fs) and os.environ.get("CURATE_DURABLE", "1") != "0"


class Dataset:
    """One dataset directory. Cheap to construct; touches storage only when asked."""

    def __init__(self, url: str, durable: bool | None = None):
        self.fs, self.root = url_to_fs(str(url))
        self.url = to_url(self.fs, self.root)
        self.durable = _durable_default(self.fs) if durable is None else durable
        self._manifest: dict[str, Any] | None = None
        self._digits: int | None = None
        self._splits: dict[int, str] | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.url!r})"

    # -- naming -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (for ``self.fs``) of a file inside the dataset."""
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return to_url(self.fs, self.path(*parts))

    @property
    def shard_digits(self) -> int:
        if self._digits is None:
            meta = self.manifest() or self.read_json(PLAN_DIR, PLAN_FILE) or {}
            self._digits = int(meta.get("shard_digits", MIN_SHARD_DIGITS))
        return self._digits

    @shard_digits.setter
    def shard_digits(self, value: int) -> None:
        self._digits = value

    def shard_name(self, n: int) -> str:
        return f"{n:0{self.shard_digits}d}"

    @property
    def splits(self) -> dict[int, str]:
        """The split of each shard whose tar is named by split (export: train, val), as the run's plan
        recorded them (else the manifest, where the plan folder is gone); empty for any other dataset.
        An export made before tars were named by split has a plan without splits: its tars keep
        ``NNNNN.tar`` though its manifest lists splits."""
        if self._splits is None:
            meta = self.read_json(PLAN_DIR, PLAN_FILE) or self.manifest()
            recorded = (meta or {}).get("splits") or {}
            found = {int(s): name for name, info in recorded.items()
                     for s in (info["shards"] if isinstance(info, dict) else info)}
            if meta is None:
                return found  # nothing recorded yet: asked again once the plan is written
            self._splits = found
        return self._splits

    @splits.setter
    def splits(self, value: dict[str, Sequence[int]]) -> None:
        self._splits = {int(s): name for name, ids in value.items() for s in ids}

    def tar_name(self, n: int) -> str:
        """The file name of shard ``n``'s tar. A split's name leads it (``train-00000.tar``,
        ``val-00041.tar``): readers that find splits by file name (HF ``datasets``' folder loading)
        then open the tars alone, and ``sizes.json`` stays beside them for open_clip."""
        return tar_file_name(self.shard_name(n), self.splits.get(n))

    def shard_path(self, n: int, ext: str) -> str:
        if ext == "tar":
            return self.path(SHARDS, self.tar_name(n))
        folder = REJECTS if ext == "rejects.parquet" else SHARDS
        ext = "parquet" if ext == "rejects.parquet" else ext
        return self.path(folder, f"{self.shard_name(n)}.{ext}")

    def tar_url(self, n: int) -> str:
        return to_url(self.fs, self.shard_path(n, "tar"))

    def parent(self) -> Dataset | None:
        """The dataset this one was made from, or None where its input was not a curate dataset (a
        URL list, adopted tars: they hold no manifest)."""
        inp = (self.manifest() or self.read_json(PLAN_DIR, RUN_FILE) or {}).get("input") or {}
        if not inp.get("url") or "files" in inp:
            return None
        try:
            parent = Dataset(inp["url"])
            return parent if parent.is_complete() else None
        except (OSError, ValueError):  # a file, or a location that cannot hold a dataset
            return None

    def lineage(self, limit: int = 64) -> list[Dataset]:
        """This dataset and the complete datasets it was made from, oldest first."""
        chain, seen = [self], {self.url}
        while len(chain) < limit:
            parent = chain[-1].parent()
            if parent is None or parent.url in seen:
                break
            chain.append(parent)
            seen.add(parent.url)
        return chain[::-1]

    # -- the one writer -----------------------------------------------------------------------
    def read_json(self, *parts: str) -> Any | None:
        p = self.path(*parts)
        try:
            with self.fs.open(p, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(_json_bytes(obj), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file atomically: temp name, then rename."""
        self.write_file(lambda f: f.write(data), *parts)

    def write_table(self, table: pa.Table, *parts: str, row_group_sizes: Sequence[int] | None = None) -> None:
        """Write a Parquet file atomically, with the fixed writer options of every table here."""
        self.write_file(lambda f: _write_parquet_to(table, f, row_group_sizes), *parts)

    def write_file(self, fill: Callable[[Any], Any], *parts: str) -> None:
        """``fill(f)`` writes the content to an open binary file; it lands under ``parts`` atomically."""
        final = self.path(*parts)
        tmp = self.stage_file(final, fill)
        self.rename(tmp, final)
        self.sync_dir(posixpath.dirname(final))

    def stage_file(self, final: str, fill: Callable[[Any], Any], attempt: str | None = None) -> str:
        """Write a file under the temporary name of ``final`` for ``attempt``; return that name."""
        tmp = tmp_name(final, attempt)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        _step("write", tmp)
        with self.fs.open(tmp, "wb") as f:
            fill(f)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        return tmp

    def rename(self, src: str, dst: str) -> None:
        _step("rename", dst)
        if _is_local(self.fs):
            os.replace(src, dst)  # atomic on POSIX
        else:
            if not self.fs.exists(src):
                raise FileNotFoundError(src)
            self.fs.mv(src, dst)  # object stores: copy, then delete
            self.fs.invalidate_cache()

    def delete(self, path: str, recursive: bool = False) -> None:
        _step("delete", path)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def sync_path(self, path: str) -> None:
        """fsync a file written by someone else's handle (the tar a stage streamed)."""
        if self.durable:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def sync_dir(self, folder: str) -> None:
        """fsync a directory, so the renames into it survive a power loss."""
        if self.durable and os.path.isdir(folder):
            self.sync_path(folder)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def plan_store(self, sub: str) -> PlanStore:
        """The files a stage keeps under ``_plan/<sub>/`` (ARCHITECTURE §4)."""
        return PlanStore(self, sub)

    # -- state --------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        if self._manifest is None:
            self._manifest = self.read_json(MANIFEST)
        return self._manifest

    def is_complete(self) -> bool:
        return self.manifest() is not None

    def refresh(self) -> None:
        self._manifest = None
        self._digits = None
        self._splits = None
        self._lineage = None  # curate.lineage's cache: a new manifest may name another input
        self.fs.invalidate_cache()

    def shard_ids(self) -> list[int]:
        """Committed shards: those whose stats file exists."""
        out = []
        for name in self._ls(SHARDS):
            base = posixpath.basename(name)
            if base.endswith("." + STATS_EXT) and base.split(".")[0].isdigit():
                out.append(int(base.split(".")[0]))
        return sorted(out)

    def is_committed(self, n: int) -> bool:
        return self.fs.exists(self.shard_path(n, STATS_EXT))

    def stats(self, n: int) -> dict[str, Any]:
        s = self.read_json(SHARDS, f"{self.shard_name(n)}.{STATS_EXT}")
        if s is None:
            raise DatasetError(f"{self.url}: shard {self.shard_name(n)} is not committed")
        return s

    def owns_images(self) -> bool:
        m = self.manifest()
        if m is not None:
            return bool(m.get("owns_images"))
        return any(self.fs.exists(self.shard_path(n, "tar")) for n in self.shard_ids()[:1])

    # -- readers ------------------------------------------------------------------------------
    def read_shard(self, n: int, columns: Sequence[str] | None = None) -> pa.Table:
        return self._read(self.shard_path(n, "parquet"), columns)

    def read_rejects(self, n: int, columns: Sequence[str] | None = None) -> pa.Table:
        return self._read(self.shard_path(n, "rejects.parquet"), columns)

    def read_table(self, *parts: str, columns: Sequence[str] | None = None) -> pa.Table:
        return self._read(self.path(*parts), columns)

    def _read(self, path: str, columns: Sequence[str] | None) -> pa.Table:
        if columns is not None:
            present = set(pq.read_schema(path, filesystem=self.fs).names)
            columns = [c for c in columns if c in present]
        return pq.read_table(path, columns=columns, filesystem=self.fs)

    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
        for n in self.shard_ids():
            yield n, self.read_shard(n, columns)

    def iter_rejects(self, columns: Sequence[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
        for n in self.shard_ids():
            if self.fs.exists(self.shard_path(n, "rejects.parquet")):
                yield n, self.read_rejects(n, columns)

    def schema(self) -> pa.Schema | None:
        ids = self.shard_ids()
        return pq.read_schema(self.shard_path(ids[0], "parquet"), filesystem=self.fs) if ids else None

    def _ls(self, folder: str) -> list[str]:
        try:
            return self.fs.ls(self.path(folder) if folder else self.root, detail=False)
        except FileNotFoundError:
            return []

    # -- shard commit -------------------------------------------------------------------------
    def open_tmp_tar(self, n: int, attempt: str):
        self.fs.makedirs(self.path(SHARDS), exist_ok=True)
        path = tmp_name(self.shard_path(n, "tar"), attempt)
        _step("write", path)
        return self.fs.open(path, "wb")

    def commit_shard(
        self,
        n: int,
        kept: pa.Table,
        rejects: pa.Table,
        stats: dict[str, Any],
        attempt: str | None = None,
        tar_written: bool = False,
        idx_text: str | None = None,
    ) -> dict[str, Any]:
        """First commit of shard ``n``; returns the stats of the committed shard.

        Stages every file under this attempt's temporary names, then claims the shard by creating its
        commit record exclusively. Only the claimant's files are ever renamed into place: an attempt
        that finds the shard claimed (a zombie of a killed run, a Ray retry of a task still running)
        discards its own files and returns the committed shard's stats."""
        attempt = attempt or new_attempt()
        exts = self._stage(n, kept, rejects, stats, attempt, tar_written, idx_text)
        record = {"attempt": attempt, "files": exts}
        won = self._claim(n, record)
        if not won and not self.recover_shard(n) and not self.is_committed(n):
            # a claim whose attempt's files are gone (deleted by hand): it can never finish
            self._drop_record(n, self.read_json(SHARDS, f"{self.shard_name(n)}.{RECORD_EXT}") or {})
            won = self._claim(n, record)
        if not won:
            for ext in exts:
                self.delete(tmp_name(self.shard_path(n, ext), attempt))
            return self.stats(n)
        self._publish(n, record)
        return stats

    def rewrite_shard(self, n: int, kept: pa.Table, rejects: pa.Table, update: dict[str, Any] | None = None,
                      tar_tmp: str | None = None, idx_text: str | None = None,
                      attempt: str | None = None) -> dict[str, Any]:
        """Replace the rows of committed shard ``n`` (and its tar, staged by the caller under
        ``tmp_name(tar path, attempt)``); its stats are recounted from the new rows, then ``update``
        applied. Crash-safe like a first commit: the new record is the journal of the change."""
        self.recover_shard(n)
        attempt = attempt or new_attempt()
        stats = {**self.stats(n), **count_rows(kept, rejects)}
        if tar_tmp is not None:
            stats["tar_bytes"] = self.fs.size(tar_tmp)
        stats.update(update or {})
        exts = self._stage(n, kept, rejects, stats, attempt, tar_tmp is not None, idx_text)
        record = {"attempt": attempt, "files": exts, "rewrite": True}
        self.write_json(record, SHARDS, f"{self.shard_name(n)}.{RECORD_EXT}")
        self._publish(n, record)
        return stats

    def restat(self, n: int, update: dict[str, Any] | None = None) -> dict[str, Any]:
        """Recount shard ``n``'s stats from its Parquet files (after a crash left them apart)."""
        kept = self.read_shard(n, [schema.UID])
        rej = self.read_rejects(n) if self.fs.exists(self.shard_path(n, "rejects.parquet")) else None
        stats = {**self.stats(n), **count_rows(kept, rej)}
        stats.update(update or {})
        self.write_json(stats, SHARDS, f"{self.shard_name(n)}.{STATS_EXT}")
        return stats

    def _stage(self, n: int, kept: pa.Table, rejects: pa.Table, stats: dict[str, Any], attempt: str,
               tar_written: bool, idx_text: str | None) -> list[str]:
        """Write this attempt's files of shard ``n`` under temporary names; the extensions, in the
        order they are published (stats last)."""
        exts = []
        if tar_written:
            self.sync_path(tmp_name(self.shard_path(n, "tar"), attempt))
            exts.append("tar")
        if idx_text is not None:
            self.stage_file(self.shard_path(n, "idx"), lambda f: f.write(idx_text.encode()), attempt)
            exts.append("idx")
        self.stage_file(self.shard_path(n, "parquet"), lambda f: _write_parquet_to(kept, f), attempt)
        self.stage_file(self.shard_path(n, "rejects.parquet"), lambda f: _write_parquet_to(rejects, f), attempt)
        self.stage_file(self.shard_path(n, STATS_EXT), lambda f: f.write(_json_bytes(stats)), attempt)
        return [*exts, "parquet", "rejects.parquet", STATS_EXT]

    def _claim(self, n: int, record: dict[str, Any]) -> bool:
        """Create shard ``n``'s commit record if there is none and the shard is not committed; False
        when another attempt has it or has finished (its record is dropped once its files are in place,
        so the stats file is checked again after the record is created)."""
        if self.is_committed(n):
            return False
        won = self._create_record(n, record)
        if won and self.is_committed(n):
            self._drop_record(n, record)
            return False
        return won

    def _create_record(self, n: int, record: dict[str, Any]) -> bool:
        final = self.shard_path(n, RECORD_EXT)
        data = _json_bytes(record)
        if _is_local(self.fs):
            tmp = self.stage_file(final, lambda f: f.write(data), record["attempt"])
            _step("rename", final)
            try:
                os.link(tmp, final)  # atomic, and fails where the name exists
                won = True
            except FileExistsError:
                won = False
            os.unlink(tmp)
            self.sync_dir(posixpath.dirname(final))
            return won
        _step("write", final)
        try:
            self.fs.pipe_file(final, data, mode="create")  # conditional put where the store has one
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):
            if self.fs.exists(final):
                return False
            self.fs.pipe_file(final, data)
        self.fs.invalidate_cache()
        return self.read_json(SHARDS, posixpath.basename(final)) == record

    def _publish(self, n: int, record: dict[str, Any]) -> None:
        """Rename the record's staged files into place, stats last. Idempotent: a file already moved
        (by this process earlier, or by another finishing the same record) is passed over."""
        for ext in record["files"]:
            final = self.shard_path(n, ext)
            try:
                self.rename(tmp_name(final, record["attempt"]), final)
            except FileNotFoundError:
                pass
        self.sync_dir(self.path(SHARDS))
        self.sync_dir(self.path(REJECTS))
        self._drop_record(n, record)

    def _drop_record(self, n: int, record: dict[str, Any]) -> None:
        """Delete shard ``n``'s commit record if it is still ``record`` (not a newer one)."""
        current = self.read_json(SHARDS, f"{self.shard_name(n)}.{RECORD_EXT}")
        if current is not None and current.get("attempt") == record.get("attempt"):
            self.delete(self.shard_path(n, RECORD_EXT))

    def recover_shard(self, n: int) -> bool:
        """Finish a commit or rewrite of shard ``n`` left half done; True when one was finished."""
        record = self.read_json(SHARDS, f"{self.shard_name(n)}.{RECORD_EXT}")
        if record is None or not self.fs.exists(tmp_name(self.shard_path(n, STATS_EXT), record["attempt"])):
            return False
        log.info("%s: finishing the interrupted commit of shard %s", self.url, self.shard_name(n))
        self._publish(n, record)
        return True

    def recover(self) -> list[int]:
        """Finish every interrupted commit or rewrite (those whose staged stats file is still there)."""
        done = []
        for p in self._ls(SHARDS):
            base = posixpath.basename(p)
            if f".{STATS_EXT}{TMP_MARK}" in base and base.split(".")[0].isdigit():
                n = int(base.split(".")[0])
                if n not in done and self.recover_shard(n):
                    done.append(n)
        return sorted(done)

    def clear_shard(self, n: int) -> None:
        """Remove every file of an uncommitted shard, left by a killed attempt. A commit that was
        decided (its record names staged files that are all there) is finished instead."""
        if self.recover_shard(n):
            return
        if self.is_committed(n):
            raise DatasetError(f"refusing to clear committed shard {self.shard_name(n)} of {self.url}")
        prefixes = (self.shard_name(n) + ".", self.tar_name(n))
        for folder in (SHARDS, REJECTS):
            for p in self._ls(folder):
                if posixpath.basename(p).startswith(prefixes):
                    self.delete(p)

    def sweep_tmp(self) -> int:
        """Remove temporary files of attempts that lost or died, once every shard is committed.

        Interrupted commits are finished first, so no file a commit record names is removed; a
        zombie still writing loses its files, which costs nothing: it can no longer claim a shard."""
        self.recover()
        gone = 0
        try:
            every = self.fs.find(self.root)
        except FileNotFoundError:
            every = []
        for p in every:
            if TMP_MARK in posixpath.basename(p):
                self.delete(p)
                gone += 1
        return gone

    # -- manifest -----------------------------------------------------------------------------
    def build_manifest(self, base: dict[str, Any], shard_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """``base`` plus ``shards`` and ``totals``, both counted from the committed shards' stats
        (never carried over from an earlier manifest, so they cannot drift from the files)."""
        ids = sorted(set(shard_ids if shard_ids is not None else []) | set(self.shard_ids()))
        missing = [n for n in ids if not self.is_committed(n)]
        if missing:
            raise DatasetError(f"{self.url}: shards {missing[:5]} are not committed; cannot write the manifest")
        shards = []
        totals: dict[str, Any] = {"rows_in": 0, "kept": 0, "dropped": 0, "drops": Counter(), "tar_bytes": 0,
                                  "shard_seconds": 0.0}
        altered: dict[str, Any] = {}
        for n in ids:
            s = self.stats(n)
            if s.get("altered"):  # a stage that changed bytes it copied (export's face blurring) says which rows
                altered[self.shard_name(n)] = s["altered"]
            entry = {"shard": self.shard_name(n), "rows": s["rows_out"], "rejected": s["rejected"],
                     "parquet_bytes": self.fs.size(self.shard_path(n, "parquet")), "tar_bytes": s.get("tar_bytes", 0)}
            if "split" in s:  # export's held-out split: readers find train and val shards here
                entry["split"] = s["split"]
            shards.append(entry)
            totals["rows_in"] += s["rows_in"]
            totals["kept"] += s["rows_out"]
            totals["dropped"] += s["rejected"]
            totals["drops"].update(s["drops"])
            totals["tar_bytes"] += s.get("tar_bytes", 0)
            totals["shard_seconds"] += s.get("seconds", 0.0)
        totals["drops"] = dict(sorted((k, v) for k, v in totals["drops"].items() if v))
        manifest = {**base, "shards": shards, "totals": totals}
        splits: dict[str, dict[str, Any]] = {}
        for e in shards:
            if "split" in e:
                sp = splits.setdefault(e["split"], {"shards": [], "rows": 0})
                sp["shards"].append(e["shard"])
                sp["rows"] += e["rows"]
        if splits:
            manifest["splits"] = splits
        if altered:
            manifest["altered"] = _altered(altered)
        return manifest

    def removals(self) -> list[dict[str, Any]]:
        """The records of every removal carried out on this dataset."""
        kept = self.read_json(PLAN_DIR, REMOVALS_FILE)
        return kept if kept is not None else list((self.manifest() or {}).get("removals", []))

    def keep_removals(self) -> None:
        """Save the removal records beside the plan before the manifest that holds them is dropped."""
        records = self.removals()
        if records and not self.exists(PLAN_DIR, REMOVALS_FILE):
            self.write_json(records, PLAN_DIR, REMOVALS_FILE)

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """``sizes.json`` (where the dataset owns tars), then the manifest: the dataset's last write."""
        if manifest.get("owns_images"):
            sizes = {tar_file_name(e["shard"], e.get("split")): e["rows"] for e in manifest["shards"]}
            self.write_json(sizes, SHARDS, SIZES)
        self.write_json(manifest, MANIFEST)
        self.refresh()
        return manifest

    # -- removing a whole dataset ----------------------------------------------------------------
    def delete_all(self) -> None:
        """Remove the dataset (``--overwrite``). The manifest goes first, so a killed deletion never
        leaves a complete-looking dataset whose shards are gone; the run record goes last, so until
        the end the folder is still recognisably one curate wrote and the same command resumes it."""
        self.delete(self.path(MANIFEST))
        self.sync_dir(self.root)
        run = self.path(PLAN_DIR, RUN_FILE)
        for entry in self._ls(""):
            if entry.rstrip("/") == self.path(PLAN_DIR):
                for p in self._ls(PLAN_DIR):
                    if p != run:
                        self.delete(p, recursive=True)
            else:
                self.delete(entry, recursive=True)
        self.delete(run)
        self.delete(self.root, recursive=True)
        self.refresh()


# Beyond this many altered rows the manifest lists counts per shard; the uids stay in each shard's
# stats.json and in the stage's marker column, so the manifest stays small at any scale.
MANIFEST_ALTERED_UIDS = 100_000


def _altered(by_shard: dict[str, Any]) -> dict[str, Any]:
    rows = sum(a["rows"] for a in by_shard.values())
    first = next(iter(by_shard.values()))
    out = {"why": first.get("why"), "column": first.get("column"), "rows": rows,
           "shards": {k: a["rows"] for k, a in by_shard.items()}}
    if rows <= MANIFEST_ALTERED_UIDS:
        out["uids"] = sorted(u for a in by_shard.values() for u in a.get("uids", []))
    return out


def count_rows(kept: pa.Table, rejects: pa.Table | None) -> dict[str, Any]:
    """The row counts of a shard's stats, from its tables."""
    rejected = rejects.num_rows if rejects is not None else 0
    drops = Counter(rejects.column(schema.DROP_REASON).to_pylist()) if rejected else Counter()
    return {"rows_in": kept.num_rows + rejected, "rows_out": kept.num_rows, "rejected": rejected,
            "drops": dict(sorted(drops.items()))}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"


def _write_parquet_to(table: pa.Table, f: Any, row_group_sizes: Sequence[int] | None = None) -> None:
    # Fixed writer options: the same rows always give the same file bytes.
    if row_group_sizes is None:
        pq.write_table(table, f, compression="zstd", write_statistics=True, store_schema=True)
        return
    with pq.ParquetWriter(f, table.schema, compression="zstd", write_statistics=True, store_schema=True) as w:
        start = 0
        for size in row_group_sizes:
            w.write_table(table.slice(start, size), row_group_size=max(1, size))
            start += size


def write_parquet(table: pa.Table, path: str, fs: fsspec.AbstractFileSystem) -> None:
    """Write a Parquet file where there is no dataset (bench inputs, tests); datasets use write_table."""
    with fs.open(path, "wb") as f:
        _write_parquet_to(table, f)


def empty_like(table: pa.Table) -> pa.Table:
    return table.schema.empty_table()

# -- image bytes behind pointers ----------------------------------------------------------------
class PlanStore:
    """One stage's plan files in an output dataset: ``_plan/<sub>/...``, what its plan computed once
    and its shards read (keys, decisions, thresholds, reference hashes). Every write goes through the
    dataset's one writer (a temp name, then a rename; fsynced when the dataset is durable), every
    delete through its failpoint, and ``--overwrite`` removes the store with the rest of ``_plan/``.
    Stages name their files relative to the store and never build ``_plan`` paths themselves."""

    def __init__(self, ds: Dataset, sub: str):
        self.ds, self.sub = ds, sub

    def path(self, *parts: str) -> str:
        return self.ds.path(PLAN_DIR, self.sub, *parts)

    def exists(self, *parts: str) -> bool:
        return self.ds.fs.exists(self.path(*parts))

    def write_table(self, table: pa.Table, *parts: str, row_group_sizes: Sequence[int] | None = None) -> None:
        self.ds.write_table(table, PLAN_DIR, self.sub, *parts, row_group_sizes=row_group_sizes)

    def read_table(self, *parts: str, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
        return pq.read_table(self.path(*parts), columns=None if columns is None else list(columns),
                             filters=filters, filesystem=self.ds.fs)

    def read_schema(self, *parts: str) -> pa.Schema:
        return pq.read_schema(self.path(*parts), filesystem=self.ds.fs)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.ds.write_json(obj, PLAN_DIR, self.sub, *parts)

    def read_json(self, *parts: str) -> Any | None:
        return self.ds.read_json(PLAN_DIR, self.sub, *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        self.ds.write_bytes(data, PLAN_DIR, self.sub, *parts)

    def read_bytes(self, *parts: str) -> bytes:
        with self.ds.fs.open(self.path(*parts), "rb") as f:
            return f.read()

    def delete(self, *parts: str) -> None:
        """Remove a file or folder of the store (intermediate files once they are used)."""
        self.ds.delete(self.path(*parts), recursive=True)


def read_images(table: pa.Table, ds: Dataset, why: list[str | None] | None = None) -> list[bytes | None]:
    """Image bytes for each row of ``table``, rows of ``ds`` (aligned); None where refused. The pointers
    are confined to ``ds``'s lineage and checked (tar member, sha256): see :mod:`curate.lineage`."""
    from curate.lineage import read_images as confined

    return confined(table, ds, why)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uid_for(*parts: Any) -> str:
    """A 128-bit uid (32 hex) from the identity of an input row; stable across runs and machines."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()
