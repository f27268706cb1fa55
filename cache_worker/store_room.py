"""When the cache disk refuses writes (full or failing) and when it has room again.

The disk may fill or fail under a running worker (another writer on a shared volume): then
``put`` (the ``pwrite``, the ``write`` or the record) raises :class:`CacheFull` and the caller
reads through, recency updates stay in memory, reads of chunks already here go on, and
:attr:`ChunkStore.problem` says why until the disk has room again (a fill succeeds and the
filesystem has :data:`_ROOM_FRACTION` free). A damaged or unopenable ``chunks.db`` is handled at
start (``chunk_db``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

from .chunk_db import is_damage, is_disk_full

log = logging.getLogger("datahoard.cache_worker.store")  # one log for the store, as before the split

#: After a fill failed for want of space, fills read through for this long before trying again.
_FULL_RETRY_SECONDS = 1.0

#: The disk counts as having room again when this fraction of it is free (at most 64 MiB).
_ROOM_FRACTION = 0.05
_ROOM_MAX = 64 << 20


class StoreRoom:
    """Disk-full and failing-record handling.
    A part of :class:`.store.ChunkStore`, which sets up the state in ``__init__``."""

    def _write_failed(self, what: str, exc: BaseException) -> None:
        """The disk refused a write: fills read through until it has room again."""
        if is_damage(exc):
            self._record_failed(exc)
            return
        reason = "full" if is_disk_full(exc) else "failing"
        message = f"cache disk is {reason} at {self.root} ({what}: {exc})"
        if self._full is None:
            log.error(message)
        self._full = message
        self._full_retry_at = time.monotonic() + _FULL_RETRY_SECONDS

    def _record_failed(self, exc: BaseException) -> None:
        """The record went bad under us: stop caching; the next start replaces it (chunk_db)."""
        if self._record_problem is None:
            self._record_problem = (f"the cache record {self.root / 'chunks.db'} failed ({exc}): reading "
                                    "through to the source without caching; restart the worker to rebuild it")
            log.error(self._record_problem)
        self._read_through = True

    def _room_again(self) -> bool:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= min(_ROOM_MAX, st.f_blocks * st.f_frsize * _ROOM_FRACTION)

    def recheck_room(self) -> bool:
        """While fills read through for want of space: look for room now, without waiting for a
        fill; True if caching resumes with this call.

        Recovery used to be noticed only by a fill (or a recency flush) made after the retry
        interval. A reader makes none once the kernel answers its reads itself (page cache with
        ``keep_cache``, passthrough, kernel opens), or when its few fills fell inside that
        interval: ``degraded`` then stayed set for good and nothing retried (issue 17). So the
        worker calls this every second: statvfs first (free), then one small write, because a
        disk that fails writes (EIO) may still report free space."""
        if self._full is None or self._read_through or not self._room_again():
            return False
        probe = self._tmp / f"room.{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
            try:
                os.write(fd, bytes(4096))
            finally:
                os.close(fd)
        except OSError as exc:
            self._write_failed("checking for room", exc)
            return False
        finally:
            probe.unlink(missing_ok=True)
        with self._lock:
            if self._full is None:
                return False
            self._full_retry_at = 0.0
            self._flush_touches_locked()  # recency kept while full; clears _full if it is written
            if self._full_retry_at:  # the record refused it (_write_failed): still no room
                return False
            if self._full is not None:  # nothing to flush: the probe decides
                log.info("cache disk at %s has room again; caching resumes", self.root)
                self._full = None
            if self._gone:
                self._retry_gone_locked()
            return True

    def _retry_gone_locked(self) -> None:
        try:
            self._write_many("DELETE FROM chunks WHERE name = ?", [(n,) for n in self._gone])
        except sqlite3.Error:
            return
        self._gone.clear()
