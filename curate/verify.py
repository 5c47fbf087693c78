"""``curate verify``: every committed shard is what its files claim to be, and the manifest agrees.

Checks, per shard: no commit or rewrite is left half done; the Parquet files hold the row counts the
stats file records; each row's pointer lands exactly on the member ``KEY.ext`` of the tar it names;
the bytes there hash to the row's sha256; the tar is complete and its DALI index matches it. Per
dataset: the manifest's shard list, row counts and totals equal what the stats files say, and
``sizes.json`` equals the manifest. Rows whose bytes live in another dataset's tars and no longer
match are summed up per owning dataset, so the dataset that changed is named. Problems name the
shard and the row.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Any

from curate import schema
from curate.dataset import RECORD_EXT, SHARDS, SIZES, STATS_EXT, Dataset, read_images, tar_file_name, tmp_name
from curate.wds import TarScan, iter_tar, parse_index, split_name


def verify(ds: Dataset) -> tuple[list[str], int]:
    """(problems, rows checked)."""
    problems: list[str] = []
    checked = 0
    foreign: Counter[str] = Counter()
    if not ds.is_complete():
        problems.append(f"{ds.url}: no _manifest.json (the run that wrote it did not finish)")
    for n in ds.shard_ids():
        checked += _verify_shard(ds, n, problems, foreign)
    if ds.is_complete():
        problems.extend(_check_manifest(ds))
    for owner, count in sorted(foreign.items()):
        problems.append(f"{count} row(s) point into tars of {owner} whose bytes there no longer match: that "
                        "dataset changed after this one was made (a removal from it: remove the same samples "
                        "here too; otherwise remake this dataset)")
    return problems, checked


def _verify_shard(ds: Dataset, n: int, problems: list[str], foreign: Counter[str]) -> int:
    name = ds.shard_name(n)
    record = ds.read_json(SHARDS, f"{name}.{RECORD_EXT}")
    if record is not None and ds.fs.exists(tmp_name(ds.shard_path(n, STATS_EXT), record["attempt"])):
        problems.append(f"shard {name}: an interrupted commit or rewrite is pending; rerun the command "
                        "that was interrupted to finish it")
    stats = ds.stats(n)
    try:
        table = ds.read_shard(n)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a finding, not a crash
        problems.append(f"shard {name}: parquet unreadable: {e}")
        return 0
    if table.num_rows != stats["rows_out"]:
        problems.append(f"shard {name}: parquet has {table.num_rows} rows, stats say {stats['rows_out']}")
    try:
        rej = ds.read_rejects(n)
        if rej.num_rows != stats["rejected"]:
            problems.append(f"shard {name}: rejects has {rej.num_rows} rows, stats say {stats['rejected']}")
        if stats["rows_in"] != stats["rows_out"] + stats["rejected"]:
            problems.append(f"shard {name}: stats say {stats['rows_in']} rows in but {stats['rows_out']} kept "
                            f"and {stats['rejected']} rejected")
    except FileNotFoundError:
        problems.append(f"shard {name}: rejects file missing")
    if schema.IMAGE_TAR in table.column_names:
        members = _own_tar_members(ds, n, problems)
        problems.extend(_check_rows(ds, name, table, members, ds.tar_url(n), foreign))
    return table.num_rows


def _check_manifest(ds: Dataset) -> list[str]:
    """The manifest's shards and totals against the stats files; sizes.json against the manifest."""
    m = ds.manifest()
    out = []
    ids = ds.shard_ids()
    listed = {e["shard"]: e for e in m.get("shards", [])}
    if sorted(listed) != [ds.shard_name(n) for n in ids]:
        out.append(f"manifest lists shards {sorted(listed)[:5]}..., but the committed shards are "
                   f"{[ds.shard_name(n) for n in ids][:5]}...")
    want: dict[str, Any] = {"rows_in": 0, "kept": 0, "dropped": 0, "drops": Counter()}
    for n in ids:
        s = ds.stats(n)
        entry = listed.get(ds.shard_name(n))
        if entry is not None and (entry["rows"], entry["rejected"]) != (s["rows_out"], s["rejected"]):
            out.append(f"shard {ds.shard_name(n)}: manifest says {entry['rows']} kept and {entry['rejected']} "
                       f"rejected, stats say {s['rows_out']} and {s['rejected']}")
        want["rows_in"] += s["rows_in"]
        want["kept"] += s["rows_out"]
        want["dropped"] += s["rejected"]
        want["drops"].update(s["drops"])
    totals = m.get("totals", {})
    for key in ("rows_in", "kept", "dropped"):
        if totals.get(key) != want[key]:
            out.append(f"manifest totals say {key} {totals.get(key)}, the shards' stats say {want[key]}")
    drops = {k: v for k, v in want["drops"].items() if v}
    if {k: v for k, v in (totals.get("drops") or {}).items() if v} != drops:
        out.append(f"manifest totals count drops {totals.get('drops')}, the shards' stats {dict(sorted(drops.items()))}")
    if m.get("owns_images"):
        sizes = ds.read_json(SHARDS, SIZES)
        if sizes != {tar_file_name(e["shard"], e.get("split")): e["rows"] for e in m.get("shards", [])}:
            out.append(f"{SIZES} does not match the manifest's row counts")
    return out


