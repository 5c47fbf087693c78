"""A dataset's lineage and the image bytes its pointers may reach (RELIABILITY 23, 24).

A dataset directory can come from anyone, and can be copied anywhere: to another folder, another
bucket. Its Parquet rows point at image bytes (``image_tar`` + offset + length) and its manifest names
its input. Neither is trusted:

- the lineage is followed through ``manifest.input.url`` only on storage (a local path or an object
  store), never over the network, and without loops;
- a pointer is read only when it lands inside a *lineage root*: the folder of a dataset of the
  lineage, or the tars an import of the lineage adopted. Anything else (a credentials file, an
  internal http URL) is refused without being opened;
- the bytes must be the data of a regular member of a tar (the 512-byte header before them parses and
  declares exactly that length) and must hash to the row's sha256, which every row with a pointer has.

Relocation: a manifest records the location it was written at. When a dataset is read somewhere else
(``cp -r``, a copy to another bucket), pointers and input URLs under its old location are rebased onto
the new one, and an input that was a sibling of the old location is looked for at the same relative
place beside the new one. A dataset written before locations were recorded, that owns its tars,
infers its old location from its own pointers (``OLD/shards/NNNNN.tar``). Absolute pointers inside the
lineage keep working as they are, so old datasets stay readable.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tarfile
from collections import Counter
from typing import TYPE_CHECKING

import pyarrow as pa

from curate import schema

if TYPE_CHECKING:
    from curate.dataset import Dataset

log = logging.getLogger(__name__)

# Where a lineage may lead: local files and object stores; never http(s), ftp or anything else.
STORAGE_SCHEMES = frozenset({"file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs",
                             "memory"})
MAX_DEPTH = 256  # datasets in one lineage; a longer chain is a loop in disguise
_BLOCK = 512


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def normal(url: str | None) -> str | None:
    """``url`` in a comparable form (``..`` resolved, no trailing slash), or None when it is not a
    storage location (a network URL, a relative path, not a string)."""
    if not isinstance(url, str) or not url or "\x00" in url:
        return None
    s = scheme(url)
    if s not in STORAGE_SCHEMES:
        return None
    rest = url.split("://", 1)[1] if "://" in url else url
    if s in ("file", "local"):
        if not rest.startswith("/"):
            return None
        return posixpath.normpath(rest)
    rest = posixpath.normpath(rest.lstrip("/"))
    return None if rest in (".", "") or rest.startswith("..") else f"{s}://{rest}"


def under(url: str, root: str) -> bool:
    return url == root or url.startswith(root.rstrip("/") + "/")


def _rebase(url: str, old: str, new: str) -> str:
    """``url`` (under ``old``) moved under ``new``; always under ``new``, whatever ``old`` is."""
    rest = url[len(old):].lstrip("/")
    return new if not rest else new.rstrip("/") + "/" + rest


def _split(url: str) -> tuple[str, str]:
    """('s3://', 'bucket/a/b') or ('', '/a/b') of a normal() URL."""
    if "://" in url:
        head, rest = url.split("://", 1)
        return head + "://", rest
    return "", url


def _sibling(url: str, old: str, new: str) -> str | None:
    """Where ``url``, seen from ``old``, lies seen from ``new`` (same relative path), or None."""
    (su, pu), (so, po), (sn, pn) = _split(url), _split(old), _split(new)
    if su != so:
        return None
    return normal(sn + posixpath.normpath(posixpath.join(pn, posixpath.relpath(pu, po))))


def recorded_location(ds: Dataset) -> str | None:
    """Where ``ds`` was written: the manifest's record, or for an older dataset that owns its tars,
    the folder its own pointers name."""
    m = ds.manifest() or {}
    loc = normal(m.get("location"))
    if loc is not None:
        return loc
    if not m.get("owns_images"):
        return None
    for n in ds.shard_ids()[:1]:
        t = ds.read_shard(n, columns=[schema.IMAGE_TAR])
        if schema.IMAGE_TAR not in t.column_names:
            return None
        first = next((p for p in t.column(schema.IMAGE_TAR).to_pylist() if p), None)
        p = normal(first)
        if p is not None and posixpath.basename(posixpath.dirname(p)) == "shards":
            return posixpath.dirname(posixpath.dirname(p))
    return None


class Lineage:
    """The datasets behind ``ds`` and the roots its pointers may reach, each as (recorded, actual):
    where it was when the pointer was written, and where it is now."""

    def __init__(self, ds: Dataset):
        from curate.dataset import Dataset

        self.datasets: list[Dataset] = []
        self.roots: list[tuple[str, str]] = []
        here = normal(ds.url)
        current: Dataset | None = ds
        recorded = recorded_location(ds) or here
        seen: set[str] = set()
        while current is not None and len(self.datasets) < MAX_DEPTH:
            now = normal(current.url)
            if now is None or now in seen:
                break
            seen.add(now)
            self.datasets.append(current)
            self.roots.append((recorded or now, now))
            # an unfinished dataset's run record names its input as its manifest will
            m = current.manifest() or current.read_json("_plan", "run.json") or {}
            given = (m.get("input") or {}).get("url") if isinstance(m.get("input"), dict) else None
            up, up_recorded = self._place(given, recorded or now, now)
            if up is None:
                break
            if m.get("stage") == "import":
                # the tars an import adopted are where its pointers lead; they are not a dataset
                self.roots.append((up_recorded, up))
                break
            parent = Dataset(up)
            try:
                complete = parent.is_complete()
            except (OSError, ValueError):  # a file (download's URL list), an unreadable place
                complete = False
            if not complete:
                break
            current = parent
            recorded = recorded_location(parent) or up_recorded

    @staticmethod
    def _place(given: object, recorded: str, now: str) -> tuple[str | None, str]:
        """(where the input is now, where it was recorded) for a manifest's input URL; (None, _) when
        it is not storage or cannot be found."""
        from curate.dataset import url_to_fs

        url = normal(given) if isinstance(given, str) else None
        if url is None:
            return None, ""
        candidates = [url]
        if recorded != now:
            moved = _rebase(url, recorded, now) if under(url, recorded) else _sibling(url, recorded, now)
            if moved is not None:
                candidates.insert(0, moved)
        for c in candidates:
            try:
                fs, path = url_to_fs(c)
                if fs.exists(path):
                    return c, url
            except (OSError, ValueError):
                continue
        return None, url

    def locate(self, pointer: object) -> str | None:
        """Where the bytes of ``pointer`` are now, or None when it leads outside the lineage."""
        p = normal(pointer) if isinstance(pointer, str) else None
        if p is None or not p.endswith(".tar"):
            return None
        for _, now in self.roots:
            if under(p, now):
                return p
        for recorded, now in self.roots:
            if recorded != now and under(p, recorded):
                return _rebase(p, recorded, now)
        return None


def lineage(ds: Dataset) -> Lineage:
    """The (cached) lineage of ``ds``."""
    cached = getattr(ds, "_lineage", None)
    if cached is None:
        cached = Lineage(ds)
        ds._lineage = cached
    return cached


def read_images(table: pa.Table, ds: Dataset, why: list[str | None] | None = None) -> list[bytes | None]:
    """Image bytes for each row of ``table`` (rows of ``ds``), aligned; None where the row has no
    pointer or its bytes are refused. ``why``, when given, receives the reason per refused row.

    Each tar is opened once and read in offset order; the 512 bytes before each image are read too,
    to check they are the tar header of exactly this member."""
    n = table.num_rows
    out: list[bytes | None] = [None] * n
    reasons: list[str | None] = [None] * n
    if n and schema.IMAGE_TAR in table.column_names:
        _read(table, lineage(ds), out, reasons)
    if why is not None:
        why[:] = reasons
    refused = Counter(r.split(":")[0] for r in reasons if r and not r.startswith("no pointer"))
    if refused:
        log.warning("%s: image bytes refused for %d rows: %s", ds.url, sum(refused.values()), dict(refused))
    return out


def _read(table: pa.Table, lin: Lineage, out: list[bytes | None], reasons: list[str | None]) -> None:
    from curate.dataset import url_to_fs

    cols = table.column_names
    tars = table.column(schema.IMAGE_TAR).to_pylist()
    offsets = table.column(schema.IMAGE_OFFSET).to_pylist() if schema.IMAGE_OFFSET in cols else [None] * len(tars)
    lengths = table.column(schema.IMAGE_LENGTH).to_pylist() if schema.IMAGE_LENGTH in cols else [None] * len(tars)
    shas = table.column(schema.SHA256).to_pylist() if schema.SHA256 in cols else [None] * len(tars)
    by_tar: dict[str, list[int]] = {}
    for i, t in enumerate(tars):
        if t is None or offsets[i] is None or lengths[i] is None:
            reasons[i] = "no pointer"
        elif not isinstance(shas[i], str) or len(shas[i]) != 64:
            reasons[i] = "no sha256 recorded for the image bytes"
        elif offsets[i] < _BLOCK or lengths[i] < 0:
            reasons[i] = f"pointer {offsets[i]}+{lengths[i]} is not inside a tar member"
        else:
            by_tar.setdefault(t, []).append(i)
    for tar, rows in by_tar.items():
        where = lin.locate(tar)
        if where is None:
            for i in rows:
                reasons[i] = f"outside the lineage: {tar} is not a tar of this dataset's lineage"
            continue
        rows.sort(key=lambda i: offsets[i])
        try:
            fs, path = url_to_fs(where)
            with fs.open(path, "rb") as f:
                for i in rows:
                    f.seek(offsets[i] - _BLOCK)
                    block = f.read(_BLOCK + lengths[i])
                    out[i], reasons[i] = _member(block, lengths[i], shas[i], where, offsets[i])
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            for i in rows:
                out[i], reasons[i] = None, f"unreadable: {where}: {type(e).__name__}"


def _member(block: bytes, length: int, sha: str, where: str, offset: int) -> tuple[bytes | None, str | None]:
    if len(block) != _BLOCK + length:
        return None, f"unreadable: {where}@{offset}+{length} runs past the end of the file"
    try:
        info = tarfile.TarInfo.frombuf(block[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None, f"not a tar member: no tar header before {where}@{offset}"
    if not info.isreg() or info.size != length:
        return None, f"not a tar member: the header before {where}@{offset} declares another member"
    data = block[_BLOCK:]
    if hashlib.sha256(data).hexdigest() != sha:
        return None, "sha256 of the image bytes does not match"
    return data, None
