"""The native OPEN/RELEASE responder (``fastopen.c``), loaded with ctypes.

Why: an open of a file passed through costs about 300 us answered in Python, and that is what
kept small files read from the cache disk at 0.26 of local speed; libfuse's C daemon reaches
0.8 there (bench/ANALYSIS.md). The C part answers only OPEN of node ids Python armed (a whole,
verified cache file with a registered backing id, :mod:`.passthrough_native`), RELEASE of
the handles it gave out, READ of files the kernel opened itself (kernel opens) that Python
armed for reads (``fs_backing.arm_reads``: backing id -1), and LOOKUPs Python answered before (for a Filesystem whose names do not
change until it says so: ``Filesystem.names_immutable``); every other request comes back to the session's Python loop
unchanged, so the view's rules stay in one place. Loaded with ctypes (no Python headers at
build time, as ``open_watch`` does for fanotify): ctypes releases the GIL for the whole wait.

:func:`load` returns None, and says why in :data:`unavailable`, when the library was not built
(``build-native.sh``, run by ``make`` and the Dockerfile) or ``DATAHOARD_NATIVE_OPENS=0``: the
view then answers every open in Python, as before.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

#: Bit of a handle the native part gave out; the slot is in the bits above the view's two flags.
NATIVE_FH = 1 << 63
SLOT_SHIFT = 2
_LIB_PATH = Path(__file__).with_name("_fastopen.so")
_STATS = ("opens", "releases", "forwarded", "changed", "lookups", "tombstones", "capacity", "reads",
          "kernel_opens_counted")

#: Why the native part is not in use, or None.
unavailable: str | None = None
_lib: ctypes.CDLL | None = None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    u64, i32, u32, p = ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p
    lib.dh_new.argtypes = [ctypes.c_int, p, u32, u32, u32]
    lib.dh_new.restype = p
    lib.dh_free.argtypes = [p]
    lib.dh_free.restype = None
    lib.dh_arm.argtypes = [p, u64, i32, u32, ctypes.c_char_p, u64, u64, u64, u64]
    lib.dh_arm.restype = ctypes.c_int
    lib.dh_disarm.argtypes = [p, u64]
    lib.dh_disarm.restype = ctypes.c_int
    lib.dh_drain.argtypes = [p, p, ctypes.c_size_t]
    lib.dh_drain.restype = ctypes.c_size_t
    lib.dh_stat.argtypes = [p, ctypes.c_int]
    lib.dh_stat.restype = u64
    lib.dh_released.argtypes = [p, u32]
    lib.dh_released.restype = None
    lib.dh_names_epoch.argtypes = [p]
    lib.dh_names_epoch.restype = u64
    lib.dh_forget_names.argtypes = [p]
    lib.dh_forget_names.restype = None
    lib.dh_remember.argtypes = [p, u64, u64, ctypes.c_char_p, u32, ctypes.c_char_p, u32]
    lib.dh_remember.restype = ctypes.c_int
    lib.dh_next.argtypes = [p, ctypes.c_int, ctypes.c_int, p, ctypes.c_size_t]
    lib.dh_next.restype = ctypes.c_ssize_t
    lib.dh_count_fanotify.argtypes = [p, ctypes.c_int, p, ctypes.c_size_t, p]
    lib.dh_count_fanotify.restype = ctypes.c_ssize_t
    lib.dh_count_fanotify_table.argtypes = [ctypes.c_int, p, p, ctypes.c_size_t, p, ctypes.c_size_t, p]
    lib.dh_count_fanotify_table.restype = ctypes.c_ssize_t
    lib.dh_handle_key.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_uint32]
    lib.dh_handle_key.restype = u64
    return lib


def load() -> ctypes.CDLL | None:
    global _lib, unavailable
    if _lib is not None:
        return _lib
    if os.environ.get("DATAHOARD_NATIVE_OPENS", "1") == "0":
        unavailable = "switched off (DATAHOARD_NATIVE_OPENS=0)"
        return None
    if not _LIB_PATH.exists():
        unavailable = f"{_LIB_PATH.name} not built (cache_worker/fusell/build-native.sh)"
        return None
    try:
        _lib = _bind(ctypes.CDLL(str(_LIB_PATH)))
    except OSError as e:
        unavailable = f"{_LIB_PATH.name} did not load: {e}"
        return None
    unavailable = None
    return _lib


@dataclass
class FanotifyCount:
    """What one :meth:`NativeOpens.count_fanotify` call read: sizes summed per opening pid for
    armed node ids, and the (node id, pid) opens of ids not armed, whose sizes are the index's."""
    bytes_by_pid: dict[int, int] = field(default_factory=dict)
    unknown: list[tuple[int, int]] = field(default_factory=list)
    events: int = 0
    overflows: int = 0
    error: int = 0  # errno of a failed read of the fanotify descriptor, else 0


