"""URL lists in every supported format, gzip, folders, column mapping, extras and uids."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.inputs import InputError, read_url_list

ROWS = [
    {"link": "http://a.example/1.jpg", "text": "a cat, sitting", "score": "0.5"},
    {"link": "http://a.example/2.jpg", "text": "a dog", "score": "0.7"},
    {"link": "http://b.example/3.png", "text": "ünïcode \"quoted\"", "score": "0.9"},
]


def write(path, fmt, rows=ROWS, gz=False):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), str(path))
        data = path.read_bytes()
    elif fmt in ("csv", "tsv"):
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue().encode()
    elif fmt == "json":
        data = json.dumps(rows).encode()
    elif fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    else:
        data = "".join(r["link"] + "\n" for r in rows).encode()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def read_all(*args, **kw) -> pa.Table:
    return pa.concat_tables(list(read_url_list(*args, **kw)), promote_options="permissive")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "json", "jsonl"])
def test_formats(tmp_path, fmt, gz):
    p = write(tmp_path / (f"list.{fmt}" + (".gz" if gz else "")), fmt, gz=gz)
    t = read_all(str(p), url_col="link", caption_col="text")
    assert t.column(schema.URL).to_pylist() == [r["link"] for r in ROWS]
    assert t.column(schema.CAPTION).to_pylist() == [r["text"] for r in ROWS]
    assert t.column("score").to_pylist() == [r["score"] for r in ROWS]  # extra column carried
    uids = t.column(schema.UID).to_pylist()
    assert len(set(uids)) == 3 and all(len(u) == 32 and int(u, 16) >= 0 for u in uids)
    # deterministic: same input, same uids
    assert read_all(str(p), url_col="link", caption_col="text").column(schema.UID).to_pylist() == uids


def test_txt_and_gzip(tmp_path):
    for name, gz in (("u.txt", False), ("u.txt.gz", True)):
        t = read_all(str(write(tmp_path / name, "txt", gz=gz)))
        assert t.column(schema.URL).to_pylist() == [r["link"] for r in ROWS]
        assert t.column(schema.CAPTION).null_count == 3


def test_folder_many_files_and_uid_depends_on_identity(tmp_path):
    d = tmp_path / "lists"
    d.mkdir()
    write(d / "b.jsonl", "jsonl")
    write(d / "a.csv", "csv")
    (d / "README.md").write_text("ignored")
    t = read_all(str(d), url_col="link", caption_col="text")
    assert t.num_rows == 6
    uids = t.column(schema.UID).to_pylist()
    assert len(set(uids)) == 6  # same urls in two files: different input identity, different uids
    # moving the folder does not change uids (names are relative to the input root)
    moved = tmp_path / "elsewhere"
    d.rename(moved)
    assert read_all(str(moved), url_col="link", caption_col="text").column(schema.UID).to_pylist() == uids
    # a list of files works too, same order
    both = read_all([str(moved / "a.csv"), str(moved / "b.jsonl")], url_col="link", caption_col="text")
    assert both.num_rows == 6


def test_input_uid_kept_and_extras_selected_and_collisions_renamed(tmp_path):
    rows = [{"uid": "f" * 32, "url": "http://x/1.jpg", "caption": "c", "status": "old", "keep": 1, "drop": 2}]
    p = write(tmp_path / "in.parquet", "parquet", rows)
    t = read_all(str(p))
    assert t.column(schema.UID).to_pylist() == ["f" * 32]
    assert "input_status" in t.column_names and schema.STATUS not in t.column_names
    t2 = read_all(str(p), extra_columns=["keep"])
    assert set(t2.column_names) == {schema.UID, schema.URL, schema.CAPTION, "keep"}


def test_errors_are_clear(tmp_path):
    p = write(tmp_path / "in.jsonl", "jsonl")
    with pytest.raises(InputError, match="no url column 'url'"):
        read_all(str(p))
    with pytest.raises(InputError, match="does not exist"):
        read_all(str(tmp_path / "missing.parquet"))
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(InputError, match="unknown URL list format"):
        read_all(str(tmp_path / "x.xlsx"))
