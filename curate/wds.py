"""WebDataset tars: writing them deterministically, reading existing ones defensively, DALI indexes.

A sample is the run of contiguous members ``KEY.ext`` sharing one KEY. What we write is what
webdataset, open_clip, DALI and HF ``datasets`` all read: plain ustar headers, regular files, fixed
mtime, names under 100 bytes. What we read may be anything a tool produced (PAX headers, GNU long
names, directories, truncation), so the reader reports what it saw instead of trusting it.
"""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
FIXED_MTIME = 1_700_000_000  # reproducible tars: the same samples give the same bytes
IDX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): the key ends at the first dot of the basename,
    as webdataset and DALI split it."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


# Every member header but its name, size and checksum is the same: regular file, mode 0644, owner 0,
# FIXED_MTIME, no user or group name. Built once, with the checksum field blank (eight spaces).
_HEADER_HEAD = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_HEADER_TAIL = (b"%011o\0" % FIXED_MTIME) + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000" \
    + b"\0" * 247  # mtime, checksum, type, link, magic, version; names, device numbers, prefix empty


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of one regular file member, byte for byte what ``tarfile`` writes
    for it with our fixed fields, built directly: ``TarInfo.tobuf`` took ~25 us a member, a large
    share of a download's writes. Names that are not short ASCII, and sizes beyond the 11-digit
    field, go through ``tarfile`` (which raises where ustar cannot hold them)."""
    raw = name.encode("ascii") if name.isascii() else b""
    if not raw or len(raw) >= 100 or size >= 8**11 or size < 0:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = FIXED_MTIME
        info.mode = 0o644
        info.uname = info.gname = ""
        return info.tobuf(format=tarfile.USTAR_FORMAT)
    head = raw.ljust(100, b"\0") + _HEADER_HEAD + b"%011o\0" % size
    check = sum(head) + _TAIL_SUM
    return head + _HEADER_TAIL[:12] + b"%06o\0 " % check + _HEADER_TAIL[20:]


_TAIL_SUM = sum(_HEADER_TAIL)


class TarWriter:
    """Append samples to a tar on an open binary file; keep what the DALI index needs."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self._pos = 0
        self._samples: list[list[tuple[str, int, int, str]]] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def bytes_written(self) -> int:
        return self._pos

    def add(self, key: str, members: dict[str, bytes | str]) -> dict[str, tuple[int, int]]:
        """Write ``KEY.ext`` for each member, in the given order; return ext -> (data offset, size)."""
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"invalid sample key {key!r}: keys must be non-empty and dot-free")
        where: dict[str, tuple[int, int]] = {}
        entry = []
        for ext, data in members.items():
            if isinstance(data, str):
                data = data.encode("utf-8")
            name = f"{key}.{ext}"
            if len(name.encode()) >= 100:
                raise ValueError(f"member name {name!r} is 100 bytes or longer")
            header = ustar_header(name, len(data))
            self._f.write(header)
            self._pos += len(header)
            offset = self._pos
            self._f.write(data)
            pad = (-len(data)) % BLOCK
            if pad:
                self._f.write(b"\0" * pad)
            self._pos += len(data) + pad
            where[ext] = (offset, len(data))
            entry.append((ext, offset, len(data), name))
        self._samples.append(entry)
        return where

    def close(self) -> None:
        if not self._closed:
            self._f.write(b"\0" * (2 * BLOCK))
            self._pos += 2 * BLOCK
            self._closed = True

    def index_text(self) -> str:
        return index_text(self._samples)


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI's ``wds2idx`` format: ``v1.2 N`` then, per sample, ``ext offset size name`` per member."""
    lines = [f"{IDX_VERSION} {len(samples)}"]
    for entry in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entry))
    return "\n".join(lines) + "\n"


def parse_index(text: str) -> list[dict[str, tuple[int, int]]]:
    """Inverse of :func:`index_text`: per sample, ext -> (data offset, size)."""
    lines = text.splitlines()
    version, count = lines[0].split()
    if version != IDX_VERSION:
        raise ValueError(f"unsupported index version {version!r}")
    out = []
    for line in lines[1 : 1 + int(count)]:
        parts = line.split()
        entry = {}
        for i in range(0, len(parts), 4):
            entry[parts[i]] = (int(parts[i + 1]), int(parts[i + 2]))
        out.append(entry)
    if len(out) != int(count):
        raise ValueError(f"index declares {count} samples but lists {len(out)}")
    return out


@dataclasses.dataclass
class Member:
    name: str
    offset: int  # of the data, not the header
    size: int
    type: bytes  # tarfile type flag; REGTYPE for regular files


@dataclasses.dataclass
class TarScan:
    """What :func:`iter_tar` found besides the members: where and why it stopped early."""

    truncated: bool = False
    error: str | None = None
    end: int = 0  # bytes of the tar that held complete members


def iter_tar(fileobj: BinaryIO, size: int | None = None, scan: TarScan | None = None) -> Iterator[Member]:
    """Yield the members of an existing tar without reading their data.

    Stops at the first sign of damage (a header that does not parse, data that runs past the end of
    the file) and records it in ``scan`` instead of raising, so the caller keeps the intact samples.
    """
    scan = scan if scan is not None else TarScan()
    if size is None:
        fileobj.seek(0, 2)
        size = fileobj.tell()
        fileobj.seek(0)
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as e:
        scan.truncated, scan.error = size > 0, f"not a readable tar: {e}"
        return
    while True:
        try:
            info = tf.next()
        except (tarfile.ReadError, EOFError, OSError) as e:
            scan.truncated, scan.error = True, f"unreadable header after byte {scan.end}: {e}"
            return
        if info is None:
            return
        if info.offset_data + info.size > size:
            scan.truncated = True
            scan.error = f"member {info.name!r} runs past the end of the file ({size} bytes)"
            return
        scan.end = info.offset_data + info.size
        yield Member(info.name, info.offset_data, info.size, info.type)
