"""Counting opens that the kernel serves without asking the worker, with fanotify.

A FUSE server that answers ``open`` with ENOSYS tells the kernel it needs no opens: from then on
the kernel opens files itself and sends neither ``open`` nor ``release``, and data already in
its page cache is read with no trip to userspace at all. For a fully cached dataset of small
files that is the difference between a warm epoch at a fraction of local-disk speed and one at
local-disk speed (bench/ANALYSIS.md), but it hides the opens the hit ratio is counted from.

fanotify gives them back without putting the worker in the path: a notification-only mark
queues one event per open, which the worker reads in batches, and each open counts the opened
file's size, the same whole-file count the FUSE view makes at ``open`` for a cached small file.
Marks are on inodes, so opens through every bind of the view count, the CSI plugin's binds into
pods included. There are two ways to learn which file an event is about:

* **By file id** (the default): one inode mark per directory of the view, with
  ``FAN_EVENT_ON_CHILD`` and ``FAN_REPORT_FID``. Each event carries the opened file's FUSE
  handle, which holds its node id, and the node id gives its size in the index. fanotify allows
  such events on FUSE (whose fsid is zero) only for inode marks, since Linux 6.8; a refresh's new
  directories are marked when it is done (``mark_new_dirs``).
* **Through descriptors** (where marking by id is refused, or past ``fs.MAX_DIR_MARKS``
  directories): one mark on the FUSE *filesystem*, and each event carries a descriptor of the
  opened file, whose size is where its end is (``lseek``; the kernel has the attributes cached).

Why by file id, measured (3,000 files of 60 KB in 30 directories, page cache warm, 2 reader
threads, two mounts of the same cached set and local disk read in turn, 25 epochs each, twice):
median per file, local disk 19.6 and 17.9 us, by file id 25.4 and 26.0, through descriptors
30.1 and 30.1 (best epochs 20.9-21.3 against 21.3-23.4). A descriptor costs the kernel an
in-kernel open of the file for the listener and a close, on top of the event; what is left
against local disk is the event itself (a mount with no watch at all: about 20 us best).
fanotify needs ``CAP_SYS_ADMIN``; without it :meth:`OpenWatch.start` raises OSError and the
view keeps answering opens itself.

Counting by file id is done in C where the worker's native part is loaded (``native``:
:meth:`fusell.fastopen.NativeOpens.count_fanotify`): it reads the events and sums the sizes of
armed files per opening process, and only opens of files not armed come back here for the
index's sizes. Measured (4,000 files of 60-160 KB on local disk, 8 readers, page cache warm, 2
cores, best of four epochs each): no watch 63.7k files/s, a watch whose events are read and
thrown away 63.6k, the same events counted here in Python 51.9k. The kernel's side of an event
costs the reader little; what cost the epoch was this process's CPU per event.

Events are queued during the reader's ``open`` system call, so :meth:`OpenWatch.drain` before a
stats snapshot makes the count as current as a synchronous one. What an open counts is
decided with the other hit-accounting rules, in counters.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fusell.fastopen import FanotifyCount

log = logging.getLogger(__name__)

_FAN_CLOEXEC = 0x01
_FAN_NONBLOCK = 0x02
_FAN_CLASS_NOTIF = 0x00
#: Never drop events: a dropped event is an uncounted open. The reader keeps the queue short.
_FAN_UNLIMITED_QUEUE = 0x10
_FAN_MARK_ADD = 0x01
_FAN_MARK_FILESYSTEM = 0x100
_FAN_OPEN = 0x20
_FAN_EVENT_ON_CHILD = 0x08000000
#: Events name the object by file handle (struct fanotify_event_info_fid) and carry no
#: descriptor. FUSE's fsid is zero, which fanotify allows (6.8+) for inode marks only.
_FAN_REPORT_FID = 0x200
#: struct fanotify_event_info_fid up to the handle's bytes: info_type u8, pad u8, len u16,
#: fsid 2 x s32, file_handle.handle_bytes u32, handle_type s32.
_FID_INFO = struct.Struct("=BBHiiIi")
#: FUSE's handle (fuse_encode_fh): node id high and low 32 bits, then the generation; 0x81
#: without the parent, 0x82 with it.
_FUSE_HANDLE_TYPES = (0x81, 0x82)
_NODE_ID = struct.Struct("=II")
#: MAX_HANDLE_SZ: the largest handle a filesystem encodes.
MAX_HANDLE = 128
_FAN_Q_OVERFLOW = 0x4000
_AT_FDCWD = -100
#: struct fanotify_event_metadata: event_len u32, vers u8, reserved u8, metadata_len u16,
#: mask u64, fd s32, pid s32.
_EVENT = struct.Struct("=IBBHQii")
_BATCH_BYTES = 64 * 1024
#: After a batch, let events gather this long before reading again: one wake-up per batch instead
#: of one per open, which at tens of thousands of opens a second is what costs most. Measured
#: (4,000 files, 8 readers, page cache warm, 2 cores): waiting only after batches of 256 or more,
#: a drain fast enough (counted in C) found few events each time, and the wake-ups alone cost
#: the worker 30 us of CPU per open and the readers half their speed (20k files/s against 41-50k
#: for local disk). An isolated open is still read at once (the wait follows a batch); in a burst
#: an event waits at most this long. A queued event holds a reference to the mount it was opened
#: through, so a plain (non-lazy) unmount right after an open can find the mount busy this long.
_GATHER_SECONDS = 0.02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int


def fuse_node_id(handle_type: int, handle: bytes) -> int | None:
    """The node id in a FUSE file handle (fuse_encode_fh), or None for another kind of handle."""
    if handle_type not in _FUSE_HANDLE_TYPES or len(handle) < _NODE_ID.size:
        return None
    high, low = _NODE_ID.unpack_from(handle)
    return (high << 32) | low


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class OpenWatch:
    """Calls ``on_open(nbytes, pid)`` with the sizes of the files opened on ``path``'s
    filesystem, summed over a batch of opens per opening process (for per-pod attribution,
    consumers.py).

    With ``dirs`` and ``sizes`` it watches by file id instead (module docstring): one inode mark
    per directory, events that name the opened file's node id, and ``sizes(node_ids)`` for what
    they count. Where that is refused (a kernel before 6.8) it marks the filesystem as above.
    ``native`` counts those events in C (module docstring), or returns None (closed): then
    they are counted here.

    ``key_of(handle_type, handle)`` names what an event's handle is about for ``sizes``: by default
    FUSE's node id; a direct tree's files (direct_opens.py) are keyed by their whole handle.
    ``by_descriptor=False`` never falls back to marking the filesystem: a direct tree shares its
    filesystem with everything else on the disk, whose opens must not count."""

    def __init__(self, path: str, on_open: Callable[[int, int], None], *,
                 dirs: Callable[[], Iterable[str]] | None = None,
                 sizes: Callable[[set[int]], dict[int, int]] | None = None,
                 native: Callable[[int], FanotifyCount | None] | None = None,
                 key_of: Callable[[int, bytes], int | None] = fuse_node_id,
                 by_descriptor: bool = True) -> None:
        self._path = path
        self._on_open = on_open
        self._dirs, self._sizes, self._native = dirs, sizes, native
        self._key_of, self._by_descriptor = key_of, by_descriptor
        self._marked: set[str] = set()
        #: How this watch gets its events: "file ids" or "descriptors" (``start``).
        self.mode = ""
        self._fd = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Mark and start reading events; OSError when fanotify is not allowed."""
        if self._dirs is not None and self._sizes is not None:
            try:
                self._start_by_id()
            except OSError as exc:
                if not self._by_descriptor:
                    raise
                log.info("opens counted through descriptors: marking by file id failed (%s)", exc)
        if self._fd < 0:
            self._start_by_descriptor()
        self._thread = threading.Thread(target=self._run, name="open-watch", daemon=True)
        self._thread.start()

    def _start_by_descriptor(self) -> None:
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
        self.mode = "descriptors"

    def _start_by_id(self) -> None:
        flags = _FAN_CLASS_NOTIF | _FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_UNLIMITED_QUEUE | _FAN_REPORT_FID
        fd = _check(_libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC), "fanotify_init")
        self._fd = fd
        try:
            self.mark_new_dirs()
        except OSError:
            os.close(fd)
            self._fd = -1
            self._marked.clear()
            raise
        self.mode = "file ids"

    def mark_new_dirs(self) -> int:
        """Mark every directory ``dirs`` names that is not marked yet (after a refresh); how many.
        A directory that is gone by now is skipped: nothing can be opened in it."""
        if self.mode == "descriptors" or self._dirs is None:
            return 0
        added = 0
        for rel in self._dirs():
            if rel in self._marked:
                continue
            path = os.path.join(self._path, rel) if rel else self._path
            if _libc.fanotify_mark(self._fd, _FAN_MARK_ADD, _FAN_OPEN | _FAN_EVENT_ON_CHILD, _AT_FDCWD,
                                   os.fsencode(path)) < 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT and self._marked:
                    continue
                raise OSError(err, f"fanotify_mark {path}: {os.strerror(err)}")
            self._marked.add(rel)
            added += 1
        return added

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(500) and self.drain():
                self._stop.wait(_GATHER_SECONDS)

    def drain(self) -> int:
        """Count every queued event now; returns how many opens were counted."""
        counted = 0
        with self._lock:
            if self._fd >= 0 and self.mode == "file ids" and self._native is not None:
                got = self._native(self._fd)
                if got is not None:
                    return self._count_native(got)
            while self._fd >= 0:
                try:
                    buf = os.read(self._fd, _BATCH_BYTES)
                except BlockingIOError:
                    break
                counted += self._count_ids(buf) if self.mode == "file ids" else self._count(buf)
        return counted

    def _count_native(self, got: FanotifyCount) -> int:
        """Hand on what the C part counted, with the index's sizes for files it had not armed."""
        if got.overflows:
            log.warning("fanotify queue overflowed: some opens were not counted")
        if got.error:
            log.warning("reading fanotify events failed (%s): opens queued then may not be counted",
                        os.strerror(got.error))
        self._hand_on(got.unknown, got.bytes_by_pid)
        return got.events

    def _hand_on(self, opens: list[tuple[int, int]], by_pid: dict[int, int]) -> None:
        """One ``on_open`` per opening process: ``by_pid``'s sums (already sized) plus the
        index's sizes of ``opens`` (node id, pid)."""
        if opens:
            sizes = self._sizes({node for node, _ in opens}) if self._sizes else {}
            for node, pid in opens:
                by_pid[pid] = by_pid.get(pid, 0) + sizes.get(node, 0)
        for pid, nbytes in by_pid.items():
            self._on_open(nbytes, pid)

    def _count_ids(self, buf: bytes) -> int:
        """``_count`` for events that carry the opened file's handle (``key_of``: a FUSE node
        id) instead of a descriptor: no descriptor to open, size or close, in the kernel or here."""
        pos = 0
        opens: list[tuple[int, int]] = []
        while pos + _EVENT.size <= len(buf):
            event_len, _vers, _res, meta_len, mask, _fd, pid = _EVENT.unpack_from(buf, pos)
            if mask & _FAN_Q_OVERFLOW:
                log.warning("fanotify queue overflowed: some opens were not counted")
            info = pos + meta_len
            if info + _FID_INFO.size <= pos + event_len:
                _type, _pad, _len, _fsid0, _fsid1, handle_bytes, handle_type = _FID_INFO.unpack_from(buf, info)
                start = info + _FID_INFO.size
                if 8 <= handle_bytes <= MAX_HANDLE and start + handle_bytes <= pos + event_len:
                    key = self._key_of(handle_type, buf[start:start + handle_bytes])
                    if key is not None:
                        opens.append((key, pid))
            pos += event_len
        self._hand_on(opens, {})
        return len(opens)

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
