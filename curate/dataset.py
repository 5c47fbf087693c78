"""The dataset directory (DESIGN §2): naming, atomic shard commit, manifest, readers.

Layout under any fsspec URL::

    _manifest.json            written last; a dataset without it is incomplete
    _plan/                    what a stage's plan step decided (inputs of each shard, decision tables)
    shards/NNNNN.parquet      kept rows           shards/NNNNN.tar + .idx   (datasets that own bytes)
    shards/NNNNN.stats.json   the commit marker   shards/sizes.json          (beside the tars)
    rejects/NNNNN.parquet     dropped rows with drop_reason

A shard is committed when its stats file exists. Every other file of the shard is written under a
deterministic temporary name and renamed into place before the stats file, so a run killed at any
instant leaves either a committed shard or debris that :meth:`Dataset.clear_shard` removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PLAN_DIR = "_plan"
SHARDS = "shards"
REJECTS = "rejects"
MIN_SHARD_DIGITS = 5
TMP_MARK = ".tmp-"


def tmp_name(path: str, attempt: str | None = None) -> str:
    """A temporary name private to one attempt: two attempts at the same shard (a zombie worker of a
    killed driver, a retried task) never write to each other's files."""
    return f"{path}{TMP_MARK}{attempt or uuid.uuid4().hex[:12]}"


def new_attempt() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


class DatasetError(RuntimeError):
    pass


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


class Dataset:
    """One dataset directory. Cheap to construct; touches storage only when asked."""

    def __init__(self, url: str):
        self.fs, self.root = url_to_fs(str(url))
        self.url = to_url(self.fs, self.root)
        self._manifest: dict[str, Any] | None = None
        self._digits: int | None = None

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
            meta = self.manifest() or self.read_json(PLAN_DIR, "plan.json") or {}
            self._digits = int(meta.get("shard_digits", MIN_SHARD_DIGITS))
        return self._digits

    @shard_digits.setter
    def shard_digits(self, value: int) -> None:
        self._digits = value

    def shard_name(self, n: int) -> str:
        return f"{n:0{self.shard_digits}d}"

    def shard_path(self, n: int, ext: str) -> str:
        folder = REJECTS if ext == "rejects.parquet" else SHARDS
        ext = "parquet" if ext == "rejects.parquet" else ext
        return self.path(folder, f"{self.shard_name(n)}.{ext}")

    def tar_url(self, n: int) -> str:
        return to_url(self.fs, self.shard_path(n, "tar"))

    # -- small json files ---------------------------------------------------------------------
    def read_json(self, *parts: str) -> Any | None:
        p = self.path(*parts)
        try:
            with self.fs.open(p, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file atomically: temp name, then rename."""
        final = self.path(*parts)
        tmp = tmp_name(final)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.rename(tmp, final)

    def rename(self, src: str, dst: str) -> None:
        if _is_local(self.fs):
            os.replace(src, dst)  # atomic on POSIX
        else:
            self.fs.mv(src, dst)
            self.fs.invalidate_cache()

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

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
        self._lineage = None  # curate.lineage's cache: a new manifest may name another input
        self.fs.invalidate_cache()

    def shard_ids(self) -> list[int]:
        """Committed shards: those whose stats file exists."""
        folder = self.path(SHARDS)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            base = posixpath.basename(name)
            if base.endswith(".stats.json") and base.split(".")[0].isdigit():
                out.append(int(base.split(".")[0]))
        return sorted(out)

    def stats(self, n: int) -> dict[str, Any]:
        s = self.read_json(SHARDS, f"{self.shard_name(n)}.stats.json")
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

    # -- writers ------------------------------------------------------------------------------
    def clear_shard(self, n: int) -> None:
        """Remove every file of an uncommitted shard, final or temporary, left by a killed attempt."""
        if self.fs.exists(self.shard_path(n, "stats.json")):
            raise DatasetError(f"refusing to clear committed shard {self.shard_name(n)} of {self.url}")
        prefix = self.shard_name(n) + "."
        for folder in (SHARDS, REJECTS):
            for p in self._ls(folder):
                if posixpath.basename(p).startswith(prefix):
                    self.fs.rm(p)

    def sweep_tmp(self) -> int:
        """Remove temporary files of attempts that died; call only when no attempt is running."""
        gone = 0
        for folder in (SHARDS, REJECTS, ""):
            for p in self._ls(folder):
                if TMP_MARK in posixpath.basename(p):
                    self.fs.rm(p)
                    gone += 1
        return gone

    def _ls(self, folder: str) -> list[str]:
        try:
            return self.fs.ls(self.path(folder) if folder else self.root, detail=False)
        except FileNotFoundError:
            return []

    def open_tmp_tar(self, n: int, attempt: str):
        self.fs.makedirs(self.path(SHARDS), exist_ok=True)
        return self.fs.open(tmp_name(self.shard_path(n, "tar"), attempt), "wb")

    def commit_shard(
        self,
        n: int,
        kept: pa.Table,
        rejects: pa.Table,
        stats: dict[str, Any],
        attempt: str | None = None,
        tar_written: bool = False,
        idx_text: str | None = None,
    ) -> None:
        """Write the shard's files under temp names, rename them in place, then the stats marker.

        A concurrent attempt at the same shard writes the same bytes (stages are deterministic), so
        whichever renames last leaves the same committed shard.
        """
        attempt = attempt or new_attempt()
        self.fs.makedirs(self.path(SHARDS), exist_ok=True)
        self.fs.makedirs(self.path(REJECTS), exist_ok=True)
        staged: list[tuple[str, str]] = []

        def stage(ext: str) -> str:
            final = self.shard_path(n, ext)
            staged.append((tmp_name(final, attempt), final))
            return staged[-1][0]

        if tar_written:
            stage("tar")
        if idx_text is not None:
            with self.fs.open(stage("idx"), "wb") as f:
                f.write(idx_text.encode())
        write_parquet(kept, stage("parquet"), self.fs)
        write_parquet(rejects, stage("rejects.parquet"), self.fs)
        for tmp, final in staged:
            self.rename(tmp, final)
        self.write_json(stats, SHARDS, f"{self.shard_name(n)}.stats.json")


def write_parquet(table: pa.Table, path: str, fs: fsspec.AbstractFileSystem) -> None:
    # Fixed writer options: the same rows always give the same file bytes.
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd", write_statistics=True, store_schema=True)


def empty_like(table: pa.Table) -> pa.Table:
    return table.schema.empty_table()


# -- image bytes behind pointers ----------------------------------------------------------------
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
