"""The read-only FUSE view of a dataset: a thin adapter over the index and the dataset cache.

Choices that make warm reads cheap, each because the data is immutable for the life of a mount:

* entry and attribute timeouts of an hour: after the first ``stat`` of a path the kernel answers
  lookups itself, so metadata costs one trip to this process per file per mount;
* ``keep_cache`` on every open of a fully cached file: the kernel keeps its page cache across
  opens, so a second epoch reads from memory without reaching this process at all.

That second choice hides reads from the worker, and the hit ratio must stay true, so an open of
a *fully cached* file of at most ``whole_file_max`` bytes (one chunk; small files are read whole
by training loaders) counts the whole file as served from cache right there: whatever the
kernel then serves from its page cache it could only have had from this cache. Reads of such a
handle that do reach the worker (the kernel dropped its copy) are already paid for and are not
counted again; if one turns out to need the source (the file was evicted since), its bytes move
from the cache column to the source column. Large files are opened without ``keep_cache`` so
every byte read reaches the worker and is counted exactly. The remaining inexactness: a program
that opens a small cached file and reads only part of it, or none, is counted as having read
all of it.

So a warm epoch costs each file an ``open`` in this process, a few dictionary operations, and a
``release`` that finds nothing to free (``flush`` is not implemented, and the kernel stops
sending it). Most of that cost is libfuse, the kernel's wake-ups and taking the GIL (see
``fusebind`` for the thread states libfuse's threads keep).

Once a dataset whose files are all small is fully cached, even those trips go:
:meth:`DatasetView.serve_opens_in_kernel` answers ``open`` with ENOSYS, after which the kernel
opens files itself (keeping their page cache) and sends neither ``open`` nor ``release``; the
counts ``open`` made are then made from fanotify events (``open_watch``), and a warm epoch costs
this process nothing.

A slow store must not freeze the view. libfuse runs every request (lookups, ``getattr``,
``readdir``, reads of cached data, reads that miss) on one pool of threads, 10 by default, and
the kernel queues reads it sends ahead (``max_background``, 12 by default) behind the same few:
ten reads stuck on a silent store used to leave ``stat`` and reads of cached files waiting for
minutes. So the pool and the kernel's background queue are sized to ``max_waiting_reads``
(reads that may wait on the source, ``DatasetCache``) plus :data:`RESERVE_THREADS` that never
wait on it, a read waits ``read_wait`` seconds at most for its fetch (which runs on a fetcher
thread), and a miss beyond ``max_waiting_reads`` fails at once: metadata and cache hits always
find a free thread. A read that cannot be answered from the source in time fails with EIO, as
any other source failure does, and the log names the object.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from .counters import Counters
from .dataset import DatasetCache, ReadState
from .fusebind import FuseOSError, Operations
from .index import DirEntry, Index
from .open_watch import OpenWatch

log = logging.getLogger(__name__)

#: Seconds the kernel may trust names and attributes: the view is immutable while mounted.
METADATA_TIMEOUT = 3600
MAX_READ = 1 << 20
#: libfuse threads beyond those that may wait on the source: they answer metadata and cache
#: hits while every other thread waits on a slow store.
RESERVE_THREADS = 16
#: Bound on remembered lookups and fully cached paths (about 200 bytes each).
_RECENT_MAX = 1 << 16
#: The handle of an open that counted its whole file as a hit: its reads are prepaid.
PREPAID_FH = 0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def mount_options(fsname: str, allow_other: bool = True, max_waiting_reads: int = 64) -> dict:
    """Options for ``FUSE(...)``: read-only, shared with other users, long metadata caching,
    and enough libfuse threads for ``max_waiting_reads`` reads stuck on the source plus the
    reserve (libfuse >= 3.12 reads ``max_threads`` from the options; older ones have no cap)."""
    options = {
        "ro": True,
        "fsname": fsname,
        "subtype": "datahoard",
        "entry_timeout": METADATA_TIMEOUT,
        "attr_timeout": METADATA_TIMEOUT,
        "negative_timeout": METADATA_TIMEOUT,
        # Data reads in 1 MiB requests: fewer round trips to Python per large file.
        "max_read": MAX_READ,
        "default_permissions": True,
        "max_threads": max_waiting_reads + RESERVE_THREADS,
    }
    if allow_other:
        options["allow_other"] = True
    return options


class DatasetView(Operations):
    use_ns = True

    def __init__(
        self,
        index: Index,
        cache: DatasetCache,
        counters: Counters,
        mountpoint: str,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.index = index
        self.cache = cache
        self.counters = counters
        self._on_ready = on_ready
        self._handles: dict[int, ReadState] = {}
        self._next_fh = itertools.count(1)
        self._uid, self._gid = os.getuid(), os.getgid()
        self._mtime_ns = int(index.summary.built_at * 1e9)
        self._recent: dict[str, object] = {}
        #: Paths of small files found fully cached, with their entries: later opens of them
        #: take the short path in ``open``.
        self._kept: dict[str, object] = {}
        #: Set by :meth:`serve_opens_in_kernel`: opens are answered ENOSYS, counted by fanotify.
        self.kernel_opens = False
        self._open_watch: OpenWatch | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def init_with_config(self, conn, config) -> None:
        """Called by libfuse while the kernel handshake completes.

        libfuse3 insists that the connection's ``max_read`` equals the ``max_read`` mount
        option, so it is set here too. Readiness is reported from a thread that waits for the
        mount to appear: the handshake can still fail after this callback returns.
        """
        if conn is not None and hasattr(conn, "max_read"):
            conn.max_read = MAX_READ
        if conn is not None and hasattr(conn, "max_background"):
            # Reads the kernel sends ahead wait in this queue: it must hold every read that may
            # wait on the source and still have room for reads of cached data.
            background = self.cache.tuning.max_waiting_reads + RESERVE_THREADS
            conn.max_background = max(conn.max_background, background)
            conn.congestion_threshold = max(conn.congestion_threshold, background * 3 // 4)
        if self._on_ready:
            threading.Thread(target=self._report_ready, name="ready", daemon=True).start()

    def _report_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint):
                self._on_ready()
                return
            time.sleep(0.01)
        log.error("the FUSE view did not appear at %s", self.mountpoint)

    # -- metadata --------------------------------------------------------------------------
    def _lookup(self, path: str):
        # The kernel looks a path up (getattr) and then opens it: remember the answer so the
        # open does not query the index again. Entries never change while mounted.
        entry = self._recent.get(path)
        if entry is None:
            entry = self.index.lookup(path[1:])
            if entry is None:
                raise FuseOSError(errno.ENOENT)
            if len(self._recent) >= _RECENT_MAX:
                self._recent.clear()
            self._recent[path] = entry
        return entry

    def getattr(self, path: str, fh: int | None = None) -> dict:
        entry = self._lookup(path)
        if isinstance(entry, DirEntry):
            return {
                "st_mode": stat.S_IFDIR | 0o555,
                "st_nlink": 2,
                "st_uid": self._uid,
                "st_gid": self._gid,
                "st_mtime": self._mtime_ns,
                "st_ctime": self._mtime_ns,
                "st_atime": self._mtime_ns,
            }
        mtime = int(entry.mtime * 1e9)
        return {
            "st_mode": stat.S_IFREG | 0o444,
            "st_nlink": 1,
            "st_size": entry.size,
            "st_blocks": -(-entry.size // 512),
            "st_blksize": 1 << 20,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_mtime": mtime,
            "st_ctime": mtime,
            "st_atime": mtime,
        }

    def readdir(self, path: str, fh: int):
        entry = self._lookup(path)
        if not isinstance(entry, DirEntry):
            raise FuseOSError(errno.ENOTDIR)
        yield "."
        yield ".."
        for name, is_dir in self.index.listdir(entry.path):
            yield name, {"st_mode": stat.S_IFDIR if is_dir else stat.S_IFREG}, 0

    def statfs(self, path: str) -> dict:
        block = 4096
        return {
            "f_bsize": block,
            "f_frsize": block,
            "f_blocks": -(-self.index.total_bytes // block),
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": self.index.files,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    def access(self, path: str, amode: int) -> int:
        self._lookup(path)
        if amode & os.W_OK:
            raise FuseOSError(errno.EROFS)
        return 0

    # -- data ------------------------------------------------------------------------------
    # open runs once per file in every epoch, the reads of a warm epoch do not run at all
    # (keep_cache): it is kept to a few dictionary operations. No lock: taking a handle number
    # from an itertools counter and inserting or popping one key are atomic under the GIL.
    def open(self, path: str, fi) -> int:
        if fi.flags & _WRITE_FLAGS:
            raise FuseOSError(errno.EROFS)
        if self.kernel_opens:
            # The kernel remembers this answer for the whole connection: no open or release
            # of any file reaches this process again (see serve_opens_in_kernel).
            raise FuseOSError(errno.ENOSYS)
        entry = self._kept.get(path)
        if entry is None:
            entry = self._lookup(path)
            if isinstance(entry, DirEntry):
                raise FuseOSError(errno.EISDIR)
            if not (entry.size <= self.cache.tuning.whole_file_max and self.cache.is_cached(entry)):
                fh = next(self._next_fh)
                self._handles[fh] = ReadState(entry)
                fi.fh = fh
                return 0
            if len(self._kept) >= _RECENT_MAX:
                self._kept.clear()
            self._kept[path] = entry
        # A fully cached small file: keep the kernel's page cache and count the file now. Stale
        # after an eviction, which is harmless: the kernel then asks for the bytes and a read
        # that needs the source says so (see read).
        self.counters.add_unobserved_hit(entry.size)
        fi.keep_cache = 1
        fi.fh = PREPAID_FH
        return 0

    def serve_opens_in_kernel(self) -> None:
        """Stop taking opens: the kernel opens files itself, and fanotify counts the opens.

        Only for a fully cached dataset whose every file is at most ``whole_file_max`` bytes: for
        such a dataset the counts stay exactly what ``open`` makes (each open of a cached small
        file counts the file; reads that reach the worker are prepaid), while a warm epoch stops
        costing any trip to this process. Raises OSError (nothing changed) where fanotify is not
        allowed. The watch is started first, so an open that races the switch can be counted
        twice, never missed; that is at most the opens in flight at that instant.
        """
        watch = OpenWatch(self.mountpoint, self.counters.add_unobserved_hit)
        watch.start()
        self._open_watch = watch
        self.kernel_opens = True

    def drain_opens(self) -> None:
        """Count the opens the kernel has queued (before a stats snapshot)."""
        if self._open_watch is not None:
            self._open_watch.drain()

    def destroy(self, path: str) -> None:
        if self._open_watch is not None:
            self._open_watch.stop()

    def read(self, path: str, size: int, offset: int, fi) -> bytes:
        prepaid = fi.fh == PREPAID_FH
        if prepaid:  # a cached small file: one chunk, so no read-ahead state to keep
            state = ReadState(self._lookup(path))
        else:
            state = self._handles.get(fi.fh)
            if state is None:
                raise FuseOSError(errno.EBADF)
        try:
            return self.cache.read(state, offset, size, prepaid=prepaid, bounded=True)
        except Exception as exc:  # noqa: BLE001 - any failure is EIO, never wrong bytes
            self._fail(state, exc)

    def _fail(self, state: ReadState, exc: Exception) -> None:
        message = f"read of {state.obj.key} failed: {exc}"
        log.error(message)
        log.debug("traceback", exc_info=True)
        self.counters.add_error(message)
        raise FuseOSError(errno.EIO) from exc

    def release(self, path: str, fi) -> int:
        self._handles.pop(fi.fh, None)
        return 0

    # -- everything that would write -------------------------------------------------------
    def _read_only(self, *args, **kwargs):
        raise FuseOSError(errno.EROFS)

    create = mkdir = mknod = unlink = rmdir = symlink = rename = link = _read_only
    chmod = chown = truncate = write = utimens = setxattr = removexattr = _read_only

