"""``curate verify``: every committed shard is what its files claim to be.

Checks, per shard: the Parquet files hold the row counts the stats file records; each row's pointer
lands exactly on the member ``KEY.ext`` of the tar it names; the bytes there hash to the row's
sha256; the tar is complete and its DALI index matches it. Problems name the shard and the row.
"""

from __future__ import annotations

from curate import schema
from curate.dataset import Dataset, read_images
from curate.wds import TarScan, iter_tar, parse_index, split_name


def verify(ds: Dataset) -> tuple[list[str], int]:
    """(problems, rows checked)."""
    problems: list[str] = []
    checked = 0
    if not ds.is_complete():
        problems.append(f"{ds.url}: no _manifest.json (the run that wrote it did not finish)")
    for n in ds.shard_ids():
        name = ds.shard_name(n)
        stats = ds.stats(n)
        try:
            table = ds.read_shard(n)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a finding, not a crash
            problems.append(f"shard {name}: parquet unreadable: {e}")
            continue
        if table.num_rows != stats["rows_out"]:
            problems.append(f"shard {name}: parquet has {table.num_rows} rows, stats say {stats['rows_out']}")
        try:
            rej = ds.read_rejects(n)
            if rej.num_rows != stats["rejected"]:
                problems.append(f"shard {name}: rejects has {rej.num_rows} rows, stats say {stats['rejected']}")
        except FileNotFoundError:
            problems.append(f"shard {name}: rejects file missing")
        checked += table.num_rows
        if schema.IMAGE_TAR not in table.column_names:
            continue
        members = _own_tar_members(ds, n, problems)
        problems.extend(_check_rows(ds, name, table, members, ds.tar_url(n)))
    return problems, checked


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


def _check_rows(ds: Dataset, name: str, table, members: dict[int, tuple[str, int]] | None,
                own_tar: str) -> list[str]:
    from curate.lineage import lineage, normal

    out = []
    own = normal(own_tar)
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
            out.append(f"{where}: image bytes refused at {tars[i]}@{offsets[i]}+{lengths[i]}: {why[i]}")
            continue
        if members is not None:
            member = members.get(offsets[i])
            # a copied dataset's pointers name where it was written; they count where they lead now
            if lineage(ds).locate(tars[i]) != own:
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

