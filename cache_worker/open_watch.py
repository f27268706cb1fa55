"""Counting opens that the kernel serves without asking the worker, with fanotify.

A FUSE server that answers ``open`` with ENOSYS tells the kernel it needs no opens: from then on
the kernel opens files itself and sends neither ``open`` nor ``release``, and data already in
its page cache is read with no trip to userspace at all. For a fully cached dataset of small
files that is the difference between a warm epoch at a fraction of local-disk speed and one at
local-disk speed (bench/ANALYSIS.md), but it hides the opens the hit ratio is counted from.

fanotify gives them back without putting the worker in the path: a notification-only mark on
the FUSE *filesystem* (``FAN_MARK_FILESYSTEM``, so opens through every bind of the view count,
the CSI plugin's binds into pods included) queues one event per open, which the worker reads in
batches. Each event carries a descriptor of the opened file; its size (``lseek`` to the end: the kernel
has the attributes cached) is what is counted, the same whole-file count the FUSE view makes at
``open`` for a cached small file. A descriptor opened for the listener costs the kernel a
second in-kernel open and no FUSE request. fanotify needs ``CAP_SYS_ADMIN``; without it
:meth:`OpenWatch.start` raises OSError and the view keeps answering opens itself.

Events are queued during the reader's ``open`` system call, so :meth:`OpenWatch.drain` before a
stats snapshot makes the count as current as a synchronous one. What an open counts is
decided with the other hit-accounting rules, in counters.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_FAN_CLOEXEC = 0x01
_FAN_NONBLOCK = 0x02
_FAN_CLASS_NOTIF = 0x00
#: Never drop events: a dropped event is an uncounted open. The reader keeps the queue short.
_FAN_UNLIMITED_QUEUE = 0x10
_FAN_MARK_ADD = 0x01
_FAN_MARK_FILESYSTEM = 0x100
_FAN_OPEN = 0x20
_FAN_Q_OVERFLOW = 0x4000
_AT_FDCWD = -100
#: struct fanotify_event_metadata: event_len u32, vers u8, reserved u8, metadata_len u16,
#: mask u64, fd s32, pid s32.
_EVENT = struct.Struct("=IBBHQii")
_BATCH_BYTES = 64 * 1024
#: After a large batch, let events gather this long before reading again: one wake-up per
#: batch instead of one per open, which at tens of thousands of opens a second is what costs
#: most. A queued event holds a reference to the mount it was opened through, so a plain
#: (non-lazy) unmount right after a burst of opens can find the mount busy for this long.
_GATHER_SECONDS = 0.02
_LARGE_BATCH = 256

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class OpenWatch:
    """Calls ``on_open(nbytes, pid)`` with the sizes of the files opened on ``path``'s
    filesystem, summed over a batch of opens per opening process (for per-pod attribution,
    consumers.py)."""

    def __init__(self, path: str, on_open: Callable[[int, int], None]) -> None:
        self._path = path
        self._on_open = on_open
        self._fd = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Mark the filesystem and start reading events; OSError when fanotify is not allowed."""
        flags = _FAN_CLASS_NOTIF | _FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_UNLIMITED_QUEUE
        self._fd = _check(_libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC), "fanotify_init")
        try:
            _check(
                _libc.fanotify_mark(self._fd, _FAN_MARK_ADD | _FAN_MARK_FILESYSTEM, _FAN_OPEN, _AT_FDCWD,
                                    os.fsencode(self._path)),
                f"fanotify_mark {self._path}",
            )
        except OSError:
            os.close(self._fd)
            self._fd = -1
            raise
        self._thread = threading.Thread(target=self._run, name="open-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(500) and self.drain() >= _LARGE_BATCH:
                self._stop.wait(_GATHER_SECONDS)

    def drain(self) -> int:
        """Count every queued event now; returns how many opens were counted."""
        counted = 0
        with self._lock:
            while self._fd >= 0:
                try:
                    buf = os.read(self._fd, _BATCH_BYTES)
                except BlockingIOError:
                    break
                counted += self._count(buf)
        return counted

    def _count(self, buf: bytes) -> int:
        """Count one batch of events with one call of ``on_open`` per opening process: this runs
        for every open."""
        counted = pos = 0
        by_pid: dict[int, int] = {}
        while pos + _EVENT.size <= len(buf):
            event_len, _vers, _res, _meta_len, mask, fd, pid = _EVENT.unpack_from(buf, pos)
            pos += event_len
            if mask & _FAN_Q_OVERFLOW:  # cannot happen with an unlimited queue; said if it does
                log.warning("fanotify queue overflowed: some opens were not counted")
            if fd < 0:
                continue
            # Only files are reported (no FAN_ONDIR) and the view has nothing but regular files
            # and directories; the size is where the end is (the kernel has the attributes).
            try:
                by_pid[pid] = by_pid.get(pid, 0) + os.lseek(fd, 0, os.SEEK_END)
                counted += 1
            finally:
                os.close(fd)
        for pid, nbytes in by_pid.items():
            self._on_open(nbytes, pid)
        return counted

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
