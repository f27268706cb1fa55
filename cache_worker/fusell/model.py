"""The values a :class:`~datahoard.cache_worker.fusell.filesystem.Filesystem` hands the session.

Plain dataclasses, packed into the kernel's structs by the session. Times are integer
nanoseconds (the kernel keeps them split into seconds and nanoseconds; INIT asks for a 1 ns
``time_gran``), timeouts are float seconds.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
from dataclasses import dataclass, field
from typing import NamedTuple


class FuseError(Exception):
    """Raise from a handler to answer the request with ``-errno``."""

    def __init__(self, errno: int, message: str = ""):
        super().__init__(errno, message or os.strerror(errno))
        self.errno = errno


def enosys() -> FuseError:
    return FuseError(_errno.ENOSYS)


@dataclass(slots=True)
class Attr:
    ino: int
    size: int = 0
    mode: int = stat.S_IFREG | 0o444
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    atime_ns: int = 0
    blksize: int = 4096
    blocks: int | None = None  # 512-byte blocks; None: derived from size


@dataclass(slots=True)
class Entry:
    """A LOOKUP answer; each one adds 1 to the kernel's lookup count of ``nodeid`` (see forget)."""

    nodeid: int
    attr: Attr
    generation: int = 0
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0


@dataclass(slots=True)
class Opened:
    """An OPEN/OPENDIR answer. ``backing_id`` set: FOPEN_PASSTHROUGH on that backing id (the
    kernel refuses KEEP_CACHE with it, so keep_cache is dropped then; see passthrough.py)."""

    fh: int = 0
    keep_cache: bool = False
    direct_io: bool = False
    backing_id: int | None = None
    noflush: bool = True
    cache_dir: bool = False  # OPENDIR only: let the kernel cache the listing


@dataclass(slots=True)
class DirItem:
    """One directory entry. ``next_offset`` is what READDIR passes back to continue after it.
    ``entry`` is used by READDIRPLUS (it then counts as a lookup of ``nodeid``); without it the
    kernel gets a plain entry and looks the name up itself."""

    name: bytes
    nodeid: int
    mode: int
    next_offset: int
    entry: Entry | None = None


@dataclass(slots=True)
class StatFs:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


class Context(NamedTuple):
    """Who asked. A NamedTuple: one is built per request, and it is 3x cheaper to build than a
    frozen dataclass."""

    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@dataclass(slots=True)
class ConnInfo:
    """What ``Filesystem.init`` sees: the kernel's offer and what was agreed."""

    kernel_minor: int
    kernel_flags: int
    state: "InitState"  # noqa: F821 (defined in state.py; imported lazily to keep this leaf)
    extra: dict = field(default_factory=dict)
