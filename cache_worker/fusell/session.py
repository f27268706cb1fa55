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

Rules a Filesystem must keep (the kernel's, not ours): every Entry returned by LOOKUP or
READDIRPLUS counts one lookup of its nodeid until FORGET/BATCH_FORGET gives it back; "." and
".." in readdir carry no Entry; an OPEN answered with FuseError(ENOSYS) switches opens off for
the whole connection (the kernel opens files itself, never sends OPEN/RELEASE again, and so
passthrough is off too, see passthrough.py); ``keep_cache`` is dropped from a passthrough
answer (the kernel refuses the combination with EIO). The session itself answers: EROFS to
every write-type opcode (and to an OPEN for writing or O_TRUNC), ENOSYS to FLUSH (the kernel
then stops sending it), to GETXATTR/LISTXATTR (the kernel stops asking; callers get
EOPNOTSUPP), and to unknown opcodes; INTERRUPT is ignored (the request is answered when its
handler returns); a request that arrives again after FUSE_NOTIFY_RESEND has bit 63 set in
``unique`` and is answered like any other. ``statfs`` defaults to zeros so ``df`` works.

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
from dataclasses import dataclass

from . import abi
from .connection import Connection, MountError, unmount
from .filesystem import Filesystem
from .model import Attr, ConnInfo, Context, DirItem, Entry, FuseError, Opened, StatFs
from .wire import NO_ENTRY, pack_attr, pack_entry, secs
from .state import InitState

__all__ = [
    "Attr", "Connection", "Context", "ConnInfo", "DirItem", "Entry", "Filesystem", "FuseError",
    "InitState", "MountError", "Opened", "Session", "StatFs", "Wants", "unmount",
]

log = logging.getLogger(__name__)

_HDR = abi.IN_HEADER
_OUT = abi.OUT_HEADER
_EMPTY = _OUT.size
_OP_INIT = int(abi.Op.INIT)
_NOFLUSH, _DIRECT_IO, _PASSTHROUGH = (
    int(abi.Fopen.NOFLUSH), int(abi.Fopen.DIRECT_IO), int(abi.Fopen.PASSTHROUGH))
_KEEP_CACHE, _CACHE_DIR = int(abi.Fopen.KEEP_CACHE), int(abi.Fopen.CACHE_DIR)
_ACCMODE_OR_TRUNC = os.O_ACCMODE | os.O_TRUNC


@dataclass
class Wants:
    """What the session asks for at INIT (the kernel may grant less; see :class:`InitState`)."""

    max_read: int = 1 << 20
    max_write: int = 128 * 1024
    max_readahead: int = 1 << 20
    max_background: int = 64
    congestion_threshold: int = 48
    passthrough: bool = True
    readdirplus: bool = True
    readdirplus_auto: bool = False  # True: the kernel chooses plain READDIR when it guesses so
    parallel_dirops: bool = True
    entry_timeout: float = 1.0  # defaults a Filesystem may use for its Entry/getattr answers
    attr_timeout: float = 1.0


class Session:
    """Serves one :class:`Connection` with a :class:`Filesystem`.

    ``serve()`` blocks until the connection ends (unmounted or aborted: returns "ended") or
    :meth:`stop` (returns "stopped", descriptor still open, ready to hand over)."""

    def __init__(self, conn: Connection, fs: Filesystem, threads: int = 4,
                 want: Wants | None = None):
        self.conn = conn
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
        try:
            while not self._stopping and not self._ended:
                if any(f == wake for f, _ in ep.poll()):
                    return
                try:
                    n = readv(fd, [buf])
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                        continue
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse failed: %s; ending the session", e)
                    self._ended = True
                    self._poke()
                    return
                if n < _HDR.size:
                    log.error("short read of %d bytes from /dev/fuse; ignored", n)
                    continue
                dispatch(view[:n])
        finally:
            ep.close()

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

    # -- opcodes --------------------------------------------------------------------------
    def _init(self, ctx: Context, arg: memoryview) -> None:
        if len(arg) >= abi.INIT_IN.size:
            major, minor, max_ra, flags, flags2 = abi.INIT_IN.unpack_from(arg)
        else:
            major, minor, max_ra, flags = abi.INIT_IN_OLD.unpack_from(arg)
            flags2 = 0
        if major < 7:
            log.error("kernel FUSE protocol %d.%d is too old", major, minor)
            raise FuseError(errno.EPROTO)
        if major > 7:  # the kernel will send INIT again with major 7
            self._reply(ctx.unique, abi.INIT_OUT.pack(7, abi.KERNEL_MINOR_VERSION, *[0] * 11))
            return
        offered = flags | ((flags2 << 32) if flags & abi.Init.INIT_EXT else 0)
        w = self.want
        want = (abi.Init.ASYNC_READ | abi.Init.MAX_PAGES | abi.Init.CACHE_SYMLINKS
                | abi.Init.ASYNC_DIO | abi.Init.INIT_EXT | abi.Init.DIRECT_IO_ALLOW_MMAP)
        if w.readdirplus:
            want |= abi.Init.DO_READDIRPLUS
            if w.readdirplus_auto:
                want |= abi.Init.READDIRPLUS_AUTO
        if w.parallel_dirops:
            want |= abi.Init.PARALLEL_DIROPS
        if w.passthrough:
            want |= abi.Init.PASSTHROUGH
        agreed = int(want) & offered
        passthrough = bool(agreed & abi.Init.PASSTHROUGH)
        state = InitState(
            minor=min(minor, abi.KERNEL_MINOR_VERSION),
            flags=agreed,
            max_readahead=min(max_ra, w.max_readahead),
            max_write=w.max_write,
            max_pages=max(1, min(w.max_read // 4096, 0xFFFF)),
            max_background=w.max_background,
            congestion_threshold=w.congestion_threshold,
            time_gran=1,
            passthrough=passthrough,
            max_stack_depth=1 if passthrough else 0,
            kernel_minor=minor,
            kernel_flags=offered,
        )
        out = abi.INIT_OUT.pack(
            7, abi.KERNEL_MINOR_VERSION, state.max_readahead, agreed & 0xFFFFFFFF,
            state.max_background, state.congestion_threshold, state.max_write, state.time_gran,
            state.max_pages, 0, agreed >> 32, state.max_stack_depth, 0,
        )
        self.conn.state = state
        self.fs.init(ConnInfo(kernel_minor=minor, kernel_flags=offered, state=state))
        self._reply(ctx.unique, out)
        self._inited = True
        self.ready.set()

    def _noreply(self, ctx: Context, arg: memoryview) -> None:
        pass

    def _erofs(self, ctx: Context, arg: memoryview) -> None:
        raise FuseError(errno.EROFS)

    def _destroy(self, ctx: Context, arg: memoryview) -> None:
        self.fs.destroy()
        self._reply(ctx.unique)

    def _lookup(self, ctx: Context, arg: memoryview) -> None:
        name = bytes(arg).split(b"\0", 1)[0]
        e = self.fs.lookup(ctx, ctx.nodeid, name)
        self._reply(ctx.unique, pack_entry(e))

    def _forget(self, ctx: Context, arg: memoryview) -> None:
        (nlookup,) = abi.FORGET_IN.unpack_from(arg)
        try:
            self.fs.forget(ctx.nodeid, nlookup)
        except Exception:
            log.debug("forget failed", exc_info=True)

    def _batch_forget(self, ctx: Context, arg: memoryview) -> None:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(arg)
        off = abi.BATCH_FORGET_IN.size
        for _i in range(count):
            nodeid, nlookup = abi.FORGET_ONE.unpack_from(arg, off)
            off += abi.FORGET_ONE.size
            try:
                self.fs.forget(nodeid, nlookup)
            except Exception:
                log.debug("forget failed", exc_info=True)

    def _getattr(self, ctx: Context, arg: memoryview) -> None:
        gflags, _, fh = abi.GETATTR_IN.unpack_from(arg)
        attr, timeout = self.fs.getattr(ctx, ctx.nodeid, fh if gflags & abi.GETATTR_FH else None)
        s, ns = secs(timeout)
        self._reply(ctx.unique, abi.ATTR_OUT_HEAD.pack(s, ns, 0) + pack_attr(attr))

    def _readlink(self, ctx: Context, arg: memoryview) -> None:
        self._reply(ctx.unique, self.fs.readlink(ctx, ctx.nodeid))

    def _open_flags(self, o: Opened, isdir: bool) -> int:
        # plain ints: IntFlag arithmetic costs a microsecond per open
        f = _NOFLUSH if o.noflush else 0
        if o.direct_io:
            f |= _DIRECT_IO
        if o.backing_id is not None:
            # The kernel accepts only FOPEN_PASSTHROUGH_MASK together with PASSTHROUGH.
            return f | _PASSTHROUGH
        if o.keep_cache:
            f |= _KEEP_CACHE
        if isdir and o.cache_dir:
            f |= _CACHE_DIR | _KEEP_CACHE
        return f

    def _open(self, ctx: Context, arg: memoryview) -> None:
        flags, _ = abi.OPEN_IN.unpack_from(arg)
        if flags & _ACCMODE_OR_TRUNC:  # O_RDONLY is 0
            raise FuseError(errno.EROFS)
        o = self.fs.open(ctx, ctx.nodeid, flags)
        self._reply(ctx.unique, abi.OPEN_OUT.pack(
            o.fh, self._open_flags(o, False), o.backing_id or 0))

    def _read(self, ctx: Context, arg: memoryview) -> None:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(arg)
        data = self.fs.read(ctx, ctx.nodeid, fh, offset, size)
        if len(data) > size:
            data = memoryview(data)[:size]
        self._reply(ctx.unique, data)

    def _release(self, ctx: Context, arg: memoryview) -> None:
        fh, flags, _rflags, _owner = abi.RELEASE_IN.unpack_from(arg)
        self.fs.release(ctx, ctx.nodeid, fh, flags)
        self._reply(ctx.unique)

    def _opendir(self, ctx: Context, arg: memoryview) -> None:
        flags, _ = abi.OPEN_IN.unpack_from(arg)
        o = self.fs.opendir(ctx, ctx.nodeid, flags)
        self._reply(ctx.unique, abi.OPEN_OUT.pack(o.fh, self._open_flags(o, True), 0))

    def _readdir(self, ctx: Context, arg: memoryview, plus: bool = False) -> None:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(arg)
        out = bytearray()
        for item in self.fs.readdir(ctx, ctx.nodeid, fh, offset):
            n = len(item.name)
            rec = abi.dirent_size(n, plus)
            if len(out) + rec > size:
                break
            if plus:
                out += pack_entry(item.entry) if item.entry is not None else NO_ENTRY
            out += abi.DIRENT_HEAD.pack(item.nodeid, item.next_offset, n, (item.mode >> 12) & 0xF)
            out += item.name
            out += bytes(-len(out) % 8)
        self._reply(ctx.unique, out)

    def _readdirplus(self, ctx: Context, arg: memoryview) -> None:
        self._readdir(ctx, arg, plus=True)

    def _releasedir(self, ctx: Context, arg: memoryview) -> None:
        fh, *_ = abi.RELEASE_IN.unpack_from(arg)
        self.fs.releasedir(ctx, ctx.nodeid, fh)
        self._reply(ctx.unique)

    def _statfs(self, ctx: Context, arg: memoryview) -> None:
        s = self.fs.statfs(ctx, ctx.nodeid)
        self._reply(ctx.unique, abi.KSTATFS.pack(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize))

    def _access(self, ctx: Context, arg: memoryview) -> None:
        mask, _ = abi.ACCESS_IN.unpack_from(arg)
        self.fs.access(ctx, ctx.nodeid, mask)
        self._reply(ctx.unique)