def _count_rows(call, out, info) -> FanotifyCount:
    """Call a C counter (``call(out, rows, info)``) until the queue is empty, gathering its rows:
    (pid, 0, bytes) sums, and (pid, key, 0) opens it could not size."""
    got = FanotifyCount()
    info[0] = info[1] = 0
    while True:
        rows = call(out, len(out) // 3, info)
        if rows < 0:
            raise MemoryError("counting fanotify events: no memory for a buffer")
        flat = out[:3 * rows]
        for pid, key, nbytes in zip(flat[0::3], flat[1::3], flat[2::3]):
            if key:
                got.unknown.append((key, pid))
            else:
                got.bytes_by_pid[pid] = got.bytes_by_pid.get(pid, 0) + nbytes
        got.events, got.overflows = info[0], info[1]
        if info[3]:
            got.error = info[3]
            break
        if not info[2]:
            break
    return got


class TableCounter:
    """Counts fanotify's open events of files on a local filesystem in C, sized by a table of
    their handles' keys (direct_opens.py): the C counter of :class:`NativeOpens`, without a
    connection. ``keys`` (sorted) and ``sizes`` are ``array('Q')``s it must not outlive."""

    def __init__(self, lib: ctypes.CDLL, keys, sizes) -> None:
        self._lib, self._keys, self._sizes = lib, keys, sizes
        self._n = len(keys)
        self._keys_addr = keys.buffer_info()[0] if self._n else None
        self._sizes_addr = sizes.buffer_info()[0] if self._n else None
        self._out = (ctypes.c_uint64 * (3 * 4096))()
        self._info = (ctypes.c_uint64 * 4)()

    def __call__(self, fan_fd: int) -> FanotifyCount:
        lib, keys, sizes, n = self._lib, self._keys_addr, self._sizes_addr, self._n
        return _count_rows(
            lambda out, rows, info: lib.dh_count_fanotify_table(fan_fd, keys, sizes, n, out, rows, info),
            self._out, self._info)


def handle_key(lib: ctypes.CDLL, handle_type: int, handle: bytes) -> int:
    """fastopen.c's key of a file handle (direct_opens.py has the same in Python)."""
    return lib.dh_handle_key(handle_type, handle, len(handle))


class NativeOpens:
    """One connection's native responder: a handle on the C state, which holds the armed node
    ids and the queue of opens to count. ``counts`` is the writable shared mapping of the
    per-slot open counts (8 bytes a slot); it must outlive this object."""

    QUEUE = 1 << 16  # opens waiting to be counted; when full, opens go to Python (never lost)
    #: LOOKUP answers remembered (about 300 bytes each with the name and the table: about 40 MB
    #: when full); when full, all are forgotten and Python answers again.
    NAMES = 1 << 17

    def __init__(self, lib: ctypes.CDLL, fd: int, counts, slots: int) -> None:
        self._lib = lib
        self._counts_ref = (ctypes.c_char * len(counts)).from_buffer(counts)
        self._h = lib.dh_new(fd, ctypes.addressof(self._counts_ref), slots, self.QUEUE, self.NAMES)
        if not self._h:
            raise MemoryError("dh_new failed")
        self._out = (ctypes.c_uint64 * (2 * 4096))()
        self._fan_out = (ctypes.c_uint64 * (3 * 4096))()
        self._fan_info = (ctypes.c_uint64 * 4)()
        #: Held by :meth:`count_fanotify` (the open-watch thread, not a session thread) and
        #: :meth:`close`, so the C state is never freed under a count.
        self._fan_lock = threading.Lock()

    def arm(self, nodeid: int, backing_id: int, slot: int, path: str,
            identity: tuple[int, int, int, int]) -> bool:
        """Answer opens of ``nodeid`` with ``backing_id`` while ``path`` has ``identity``
        (inode, size, mtime_ns, ctime_ns, as stat shows it)."""
        return self._lib.dh_arm(self._h, nodeid, backing_id, slot, os.fsencode(path), *identity) == 0

    def disarm(self, nodeid: int) -> bool:
        return bool(self._lib.dh_disarm(self._h, nodeid))

    def names_epoch(self) -> int:
        """Read before answering a LOOKUP whose answer is then given to :meth:`remember`."""
        return self._lib.dh_names_epoch(self._h)

    def remember(self, epoch: int, parent: int, name: bytes, entry_out: bytes) -> None:
        """Answer the next LOOKUPs of ``name`` in ``parent`` with ``entry_out`` (unless
        :meth:`forget_names` ran since ``epoch`` was read)."""
        self._lib.dh_remember(self._h, epoch, parent, name, len(name), entry_out, len(entry_out))

    def forget_names(self) -> None:
        self._lib.dh_forget_names(self._h)

    def released(self, slot: int) -> None:
        self._lib.dh_released(self._h, slot)

    def drain(self) -> list[tuple[int, int]]:
        """The opens answered natively since the last drain, as (node id, pid)."""
        got: list[tuple[int, int]] = []
        if not self._h:  # closed
            return got
        out = self._out
        while n := self._lib.dh_drain(self._h, out, len(out) // 2):
            flat = out[:2 * n]
            got.extend(zip(flat[0::2], flat[1::2]))
            if n < len(out) // 2:
                break
        return got

    def count_fanotify(self, fan_fd: int) -> FanotifyCount | None:
        """Read and count every event queued on ``fan_fd`` (open_watch.py, by file id) in C:
        no Python per open of an armed file (fastopen.c says what that saves). None once closed."""
        with self._fan_lock:
            if not self._h:
                return None
            lib, h = self._lib, self._h
            return _count_rows(lambda out, rows, info: lib.dh_count_fanotify(h, fan_fd, out, rows, info),
                               self._fan_out, self._fan_info)

    def stats(self) -> dict[str, int]:
        if not self._h:
            return dict.fromkeys(_STATS, 0)
        return {name: self._lib.dh_stat(self._h, i) for i, name in enumerate(_STATS)}

    def reader(self, epfd: int, wake_fd: int, buf: bytearray):
        """A function for one session thread: each call returns the length of the next request
        for Python (in ``buf``), 0 on a wake-up (stop), or -errno."""
        ref = (ctypes.c_char * len(buf)).from_buffer(buf)
        fn, h, addr, size = self._lib.dh_next, self._h, ctypes.addressof(ref), len(buf)

        def next_request() -> int:
            return fn(h, epfd, wake_fd, addr, size)
        next_request.keep = ref  # the buffer's export lives as long as the function
        return next_request

    def close(self) -> None:
        """Free the C state (no session thread may be in :meth:`reader`'s function any more) and
        let go of the counts mapping, which its owner can then close."""
        with self._fan_lock:
            if self._h:
                self._lib.dh_free(self._h)
                self._h = None
        self._counts_ref = None
