"""The one place that imports the FUSE binding.

mfusepy (maintained, libfuse 2 and 3) over fusepy (unmaintained since 2018). It is told to load
libfuse3 before import: libfuse3 gives ``max_read`` above 128 KiB and the per-open
``keep_cache`` flag this worker relies on, and Debian's ``fuse3`` package ships it.

:class:`FUSE` adds one thing to mfusepy's: every libfuse worker thread keeps its Python thread
state. ctypes runs a callback that arrives on a thread Python did not create under a thread
state it creates for that one call and deletes afterwards; in CPython 3.11 each new thread
state also maps a fresh frame stack on first use and unmaps it on deletion. Profiled on a warm
epoch (every file: one ``open`` and one ``release`` callback) that mmap/munmap/page-fault churn
was the largest single cost of the worker, larger than all of its Python code, and it also
threw away ``threading.local`` state (the index's per-thread SQLite connection) at every call.
The first callback on each libfuse thread therefore takes one more GIL-state reference, so the
thread state outlives the call: later callbacks on that thread only take and drop the GIL.
libfuse keeps its worker threads for the life of the mount (``max_idle_threads`` is unlimited
by default since libfuse 3.12), so there is one kept thread state per worker thread.
"""

from __future__ import annotations

import ctypes
import os
import threading

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402

FuseOSError = mfusepy.FuseOSError
Operations = mfusepy.Operations
fuse_version = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)

_ensure_gil_state = ctypes.pythonapi.PyGILState_Ensure
_ensure_gil_state.restype = ctypes.c_int
_ensure_gil_state.argtypes = []


class _Kept(threading.local):
    kept = False


_thread = _Kept()


def keep_thread_state() -> None:
    """Keep the calling thread's Python thread state after the current ctypes callback returns.

    Idempotent per thread state. Harmless on threads Python created (their state is kept anyway).
    """
    if not _thread.kept:
        _ensure_gil_state()  # the GIL is held: this only counts one more reference
        _thread.kept = True


class FUSE(mfusepy.FUSE):
    def _wrapper(self, func, *args, **kwargs):
        keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)
