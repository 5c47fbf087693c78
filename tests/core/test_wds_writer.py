"""The tar writer's member headers against Python's tarfile, and the tars it writes against tarfile's
reader: what webdataset, open_clip, DALI and HF read must not change with the faster header."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from curate import wds


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = wds.FIXED_MTIME
    info.mode = 0o644
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_headers_are_byte_for_byte_tarfiles():
    rng = random.Random(4)
    names = ["a.jpg", "000000000.txt", "0000100000123.json", "x" * 95 + ".webp", "dir/sub/000123.json",
             "k" * 99, "é.jpg", "naïve/000001.txt"]
    sizes = [0, 1, 511, 512, 513, 1 << 20, 8**11 - 1] + [rng.randrange(0, 8**11) for _ in range(40)]
    for name in names:
        for size in sizes:
            got = wds.ustar_header(name, size)
            assert len(got) == wds.BLOCK
            assert got == _tarfile_header(name, size), (name, size)


def test_what_ustar_cannot_hold_still_fails_as_tarfile_does():
    with pytest.raises(ValueError):
        wds.ustar_header("a" * 120 + ".jpg", 10)  # over 100 bytes: no prefix split for a flat name
    with pytest.raises(ValueError):
        wds.ustar_header("a.jpg", 8**11)  # the 11-digit size field overflows


def test_a_written_tar_reads_back_member_for_member():
    buf = io.BytesIO()
    w = wds.TarWriter(buf)
    samples = {f"{i:09d}": {"jpg": bytes(range(256)) * (i + 1), "txt": f"caption {i} é", "json": "{}"}
               for i in range(5)}
    where = {k: w.add(k, m) for k, m in samples.items()}
    w.close()
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"{k}.{e}" for k, m in samples.items() for e in m]
        for m in members:
            key, ext = m.name.split(".")
            want = samples[key][ext]
            want = want.encode() if isinstance(want, str) else want
            assert tf.extractfile(m).read() == want
            assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.type) == (wds.FIXED_MTIME, 0o644, 0, 0, "", tarfile.REGTYPE)
            assert where[key][ext] == (m.offset_data, m.size)
