"""A FUSE server speaking the kernel protocol over ``/dev/fuse`` itself, in Python.

Why not libfuse: its high-level API (what mfusepy binds) cannot give stable node ids, cannot
serve a connection it did not INIT, and has neither FUSE_NOTIFY_RESEND nor passthrough
(issue 17). The protocol for a read-only view is small: a dozen opcodes, fixed structs.

Threads: N threads wait on the one descriptor, each in its own epoll with the descriptor
registered EPOLLEXCLUSIVE (a request wakes one idle thread), then read it non-blocking (a
thread that loses a race gets EAGAIN and waits again). Not per-thread FUSE_DEV_IOC_CLONE
descriptors: closing a cloned descriptor ends every request read through it with
ECONNABORTED (``fuse_dev_release``), so a SIGKILLed worker would fail its in-flight reads; on
the one shared descriptor, which the holder keeps open, they stay in the processing queue for
FUSE_NOTIFY_RESEND. Blocking reads (libfuse's way) cost the same server CPU per request here
(29-33 us per warm small file against 22-36 us, and plain poll 27-41 us, on a machine loaded
enough that the three overlap), but a thread blocked in read(2) cannot be woken without a
request: the one trick, a 0-byte FUSE_NOTIFY_RETRIEVE, is refused (EINVAL) for the root
directory on 6.18. The epoll also watches a pipe :meth:`Session.stop` writes to, so stop ends
every thread without closing the descriptor.

Using it (the handler API is :class:`Filesystem`)::

    conn = Connection.mount(mnt, fsname="ds")           # or Connection.resume(fd, state)
    session = Session(conn, MyView(), threads=4)
    threading.Thread(target=session.serve).start()
    session.ready.wait()                                 # INIT answered (at once if resumed)
    state = conn.state.to_json()                         # hand over with conn.fd
    conn.notify_resend()                                 # after a resume that followed a crash

The session is put together from one part per job: the loop here (threads, dispatch by opcode,
writing replies), :mod:`.handshake` (INIT: what is asked and agreed) and :mod:`.opcodes` (each
request decoded, answered by the Filesystem, the answer encoded, and the rules a Filesystem
must keep).

Measured (bench/fusell_bench.py, 3 runs with the code as committed, 2 vCPU shared with ~8
busy agents at load 8-11, so wall clock swings 2-3x between runs: medians, ranges in
brackets). 2,000 x 110 KiB files, stat + open + read + close each, entries cached 1 h,
``keep_cache``; first epoch on a fresh mount -> next epoch in files/s, then the server's CPU
per file in the next epoch:

    local ext4                              15.5k -> 14.5k (10-20k)
    today's binding (mfusepy, libfuse 3.14)  1.8k -> 13.0k     9-20 us/file
    fusell                                   3.3k -> 11.3k    16-22 us/file
    fusell, OPEN answered ENOSYS (no_open)   3.9k -> 10.4k     0 us/file
    fusell + BackingTable passthrough        9.9k -> 15.4k    31-35 us/file

One open+close round trip (median of 3,000): mfusepy 11-18 us, fusell 16-21 us, no_open
1.6-1.8 us, passthrough registering and closing a backing file per open 29-34 us. fusell
answers RELEASE in Python too (the mfusepy mirror has no release callback, libfuse answers
it in C). First epochs favour fusell (its reads are single writev replies) and passthrough
most (no READ reaches the server at all).

1 GiB file, one sequential read in 1 MiB calls, MB/s, page cache dropped (fadvise on the
files involved) -> warm:

    local ext4                              1.15k (1.07-1.30k) -> 2.4k (2.4-2.7k)
    fusell, FOPEN_PASSTHROUGH               1.11k (0.95-1.40k) -> 2.9k (2.5-2.9k)
    fusell, every read through Python       0.55k (0.55-0.84k) -> 0.75k (0.52-0.86k)
    mfusepy, keep_cache                     0.66k (0.56-0.70k) -> 1.7k (0.9-1.9k)

(warm mfusepy = the FUSE inode's own page cache; "through Python" has no keep_cache, so
every byte is an os.pread in the server and a writev of header + data.)

**The native part** (``native=``, fastopen.py): each thread's wait and read is then a call
into C that answers, without returning, the OPENs and RELEASEs of files armed for passthrough
and the LOOKUPs answered before, and returns every other request to this loop. Measured with
the dataset view (bench.hot, 15,000 cached 110 KB files, 8 readers, x local disk): page cache
warm 0.07 -> 0.45, dropped 0.29 -> 0.79; worker CPU per file 200-260 -> 28-31 us warm,
350-410 -> 43-46 us dropped (opens alone in C: 0.40 / 0.62, the rest being Python LOOKUPs
after the dentries were dropped).

Passthrough reads keep working while the server is SIGSTOPped (tests/cache_worker/
test_fusell.py), which is also what makes them as fast as local disk.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable

from . import abi
from .connection import Connection, MountError, unmount
from .filesystem import Filesystem
from .fastopen import NativeOpens
from .handshake import Handshake, Wants
from .model import Attr, ConnInfo, Context, DirItem, Entry, FuseError, Opened, StatFs
from .opcodes import Opcodes
from .state import InitState

__all__ = [
    "Attr", "Connection", "Context", "ConnInfo", "DirItem", "Entry", "Filesystem", "FuseError",
    "InitState", "MountError", "Opened", "Session", "StatFs", "unmount",
]

log = logging.getLogger(__name__)

_HDR = abi.IN_HEADER
_OUT = abi.OUT_HEADER
_EMPTY = _OUT.size
_OP_INIT = int(abi.Op.INIT)


class Session(Handshake, Opcodes):
    """Serves one :class:`Connection` with a :class:`Filesystem`.

    ``serve()`` blocks until the connection ends (unmounted or aborted: returns "ended") or
    :meth:`stop` (returns "stopped", descriptor still open, ready to hand over)."""

    def __init__(self, conn: Connection, fs: Filesystem, threads: int = 4,
                 want: Wants | None = None, native: NativeOpens | None = None):
        self.conn = conn
        #: The native responder (fastopen.py): reads every request, answers the opens and
        #: releases it can, hands the rest to this loop.
        self.native = native
        self.fs = fs
        self.threads = max(1, threads)
        self.want = want or Wants()
        self.ready = threading.Event()
        self._stopping = False
        self._ended = False
        self._workers: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._ops: dict[int, Callable[[Context, memoryview], None]] = {
            abi.Op.INIT: self._init,
            abi.Op.LOOKUP: self._lookup,
            abi.Op.FORGET: self._forget,
            abi.Op.BATCH_FORGET: self._batch_forget,
            abi.Op.GETATTR: self._getattr,
            abi.Op.READLINK: self._readlink,
            abi.Op.OPEN: self._open,
            abi.Op.READ: self._read,
            abi.Op.RELEASE: self._release,
            abi.Op.OPENDIR: self._opendir,
            abi.Op.READDIR: self._readdir,
            abi.Op.READDIRPLUS: self._readdirplus,
            abi.Op.RELEASEDIR: self._releasedir,
            abi.Op.STATFS: self._statfs,
            abi.Op.ACCESS: self._access,
            abi.Op.INTERRUPT: self._noreply,
            abi.Op.NOTIFY_REPLY: self._noreply,  # answers a NOTIFY_RETRIEVE; none expected
            abi.Op.DESTROY: self._destroy,
        }
        for op in abi.WRITE_OPS:
            self._ops[op] = self._erofs
        self._ops = {int(k): v for k, v in self._ops.items()}
        self._inited = conn.state is not None  # read per request: cheaper than ready.is_set()
        if self._inited:
            self.ready.set()

    @property
    def state(self) -> InitState | None:
        return self.conn.state

    # -- loop -----------------------------------------------------------------------------
    def serve(self) -> str:
        """Serve until the connection ends or :meth:`stop`. On a resumed connection
        ``fs.init`` is called here with the restored state (no INIT comes)."""
        fd = self.conn.fd
        if self.ready.is_set() and self.conn.state is not None:
            st = self.conn.state
            self.fs.init(ConnInfo(kernel_minor=st.kernel_minor, kernel_flags=st.kernel_flags,
                                  state=st, extra={"resumed": True}))
        # The kernel refuses (EINVAL) a read buffer smaller than a WRITE of the max_write that
        # INIT agreed, which on a resumed connection may differ from this process's Wants.
        self._bufsize = max(self.conn.state.max_write if self.conn.state else 0,
                            self.want.max_write, 8192) + 8192 + 4096
        os.set_blocking(fd, False)
        self._workers = [threading.Thread(target=self._loop, name=f"fusell-{i}", daemon=True)
                         for i in range(self.threads)]
        for t in self._workers:
            t.start()
        for t in self._workers:
            t.join()
        if self._ended:
            try:
                self.fs.destroy()
            except Exception:
                log.debug("destroy failed", exc_info=True)
            return "ended"
        return "stopped"

    def close(self) -> None:
        """Free the stop pipe once ``serve()`` has returned (the FUSE descriptor is the
        connection's: see :meth:`Connection.close`)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def stop(self) -> None:
        """Take no new request; requests in flight are answered, then ``serve()`` returns."""
        self._stopping = True
        self._poke()

    def _loop(self) -> None:
        fd = self.conn.fd
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        readv, dispatch = os.readv, self._dispatch
        # One epoll per thread with the FUSE descriptor registered EPOLLEXCLUSIVE: a request
        # wakes one idle thread, not all. The wake-up pipe is registered plainly: stop()
        # wakes every thread.
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        ep.register(self._wake_r, select.EPOLLIN)
        wake = self._wake_r
        native = self.native.reader(ep.fileno(), wake, buf) if self.native is not None else None
        try:
            while not self._stopping and not self._ended:
                if native is not None:
                    n = native()
                    if n == 0:
                        return
                    if n < 0:
                        if self._read_failed(-n):
                            return
                        continue
                else:
                    if any(f == wake for f, _ in ep.poll()):
                        return
                    try:
                        n = readv(fd, [buf])
                    except OSError as e:
                        if self._read_failed(e.errno):
                            return
                        continue
                if n < _HDR.size:
                    log.error("short read of %d bytes from /dev/fuse; ignored", n)
                    continue
                dispatch(view[:n])
        finally:
            ep.close()

    def _read_failed(self, err: int) -> bool:
        """Reading /dev/fuse failed with ``err``: True if the session ends."""
        if err in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
            return False
        if err != errno.ENODEV:
            log.error("reading /dev/fuse failed: %s; ending the session", os.strerror(err))
        self._ended = True
        self._poke()
        return True

    def _poke(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")  # never read: wakes every thread, now and later
        except BlockingIOError:
            pass

    def _dispatch(self, req: memoryview) -> None:
        _len, opcode, unique, nodeid, uid, gid, pid, _ext, _ = _HDR.unpack_from(req)
        ctx = Context(unique, nodeid, uid, gid, pid)
        handler = self._ops.get(opcode)
        if not self._inited and opcode != _OP_INIT:
            self._error(unique, errno.EIO)
            return
        if handler is None:
            self._error(unique, errno.ENOSYS)
            return
        try:
            handler(ctx, req[_HDR.size:])
        except FuseError as e:
            self._error(unique, e.errno)
        except Exception:
            log.error("handler for opcode %d failed (answered EIO)", opcode, exc_info=True)
            self._error(unique, errno.EIO)

    # -- replies --------------------------------------------------------------------------
    def _send(self, bufs: list) -> None:
        try:
            os.writev(self.conn.fd, bufs)
        except OSError as e:
            if e.errno == errno.ENOENT:  # the request was interrupted/aborted meanwhile
                return
            if e.errno == errno.ENODEV:
                self._ended = True
                self._poke()
                return
            log.error("writing a reply to /dev/fuse failed: %s", e)

    def _error(self, unique: int, err: int) -> None:
        self._send([_OUT.pack(_EMPTY, -err, unique)])

    def _reply(self, unique: int, *parts) -> None:
        size = _EMPTY
        for p in parts:
            size += len(p)
        self._send([_OUT.pack(size, 0, unique), *parts])
