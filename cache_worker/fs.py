"""The read-only view of a dataset on the low-level FUSE protocol (``fusell``).

What the view promises, and how (each promise is kept by the part of the view named with it):

* **Node ids and handles mean the same thing in the next process** (:mod:`.fs_ids`).
* **Passthrough** of files whole and verified in the cache, and **hit accounting that stays
  true** (:mod:`.fs_data`), with backing ids kept across opens (:mod:`.fs_backing`).
* Opens of armed files, their releases, and LOOKUPs answered before, answered natively
  (fusell/fastopen.c), with their hits counted here (:mod:`.fs_backing`).
* Names, attributes and listings from the immutable index (:mod:`.fs_meta`).
* Everything else as before: read-only (every write-type request is EROFS, in ``fusell``),
  hour-long entry and attribute timeouts for immutable data, bounded reads (``DatasetCache``:
  a read waits at most ``read_wait`` for the source; the session runs ``max_waiting_reads``
  plus :data:`RESERVE_THREADS` threads so metadata and hits always find one free).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import queue
import threading

from .counters import Counters
from .dataset import DatasetCache, ReadState
from .fs_backing import KEPT_BACKING_IDS, ViewBacking
from .fs_data import ViewData
from .fs_ids import FILE_BASE, ViewIds
from .fs_meta import ViewMetadata
from .fusell import fastopen
from .fusell.fastopen import NativeOpens
from .fusell.filesystem import Filesystem
from .fusell.passthrough import BackingTable
from .index import Index
from .open_watch import OpenWatch
from .source import RemoteObject

log = logging.getLogger(__name__)

MAX_READ = 1 << 20
#: Session threads beyond those that may wait on the source.
RESERVE_THREADS = 16
#: Kernel opens are counted by file id (one fanotify inode mark per directory, open_watch.py)
#: up to this many directories; each mark pins its directory's inode and dentry, about 1.5 KB
#: of kernel memory. Beyond it they are counted through descriptors (slower per open).
MAX_DIR_MARKS = 1 << 16


class DatasetFS(ViewMetadata, ViewData, ViewBacking, ViewIds, Filesystem):
    """The dataset's FUSE view (module docstring); the request methods are in the parts named
    there, this class holds the state they share and the serving modes."""

    #: Names change only with the index (``take_index``, which tells the native part).
    names_immutable = True

    def __init__(self, index: Index, cache: DatasetCache, counters: Counters, mountpoint: str,
                 backing: BackingTable | None = None, previous: Index | None = None,
                 conn_fd: int | None = None, arms: int = 0) -> None:
        self.index = index
        #: The index a refresh replaced (``take_index``, or a restart onto another snapshot), for
        #: ids only it knows.
        self._previous: Index | None = previous
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
        #: The native OPEN/RELEASE responder (fastopen.py) the session runs, or None and why.
        self.native: NativeOpens | None = None
        self.native_note: str | None = "no passthrough"
        self._native_stop = threading.Event()
        self._native_thread: threading.Thread | None = None
        if backing is not None:
            backing.retain = KEPT_BACKING_IDS
            backing.on_close = self._backing_closed
            cache.store.on_object_gone = self._object_gone
            self._gone_thread = threading.Thread(target=self._close_gone, name="backing-gone", daemon=True)
            self._gone_thread.start()
            lib = fastopen.load()
            if lib is None:
                self.native_note = fastopen.unavailable
            else:
                self.native, self.native_note = backing.start_native(lib, backing.conn.fd), None
            # Also without the native part: arms a previous worker left are settled here.
            self._native_thread = threading.Thread(target=self._count_native, name="native-opens", daemon=True)
            self._native_thread.start()
        #: Without passthrough: the native part answers reads of files the kernel opened itself
        #: (kernel opens) from their cache files, up to ``arms`` files (fs_backing.arm_reads).
        self._read_counts: mmap.mmap | None = None
        self._read_armed: set[int] = set()
        self._read_arms = arms
        if backing is None and conn_fd is not None and arms > 0:
            lib = fastopen.load()
            if lib is None:
                self.native_note = fastopen.unavailable
            else:
                self._read_counts = mmap.mmap(-1, 8 * arms)  # no opens are answered: unused counts
                self.native, self.native_note = NativeOpens(lib, conn_fd, self._read_counts, arms), None
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
        if (os.environ.get("DATAHOARD_OPEN_WATCH") == "descriptors"
                or len(self.index.dir_paths()) > MAX_DIR_MARKS):
            watch = OpenWatch(self.mountpoint, self.counters.add_unobserved_hit)
        else:
            native = self.native
            watch = OpenWatch(self.mountpoint, self.counters.add_unobserved_hit,
                              dirs=lambda: self.index.dir_paths(), sizes=self._file_sizes,
                              native=native.count_fanotify if native is not None else None)
        watch.start()
        self._open_watch = watch
        self.kernel_opens = True

    def watch_new_dirs(self) -> None:
        """After a refresh has swapped the index and dropped stale names: mark the directories
        it added, so opens of files in them are counted too (kernel opens by file id)."""
        watch = self._open_watch
        if watch is None:
            return
        try:
            added = watch.mark_new_dirs()
        except OSError as exc:  # the counts of opens there would be missing: say so
            log.warning("opens in directories the refresh added are not counted: %s", exc)
            return
        if added:
            log.info("counting opens in %d directories the refresh added", added)

    @property
    def open_watch_mode(self) -> str:
        """How kernel opens are counted: "file ids", "descriptors", or "" (not at all)."""
        return self._open_watch.mode if self._open_watch is not None else ""

    def _file_sizes(self, nodes: set[int]) -> dict[int, int]:
        """Size by node id for the opens fanotify reported (kernel opens): the index's, or the
        one a refresh replaced for a file only it has (opened just before the refresh)."""
        index, previous = self.index, self._previous
        found = index.file_sizes(n - FILE_BASE for n in nodes if n >= FILE_BASE)
        sizes = {i + FILE_BASE: size for i, size in found.items()}
        if previous is not None and len(sizes) < len(nodes):
            rest = [n - FILE_BASE for n in nodes if n >= FILE_BASE and n not in sizes]
            sizes.update((i + FILE_BASE, size) for i, size in previous.file_sizes(rest).items())
        return sizes

    def drain_opens(self) -> None:
        """Count the opens the kernel (fanotify) or the native responder has queued (before a
        stats snapshot)."""
        if self._open_watch is not None:
            self._open_watch.drain()
        self.count_native_opens()

    def destroy(self) -> None:
        self._native_stop.set()
        if self._gone_thread is not None:
            self._gone.put(None)
        if self._open_watch is not None:
            self._open_watch.stop()
