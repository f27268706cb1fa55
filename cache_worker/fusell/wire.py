"""Packing the model's values into the kernel's structs (abi.py) for replies."""

from __future__ import annotations

from . import abi
from .model import Attr, Entry

_ATTR = abi.ATTR
_NS = 1_000_000_000


def secs(t: float) -> tuple[int, int]:
    if t <= 0:
        return 0, 0
    s = int(t)
    return s, int((t - s) * _NS)


def pack_attr(a: Attr) -> bytes:
    blocks = a.blocks if a.blocks is not None else (a.size + 511) // 512
    return _ATTR.pack(
        a.ino, a.size, blocks,
        a.atime_ns // _NS, a.mtime_ns // _NS, a.ctime_ns // _NS,
        a.atime_ns % _NS, a.mtime_ns % _NS, a.ctime_ns % _NS,
        a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0,
    )


def pack_entry(e: Entry) -> bytes:
    es, ens = secs(e.entry_timeout)
    as_, ans = secs(e.attr_timeout)
    return abi.ENTRY_OUT_HEAD.pack(e.nodeid, e.generation, es, as_, ens, ans) + pack_attr(e.attr)


NO_ENTRY = abi.ENTRY_OUT_HEAD.pack(0, 0, 0, 0, 0, 0) + bytes(_ATTR.size)
