"""The data half of the dataset's FUSE view: opens, reads and releases of files, and the hits
they count.

**Passthrough.** An open of a file that is whole and verified in the cache (one backing file,
``ChunkStore``) is answered with ``FOPEN_PASSTHROUGH`` on that file: every read of it is then
a kernel read of local disk that never reaches this process, and keeps working while no
worker runs at all. The kernel's rules (one backing file per inode while it is open in
passthrough; an inode open for cached I/O refuses passthrough opens and the other way round)
are kept by ``fusell.passthrough.BackingTable``, which survives restarts with the connection.
A file not yet whole is served by this process as before (``DatasetCache.read``).

**Hit accounting stays true.** Whatever the kernel serves without asking us was counted when
the file was opened: an open that is answered from the cache (passthrough, or ``keep_cache``
where passthrough is not available) counts the whole file as served from cache, at open. For a
small file (at most one chunk) that is exact for the way loaders read (whole files). For a
large file passed through it means: **a passed-through open of a large file counts the whole
file as a hit, however little of it the reader then reads** (README says so); a large file
that is not whole in the cache is counted read by read, exactly. Reads of a prepaid handle that
do reach us (the kernel dropped its copy) are not counted again; bytes they had to fetch move
from the cache column to the source column.
"""

from __future__ import annotations

import errno
import logging
import os

from .dataset import ReadState
from .fs_ids import _SERIAL_SHIFT, PASSED, PREPAID
from .fusell.model import Context, FuseError, Opened
from .fusell.passthrough_native import native_slot

log = logging.getLogger("datahoard.cache_worker.fs")  # one log for the view, as before the split

#: Bound on remembered small files opened for the page cache (``_paged``), about 60 bytes each.
_PAGED_MAX = 1 << 16
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class ViewData:
    """OPEN, READ and RELEASE of files.
    A part of :class:`.fs.DatasetFS`, which sets up the state in ``__init__``."""

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
            if self.backing.is_armed(nodeid):
                # The native part passed this open on (the file changed since it was armed, or
                # its queue of opens to count was full): Python decides afresh.
                self.backing.disarm(nodeid)
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
                if self.native is not None:
                    self._arm(nodeid)  # its next opens are answered without Python
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
        slot = native_slot(fh)
        if slot is not None:  # the native part's, released here: it is not running now
            if self.backing is not None:
                self.backing.native_released(slot)
            return
        self._handles.pop((nodeid, fh), None)
        if self.cache.store.problem is not None:
            # The store cannot take files (a full disk): whatever this open read may not be
            # cached, so the next open must reach the worker again, to cache it once there is
            # room (see _paged).
            self._paged.discard(nodeid)
        if self.backing is not None:
            self.backing.release(nodeid, fh >> _SERIAL_SHIFT)
