"""Counting the opens of a direct tree (``--direct``), so that its reads stay in the hit ratio.

A direct tree is plain files on the cache's own filesystem (hard links to the cache files),
bound over the mountpoint or into pods: its reads never reach the worker. They are counted the
way kernel opens are (open_watch.py): one fanotify inode mark per directory of the tree, events
that name the opened file by its file handle, and each open counts the file's size, whole, as
a hit. The kernel's file handle is whatever the filesystem encodes (ext4: inode and generation;
tmpfs, a ``Memory`` cache: generation and inode), so the table that sizes them is keyed by a
hash of the whole handle (type and bytes), built from ``name_to_handle_at`` of every file of the
tree before the tree is bound: no open through the bind goes uncounted, and a key is 16 bytes
of the worker's memory per file (two ``array('Q')``s, searched in C by the native counter).

Never by descriptor with a filesystem mark, the fallback kernel opens have: that would count
every open of the disk the cache is on. Where marking by file id is refused (no
``CAP_SYS_ADMIN``, or more directories than ``MAX_DIR_MARKS``), the tree's reads are not
counted, and ``datahoard status`` says so.

Measured (``python -m bench.hot --files 4000 --extra=--direct``, 60-160 KB files, 8 readers,
page cache warm, x local disk, 2 cores): see bench/ANALYSIS.md, 2026-12-07.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .fs import MAX_DIR_MARKS
from .fusell import fastopen
from .open_watch import MAX_HANDLE, OpenWatch

log = logging.getLogger(__name__)

_AT_FDCWD = -100
#: Ask for a handle that identifies the file (the kind fanotify reports, Linux 6.5+), not one
#: that can open it: filesystems without export operations have those too.
_AT_HANDLE_FID = 0x200


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def handle_key(handle_type: int, handle: bytes) -> int:
    """fastopen.c's ``dh_handle_key``: FNV-1a over the type (4 bytes, little-endian) and the
    handle, never 0 (0 means "not a handle" to the C counter)."""
    h = _FNV_OFFSET
    for byte in struct.pack("<I", handle_type & 0xFFFFFFFF) + handle:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h or 1


class _Handles:
    """``name_to_handle_at`` with one reused buffer; the flags the kernel takes are found once."""

    def __init__(self) -> None:
        self._fh = _FileHandle()
        self._mount_id = ctypes.c_int()
        self._flags = _AT_HANDLE_FID

    def of(self, path: str) -> tuple[int, bytes]:
        fh = self._fh
        while True:
            fh.handle_bytes = MAX_HANDLE
            if _libc.name_to_handle_at(_AT_FDCWD, os.fsencode(path), ctypes.byref(fh),
                                       ctypes.byref(self._mount_id), self._flags) == 0:
                return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])
            err = ctypes.get_errno()
            if err == errno.EINVAL and self._flags:  # a kernel before AT_HANDLE_FID
                self._flags = 0
                continue
            raise OSError(err, f"name_to_handle_at {path}: {os.strerror(err)}")


@dataclass
class HandleSizes:
    """Sizes by handle key: sorted ``keys`` and their ``sizes`` (for the C counter), plus
    entries added later (a relinked file is a new inode) in ``extra``."""

    keys: array = field(default_factory=lambda: array("Q"))
    sizes: array = field(default_factory=lambda: array("Q"))
    extra: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of_files(cls, files: Iterable[tuple[str, int]]) -> HandleSizes:
        """The table of ``files`` (path, size); two links of one inode are one key. The key is
        computed in C where the native part is loaded. Measured (20,000 files in one directory):
        ``name_to_handle_at`` 13 us a file (``stat`` 7.5), the key in Python 4 us more."""
        handles = _Handles()
        lib = fastopen.load()
        key = (lambda t, h: fastopen.handle_key(lib, t, h)) if lib is not None else handle_key
        return cls.of_keys({key(*handles.of(path)): size for path, size in files})

    @classmethod
    def of_keys(cls, sizes_by_key: dict[int, int]) -> HandleSizes:
        table = cls()
        for key, size in sorted(sizes_by_key.items()):
            table.keys.append(key)
            table.sizes.append(size)
        return table

    def learn(self, path: str, size: int) -> None:
        self.extra[handle_key(*_Handles().of(path))] = size

    def sizes_of(self, keys: set[int]) -> dict[int, int]:
        found: dict[int, int] = {}
        for key in keys:
            i = bisect.bisect_left(self.keys, key)
            if i < len(self.keys) and self.keys[i] == key:
                found[key] = self.sizes[i]
            elif key in self.extra:
                found[key] = self.extra[key]
        return found


class DirectOpens:
    """The open watch over the published tree, counting each open with ``on_open(nbytes, pid)``
    (``Counters.add_unobserved_hit``, as kernel opens)."""

    def __init__(self, on_open: Callable[[int, int], None]) -> None:
        self._on_open = on_open
        self._watch: OpenWatch | None = None
        self._table = HandleSizes()
        #: How the tree's opens are counted ("fanotify by file id, in C"), or why they are not.
        self.how = "not yet: no tree is served"

    def start(self, tree: str, files: Iterable[tuple[str, int]], dirs: list[str]) -> None:
        """Watch ``tree`` (``files``: path and size of each file in it; ``dirs``: its directories
        relative to it, "" for itself). Called before the tree is bound; never raises: a tree
        that cannot be watched is served uncounted, and ``how`` says why."""
        self.stop()
        if len(dirs) > MAX_DIR_MARKS:
            self.how = f"not counted: more than {MAX_DIR_MARKS:,} directories to mark"
            return
        try:
            table = HandleSizes.of_files(files)
        except OSError as exc:
            self.how = f"not counted: {exc}"
            log.warning("opens of the direct tree are not counted: %s", exc)
            return
        lib = fastopen.load()
        native = fastopen.TableCounter(lib, table.keys, table.sizes) if lib is not None else None
        watch = OpenWatch(tree, self._on_open, dirs=lambda: dirs, sizes=self._sizes, native=native,
                          key_of=handle_key, by_descriptor=False)
        self._table = table
        try:
            watch.start()
        except OSError as exc:
            self.how = f"not counted: fanotify refused ({exc})"
            log.warning("opens of the direct tree are not counted: %s", exc)
            return
        self._watch = watch
        self.how = "fanotify by file id, " + ("in C" if native is not None else
                                              f"in Python ({fastopen.unavailable})")
        log.info("opens of the direct tree %s are counted (%s, %d files)", tree, self.how, len(table.keys))

    def _sizes(self, keys: set[int]) -> dict[int, int]:
        return self._table.sizes_of(keys)

    def learn(self, path: str, size: int) -> None:
        """A file relinked into the watched tree (a repair): a new inode, a new key."""
        try:
            self._table.learn(path, size)
        except OSError as exc:
            log.warning("opens of %s will not be counted: %s", path, exc)

    def drain(self) -> None:
        """Count what is queued now (before a stats snapshot)."""
        if self._watch is not None:
            self._watch.drain()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.drain()
            self._watch.stop()
            self._watch = None


__all__ = ["DirectOpens", "HandleSizes", "handle_key"]
