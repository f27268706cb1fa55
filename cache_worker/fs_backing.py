"""Backing ids the dataset's FUSE view keeps across opens (fusell/passthrough_ids.py): which
cache file each id was registered for, whether it is still the one to serve, and closing the
ids of files the store evicted; and the node ids it arms for the native responder
(fusell/passthrough_native.py), with the hits of the opens that answers counted here.
"""

from __future__ import annotations

import logging
import os

from .fs_ids import FILE_BASE
from .index import Index
from .fusell.abi import ROOT_ID
from .fusell.model import FuseError
from .fusell.wire import pack_entry
from .source import RemoteObject
from .store import ChunkStore, object_id
from .store_trust import signature_fields

#: Backing ids kept registered after their file's last release (fusell/passthrough_ids.py): each
#: holds the kernel's reference to one cache file (no descriptor of ours) until the file is
#: evicted or changed, or more recently released ones push it out.
KEPT_BACKING_IDS = 4096
log = logging.getLogger("datahoard.cache_worker.fs")

#: How often opens answered natively are counted and disarmed arms settled, in seconds (a stats
#: snapshot counts them at once: ``drain_opens``).
SETTLE_SECONDS = 0.2


class ViewBacking:
    """The view's side of kept backing ids.
    A part of :class:`.fs.DatasetFS`, which sets up the state in ``__init__``."""

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

    # -- the native responder ------------------------------------------------------------
    def _arm(self, nodeid: int) -> None:
        """Let the native part answer the next opens of ``nodeid``, just passed through by
        Python with the cache file registered in this process (``_backed``: its identity then,
        which the native part checks with a stat at every open, as ``_still_backing`` does)."""
        entry = self._backed.get(nodeid)
        if entry is not None:
            oid, signature = entry
            self.backing.arm(nodeid, self.cache.store.backing_path(oid), signature_fields(signature))

    def arm_ahead(self, stop) -> tuple[int, int]:
        """Arm every file whole in the cache and remember every name, up to the bounds, until
        ``stop`` is set (arm_ahead.py); returns (files armed, names remembered)."""
        native, table = self.native, self.backing
        if native is None or (table is None and not self.kernel_opens):
            return 0, 0  # without passthrough, only reads of files the kernel opened are native
        armed = names = 0
        name_room = native.NAMES * 3 // 4
        index = self.index  # a refresh (take_index) ends the run: its own event starts the next
        if table is None:
            self._disarm_reads_gone_from(index)
        dirs = [ROOT_ID]
        while dirs and not stop.is_set():
            parent = dirs.pop()
            for name, is_dir, ident, obj in index.entries(parent):
                if stop.is_set() or self.index is not index:
                    return armed, names
                if is_dir:
                    dirs.append(ident)
                if names < name_room:
                    raw = name.encode("utf-8", "surrogateescape")
                    epoch = native.names_epoch()
                    native.remember(epoch, parent, raw, pack_entry(self.lookup(None, parent, raw)))
                    names += 1
                if is_dir:
                    continue
                if table is None:
                    armed += self._arm_reads(FILE_BASE + ident, obj)
                elif table.armed_count() < table.slots and self._arm_ahead(FILE_BASE + ident, obj):
                    armed += 1
        return armed, names

    def _arm_reads(self, nodeid: int, obj: RemoteObject) -> bool:
        """Without passthrough, with kernel opens: let the native part answer the reads of
        ``nodeid`` (handle 0: the kernel opened it) from its cache file, whole and verified now,
        while that file keeps its identity (fastopen.c checks it on the descriptor it reads).
        Why: a read that misses the page cache (after a reboot, or memory pressure) cost about
        500 us of worker CPU per small file in Python. Bounded by the arms the node's memory
        allows, like passthrough's; no hit to count, fanotify counted the open."""
        if nodeid in self._read_armed or len(self._read_armed) >= self._read_arms:
            return False
        fd = self.cache.backing_fd(obj)  # None unless whole and verified
        if fd is None:
            return False
        try:
            identity = signature_fields(ChunkStore.signature_of(fd))
        finally:
            os.close(fd)
        path = self.cache.store.backing_path(object_id(obj.key, obj.etag, obj.size))
        if not self.native.arm(nodeid, -1, 0, path, identity):
            return False
        self._read_armed.add(nodeid)
        return True

    def _disarm_reads_gone_from(self, index: Index) -> int:
        """Disarm the reads of files a refresh removed or replaced (their ids are not in
        ``index``), so that they do not hold arms the bound keeps for files still listed. An
        arm of such a file was never wrong (the native part reads only the verified cache file
        of the version the id names, and a descriptor opened before the refresh reads that
        version), but without this, after enough refreshes near the bound, new files were not
        armed and their reads went to Python. Runs in the arming thread, the only one that
        arms reads; a read of a disarmed id goes to Python, which reads the same version."""
        armed = {nodeid - FILE_BASE for nodeid in self._read_armed}
        gone = armed - set(index.file_sizes(armed))
        for ident in gone:
            self.native.disarm(FILE_BASE + ident)
            self._read_armed.discard(FILE_BASE + ident)
        return len(gone)

    def armed_count(self) -> int:
        """Files whose opens (passthrough) or reads (kernel opens) the native part answers."""
        if self.backing is not None:
            return self.backing.armed_count() if self.native is not None else 0
        return len(self._read_armed)

    def close_native_reads(self) -> None:
        """Free the native part of a view without passthrough (no session thread may be in it)."""
        native, self.native = self.native, None
        if self.backing is None and native is not None:
            native.close()
            if self._read_counts is not None:
                self._read_counts.close()
                self._read_counts = None

    def _arm_ahead(self, nodeid: int, obj: RemoteObject) -> bool:
        """What answering an open of ``nodeid`` with passthrough does to the table, with no
        reader: an open registered and armed, then released (the arm keeps the id)."""
        table = self.backing
        if table.is_armed(nodeid) or not self.cache.is_cached(obj):
            return False
        choice = table.open(nodeid, lambda: self._backing_fd(nodeid, obj), still=lambda: self._still_backing(nodeid))
        try:
            if choice.backing_id is not None:
                self._arm(nodeid)
            return table.is_armed(nodeid)
        finally:
            table.release(nodeid, choice.fh)

    def count_native_opens(self) -> int:
        """Count the hits of the opens the native part answered since the last call: each is a
        passthrough open, counted as ``open`` counts one (the whole file, at open, for the
        reader's pod), and keeps the file recently used in the store."""
        native = self.native
        if native is None:
            return 0
        opens = native.drain()
        if not opens:
            return 0
        seen: dict[int, RemoteObject | None] = {}
        for nodeid, pid in opens:
            if nodeid not in seen:
                try:
                    seen[nodeid] = obj = self._object(nodeid)
                except FuseError:
                    seen[nodeid] = None
                    continue
                self.cache.touch(obj)
            obj = seen[nodeid]
            if obj is not None:
                self.counters.add_unobserved_hit(obj.size, pid)
        self.passthrough_opens += len(opens)
        self.backing.used(seen)
        return len(opens)

    def stop_counting(self) -> None:
        """Count what is left and stop the counting thread: before the backing table (and with
        it the native part's state) is closed."""
        self._native_stop.set()
        if self._native_thread is not None:
            self._native_thread.join(timeout=10)
            self._native_thread = None
        self.count_native_opens()

    def _count_native(self) -> None:
        while not self._native_stop.wait(SETTLE_SECONDS):
            try:
                self.count_native_opens()
                self.backing.settle()
            except Exception:  # noqa: BLE001 - the thread must go on: opens are counted here
                log.error("counting native opens failed", exc_info=True)
