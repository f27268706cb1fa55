"""The read-only view of a dataset on the low-level FUSE protocol (``fusell``).

What the view promises, and how:

* **Node ids and handles mean the same thing in the next process.** A directory's node id is
  its id in the index (the root is 1, as FUSE wants), a file's is :data:`FILE_BASE` plus its
  rowid in the index; the index is immutable for the life of a mount, so a worker that resumes
  the connection after a restart answers the kernel's old ids correctly. A file handle carries
  what a read needs to know up front (:data:`PREPAID` in its low bit); everything else a handle
  remembers (where a sequential reader is, for read-ahead) is rebuilt from the node id when a
  read arrives with a handle this process never gave out.
* **Passthrough.** An open of a file that is whole and verified in the cache (one backing file,
  ``ChunkStore``) is answered with ``FOPEN_PASSTHROUGH`` on that file: every read of it is then
  a kernel read of local disk that never reaches this process, and keeps working while no
  worker runs at all. The kernel's rules (one backing file per inode while it is open in
  passthrough; an inode open for cached I/O refuses passthrough opens and the other way round)
  are kept by ``fusell.passthrough.BackingTable``, which survives restarts with the connection.
  A file not yet whole is served by this process as before (``DatasetCache.read``).
* **Hit accounting stays true.** Whatever the kernel serves without asking us was counted when
  the file was opened: an open that is answered from the cache (passthrough, or ``keep_cache``
  where passthrough is not available) counts the whole file as served from cache, at open. For a
  small file (at most one chunk) that is exact for the way loaders read (whole files). For a
  large file passed through it means: **a passed-through open of a large file counts the whole
  file as a hit, however little of it the reader then reads** (README says so); a large file
  that is not whole in the cache is counted read by read, exactly. Reads of a prepaid handle that
  do reach us (the kernel dropped its copy) are not counted again; bytes they had to fetch move
  from the cache column to the source column.
* Everything else as before: read-only (every write-type request is EROFS, in ``fusell``),
  hour-long entry and attribute timeouts for immutable data, bounded reads (``DatasetCache``:
  a read waits at most ``read_wait`` for the source; the session runs ``max_waiting_reads``
  plus :data:`RESERVE_THREADS` threads so metadata and hits always find one free).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import stat
import threading
from collections.abc import Iterable

from .counters import Counters
from .dataset import DatasetCache, ReadState
from .fusell.passthrough import BackingTable
from .fusell.session import Attr, Context, DirItem, Entry, Filesystem, FuseError, Opened, StatFs
from .index import Index
from .open_watch import OpenWatch
from .source import RemoteObject
from .store import ChunkStore, object_id

log = logging.getLogger(__name__)

#: Seconds the kernel may trust names and attributes: the view is immutable while mounted.
METADATA_TIMEOUT = 3600.0
MAX_READ = 1 << 20
#: Session threads beyond those that may wait on the source.
RESERVE_THREADS = 16
#: Files' node ids start here; directories' are their index ids (far below).
FILE_BASE = 1 << 48
#: Bits of a file handle (the rest is a serial number): the open counted the whole file as a
#: hit already; the open was answered with passthrough. Handle 0 is the kernel's own, for reads
#: of files it opened itself (``serve_opens_in_kernel``): prepaid by fanotify's count.
PREPAID = 1
PASSED = 2
_SERIAL_SHIFT = 2
#: Bound on remembered objects (node id -> object), about 200 bytes each.
_KNOWN_MAX = 1 << 16
#: Backing ids kept registered after their file's last release (fusell/passthrough.py): each
#: holds the kernel's reference to one cache file (no descriptor of ours) until the file is
#: evicted or changed, or more recently released ones push it out.
KEPT_BACKING_IDS = 4096
#: Bound on remembered small files opened for the page cache (``_paged``), about 60 bytes each.
_PAGED_MAX = 1 << 16
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class DatasetFS(Filesystem):
    def __init__(self, index: Index, cache: DatasetCache, counters: Counters, mountpoint: str,
                 backing: BackingTable | None = None) -> None:
        self.index = index
        self.cache = cache
        self.counters = counters
        self.mountpoint = mountpoint
        #: The connection's io modes and backing ids (passthrough), or None: no passthrough, and
        #: then handles are this process's own serials.
        self.backing = backing
        self.passthrough_opens = 0
        self._uid, self._gid = os.getuid(), os.getgid()
        self._dir_time_ns = int(index.summary.built_at * 1e9)
        self._known: dict[int, RemoteObject] = {}
        #: Small files opened for the kernel's page cache (not passed through) in this process,
        #: forgotten at a release while the store cannot take files (full disk). Their next open
        #: keeps the page cache even after the store evicted them: the data is immutable, so
        #: pages the kernel still holds are right, and serving them is a hit.
        #: Dropping them at open (no ``keep_cache``) made RAM useless as a second tier: the load
        #: test (24 MiB cache, 64 MB of data) fell from 3,074 to 357-672 reads/s and its hit
        #: ratio from 0.977 to 0.746 (bench/ANALYSIS.md, 2026-12-06 p-hot).
        self._paged: set[int] = set()
        #: Passthrough: the cache file each backing id was registered for, (object id, signature)
        #: by node id, and back; ids of evicted files are closed by a thread (``_close_gone``).
        self._backed: dict[int, tuple[str, int]] = {}
        self._backed_oids: dict[str, int] = {}
        self._gone: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._gone_thread: threading.Thread | None = None
        if backing is not None:
            backing.retain = KEPT_BACKING_IDS
            backing.on_close = self._backing_closed
            cache.store.on_object_gone = self._object_gone
            self._gone_thread = threading.Thread(target=self._close_gone, name="backing-gone", daemon=True)
            self._gone_thread.start()
        #: Read state by (node id, handle): keyed by the node too, so a handle number a previous
        #: worker also gave out (still open in the kernel) can only ever mean the same file.
        self._handles: dict[tuple[int, int], ReadState] = {}
        self._dir_handles: dict[tuple[int, int], list] = {}
        # Serials start at a random point: a resumed worker's new handles should not repeat the
        # numbers of handles the previous worker gave out (harmless if they do, see _handles).
        self._serial = itertools.count(1 + int.from_bytes(os.urandom(4), "little"))
        self._lock = threading.Lock()
        #: Set by :meth:`serve_opens_in_kernel`: opens are answered ENOSYS, counted by fanotify.
        self.kernel_opens = False
        self._open_watch: OpenWatch | None = None

    # -- ids -------------------------------------------------------------------------------
    def _object(self, nodeid: int) -> RemoteObject:
        obj = self._known.get(nodeid)
        if obj is None:
            if nodeid < FILE_BASE:
                raise FuseError(errno.EISDIR if self.index.dir_path(nodeid) is not None else errno.ENOENT)
            obj = self.index.file(nodeid - FILE_BASE)
            if obj is None:
                raise FuseError(errno.ENOENT)
            self._remember(nodeid, obj)
        return obj

    def _remember(self, nodeid: int, obj: RemoteObject) -> None:
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()
        self._known[nodeid] = obj

    def _dir_attr(self, nodeid: int) -> Attr:
        t = self._dir_time_ns
        return Attr(ino=nodeid, size=0, mode=stat.S_IFDIR | 0o555, nlink=2, uid=self._uid,
                    gid=self._gid, mtime_ns=t, ctime_ns=t, atime_ns=t, blksize=4096, blocks=0)

    def _file_attr(self, nodeid: int, obj: RemoteObject) -> Attr:
        t = int(obj.mtime * 1e9)
        return Attr(ino=nodeid, size=obj.size, mode=stat.S_IFREG | 0o444, nlink=1, uid=self._uid,
                    gid=self._gid, mtime_ns=t, ctime_ns=t, atime_ns=t, blksize=1 << 20,
                    blocks=-(-obj.size // 512))

    def _entry(self, nodeid: int, attr: Attr) -> Entry:
        return Entry(nodeid=nodeid, attr=attr, entry_timeout=METADATA_TIMEOUT, attr_timeout=METADATA_TIMEOUT)

    # -- metadata --------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent >= FILE_BASE:
            raise FuseError(errno.ENOTDIR)
        text = name.decode("utf-8", "surrogateescape")
        child = self.index.child_dir(parent, text)
        if child is not None:
            return self._entry(child, self._dir_attr(child))
        found = self.index.child_file(parent, text)
        if found is None:
            raise FuseError(errno.ENOENT)
        nodeid = FILE_BASE + found[0]
        self._remember(nodeid, found[1])
        return self._entry(nodeid, self._file_attr(nodeid, found[1]))

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Nothing to free: ids are derived from the index, not handed out."""

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        if nodeid < FILE_BASE:
            if self.index.dir_path(nodeid) is None:
                raise FuseError(errno.ENOENT)
            return self._dir_attr(nodeid), METADATA_TIMEOUT
        return self._file_attr(nodeid, self._object(nodeid)), METADATA_TIMEOUT

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        if nodeid >= FILE_BASE:
            raise FuseError(errno.ENOTDIR)
        if self.index.dir_path(nodeid) is None:
            raise FuseError(errno.ENOENT)
        return Opened(fh=next(self._serial) << _SERIAL_SHIFT)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterable[DirItem]:
        items = self._dir_handles.get((nodeid, fh))
        if items is None or offset == 0:
            # Built once per open directory (a handle from a previous process is rebuilt the
            # same: the order is the index's), so a large directory is not re-queried per call.
            items = [(b".", nodeid, stat.S_IFDIR), (b"..", 1, stat.S_IFDIR)]
            for name, is_dir, ident, _obj in self.index.entries(nodeid):
                if is_dir:
                    items.append((name.encode("utf-8", "surrogateescape"), ident, stat.S_IFDIR))
                else:
                    items.append((name.encode("utf-8", "surrogateescape"), FILE_BASE + ident, stat.S_IFREG))
            self._dir_handles[(nodeid, fh)] = items
        for position in range(offset, len(items)):
            name, child, mode = items[position]
            yield DirItem(name=name, nodeid=child, mode=mode, next_offset=position + 1)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        # The session's signature (fusell.filesystem): with an extra ``flags`` parameter every
        # RELEASEDIR failed (a TypeError answered EIO, which the kernel ignores) and each
        # directory's entries stayed here: a walk of 1M files grew the worker by 190 MB
        # (196-220 B per indexed file, bench/ANALYSIS.md).
        self._dir_handles.pop((nodeid, fh), None)

    def statfs(self, ctx: Context, nodeid: int) -> StatFs:
        block = 4096
        return StatFs(blocks=-(-self.index.total_bytes // block), bfree=0, bavail=0,
                      files=self.index.files, ffree=0, bsize=block, namelen=255, frsize=block)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        if nodeid >= FILE_BASE:
            self._object(nodeid)
        elif self.index.dir_path(nodeid) is None:
            raise FuseError(errno.ENOENT)
        if mask & os.W_OK:
            raise FuseError(errno.EROFS)

    # -- data ------------------------------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        if flags & _WRITE_FLAGS:
            raise FuseError(errno.EROFS)
        if self.kernel_opens:
            # The kernel remembers this answer for the whole connection: no open or release
            # of any file reaches this process again (see serve_opens_in_kernel).
            raise FuseError(errno.ENOSYS)
        obj = self._object(nodeid)
        small = obj.size <= self.cache.tuning.whole_file_max
        if self.backing is not None:
            # backing_fd checks the file itself (None unless whole and verified): no index query
            # first. It is called only when the inode has no backing id yet; a kept id is
            # reused while its file is unchanged (still_backing: one stat).
            choice = self.backing.open(nodeid, lambda: self._backing_fd(nodeid, obj),
                                       still=lambda: self._still_backing(nodeid))
            fh = choice.fh << _SERIAL_SHIFT
            if choice.backing_id is not None:
                self.cache.touch(obj)
                self.counters.add_unobserved_hit(obj.size, ctx.pid)
                self.passthrough_opens += 1
                return Opened(fh=fh | PREPAID | PASSED, backing_id=choice.backing_id)
        else:
            fh = next(self._serial) << _SERIAL_SHIFT
        if small and (nodeid in self._paged or self.cache.is_cached(obj)):
            # Small, and whole in the cache or read through this view before: keep the kernel's
            # page cache across opens and count the file now (reads that still reach us are
            # prepaid: bytes they must fetch move to the source column).
            self._page(nodeid)
            self.counters.add_unobserved_hit(obj.size, ctx.pid)
            return Opened(fh=fh | PREPAID, keep_cache=True)
        if small:  # read through this view: its pages may be kept from the next open on
            self._page(nodeid)
        self._handles[(nodeid, fh)] = ReadState(obj)
        return Opened(fh=fh)

    # -- backing ids kept across opens (fusell/passthrough.py) ----------------------------
    def _backing_fd(self, nodeid: int, obj: RemoteObject) -> int | None:
        """The cache file to register for ``nodeid``, remembering which file it was."""
        fd = self.cache.backing_fd(obj)
        if fd is not None:
            oid = object_id(obj.key, obj.etag, obj.size)
            self._backed[nodeid] = (oid, ChunkStore.signature_of(fd))
            self._backed_oids[oid] = nodeid
        return fd

    def _still_backing(self, nodeid: int) -> bool:
        entry = self._backed.get(nodeid)
        return entry is not None and self.cache.store.still_backing(*entry)

    def _backing_closed(self, nodeid: int) -> None:
        """The table closed ``nodeid``'s id (under its lock: dictionary updates only)."""
        entry = self._backed.pop(nodeid, None)
        if entry is not None and self._backed_oids.get(entry[0]) == nodeid:
            del self._backed_oids[entry[0]]

    def _object_gone(self, oid: str) -> None:
        """The store unlinked ``oid``'s file (under its lock): close a kept id for it soon."""
        if oid in self._backed_oids:
            self._gone.put(oid)

    def _close_gone(self) -> None:
        """Closes the ids of files the store evicted, off the store's lock (the table's lock is
        taken before the store's in ``open``). Until it does, the kernel keeps the file's space."""
        while (oid := self._gone.get()) is not None:
            nodeid = self._backed_oids.get(oid)
            if nodeid is not None:
                self.backing.drop(nodeid)

    def _page(self, nodeid: int) -> None:
        """Remember a small file opened for the page cache (see ``_paged``)."""
        paged = self._paged
        if nodeid not in paged:
            if len(paged) >= _PAGED_MAX:
                paged.clear()
            paged.add(nodeid)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        prepaid = fh == 0 or bool(fh & PREPAID)
        state = self._handles.get((nodeid, fh))
        if state is None:
            # A prepaid handle (no state kept), or one a previous worker gave out.
            state = ReadState(self._object(nodeid))
            if not prepaid:
                self._handles[(nodeid, fh)] = state
        try:
            return self.cache.read(state, offset, size, prepaid=prepaid, bounded=True, pid=ctx.pid)
        except Exception as exc:  # noqa: BLE001 - any failure is EIO, never wrong bytes
            message = f"read of {state.obj.key} failed: {exc}"
            log.error(message)
            log.debug("traceback", exc_info=True)
            self.counters.add_error(message)
            raise FuseError(errno.EIO) from exc

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self._handles.pop((nodeid, fh), None)
        if self.cache.store.problem is not None:
            # The store cannot take files (a full disk): whatever this open read may not be
            # cached, so the next open must reach the worker again, to cache it once there is
            # room (see _paged).
            self._paged.discard(nodeid)
        if self.backing is not None:
            self.backing.release(nodeid, fh >> _SERIAL_SHIFT)

    # -- serving modes ---------------------------------------------------------------------
    def serve_opens_in_kernel(self) -> None:
        """Stop taking opens: the kernel opens files itself, and fanotify counts the opens.

        Only for a fully cached dataset whose every file is at most ``whole_file_max`` bytes: for
        such a dataset the counts stay exactly what ``open`` makes (each open of a cached small
        file counts the file; reads that reach the worker are prepaid), while a warm epoch stops
        costing any trip to this process. Raises OSError (nothing changed) where fanotify is not
        allowed. The watch is started first, so an open that races the switch can be counted
        twice, never missed.
        """
        watch = OpenWatch(self.mountpoint, self.counters.add_unobserved_hit)
        watch.start()
        self._open_watch = watch
        self.kernel_opens = True

    def drain_opens(self) -> None:
        """Count the opens the kernel has queued (before a stats snapshot)."""
        if self._open_watch is not None:
            self._open_watch.drain()

    def destroy(self) -> None:
        if self._gone_thread is not None:
            self._gone.put(None)
        if self._open_watch is not None:
            self._open_watch.stop()