def _own_tar_members(ds: Dataset, n: int, problems: list[str]) -> dict[int, tuple[str, int]] | None:
    """data offset -> (member name, size) of this shard's own tar, or None if it owns none."""
    name = ds.shard_name(n)
    path = ds.shard_path(n, "tar")
    if not ds.fs.exists(path):
        return None
    scan = TarScan()
    size = ds.fs.size(path)
    with ds.fs.open(path, "rb") as f:
        found = {m.offset: (m.name, m.size) for m in iter_tar(f, size, scan)}
    if scan.truncated:
        problems.append(f"shard {name}: tar {ds.tar_url(n)} is damaged: {scan.error}")
    idx_path = ds.shard_path(n, "idx")
    if not ds.fs.exists(idx_path):
        problems.append(f"shard {name}: DALI index {name}.idx missing")
    else:
        with ds.fs.open(idx_path, "rb") as f:
            try:
                entries = parse_index(f.read().decode())
                listed = {off: size for e in entries for off, size in e.values()}
                if any(found.get(off, (None, -1))[1] != sz for off, sz in listed.items()):
                    problems.append(f"shard {name}: DALI index does not match the tar")
            except (ValueError, IndexError) as e:
                problems.append(f"shard {name}: DALI index unreadable: {e}")
    return found


def _owner(tar: str) -> str:
    """The dataset a tar belongs to: the folder above its ``shards/``."""
    folder = posixpath.dirname(tar)
    return posixpath.dirname(folder) if posixpath.basename(folder) == SHARDS else folder


def _check_rows(ds: Dataset, name: str, table, members: dict[int, tuple[str, int]] | None, own_tar: str,
                foreign: Counter[str]) -> list[str]:
    from curate.lineage import lineage, normal

    out = []
    own = normal(own_tar)
    lin = lineage(ds)
    why: list[str | None] = []
    blobs = read_images(table, ds, why)
    cols = table.column_names
    uids = table.column(schema.UID).to_pylist() if schema.UID in cols else [None] * table.num_rows
    keys = table.column(schema.KEY).to_pylist() if schema.KEY in cols else [None] * table.num_rows
    tars = table.column(schema.IMAGE_TAR).to_pylist()
    offsets = table.column(schema.IMAGE_OFFSET).to_pylist()
    lengths = table.column(schema.IMAGE_LENGTH).to_pylist()
    for i, data in enumerate(blobs):
        where = f"shard {name} row {i} (uid {uids[i]}, key {keys[i]})"
        if data is None:
            located = lin.locate(tars[i]) if tars[i] is not None else None
            blanked = located is not None and offsets[i] is not None and _blanked_at(located, offsets[i])
            note = " (blanked: the sample was removed there)" if blanked else ""
            out.append(f"{where}: image bytes refused at {tars[i]}@{offsets[i]}+{lengths[i]}: {why[i]}{note}")
            if located is not None and normal(located) != own and (blanked or "sha256" in (why[i] or "")
                                                                  or "tar member" in (why[i] or "")):
                foreign[_owner(located)] += 1
            continue
        if members is not None:
            member = members.get(offsets[i])
            # a copied dataset's pointers name where it was written; they count where they lead now
            if lin.locate(tars[i]) != own:
                out.append(f"{where}: points into {tars[i]}, not into this shard's tar")
            elif member is None:
                out.append(f"{where}: pointer {offsets[i]} is not the start of a tar member")
            else:
                key, _ = split_name(member[0])
                if member[1] != lengths[i]:
                    out.append(f"{where}: length {lengths[i]} but member {member[0]} has {member[1]} bytes")
                elif keys[i] is not None and key != keys[i]:
                    out.append(f"{where}: pointer lands on member {member[0]} of another sample")
    return out


def _blanked_at(tar: str, offset: int) -> bool:
    """Whether the bytes at ``offset`` of ``tar`` lie in a sample blanked by a removal."""
    from curate.dataset import url_to_fs

    try:
        fs, path = url_to_fs(tar)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            return _blanked(f.read(64)) and f.tell() > offset
    except OSError:
        return False


def _blanked(data: bytes) -> bool:
    """Whether bytes lie in a sample blanked by a removal (a PAX comment of zeros; see removal.py)."""
    return data.lstrip(b"0123456789 ").removeprefix(b"comment=").strip(b"0\n") == b""
