"""Each opcode's request decoded from its struct, handed to the :class:`~.filesystem.Filesystem`,
and its answer packed into the reply; the session's loop (session.py) picks the handler by
opcode from a table built once, so the handler is the only call between the loop and the view.

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
"""

from __future__ import annotations

import errno
import logging
import os

from . import abi
from .model import Context, FuseError, Opened
from .wire import NO_ENTRY, pack_attr, pack_entry, secs

log = logging.getLogger("datahoard.cache_worker.fusell.session")  # one log for the session, as before the split

_NOFLUSH, _DIRECT_IO, _PASSTHROUGH = (
    int(abi.Fopen.NOFLUSH), int(abi.Fopen.DIRECT_IO), int(abi.Fopen.PASSTHROUGH))
_KEEP_CACHE, _CACHE_DIR = int(abi.Fopen.KEEP_CACHE), int(abi.Fopen.CACHE_DIR)
_ACCMODE_OR_TRUNC = os.O_ACCMODE | os.O_TRUNC


class Opcodes:
    """The handler of every opcode but INIT (handshake.py).
    A part of :class:`.session.Session`, which sets up the state in ``__init__``."""

    def _noreply(self, ctx: Context, arg: memoryview) -> None:
        pass

    def _erofs(self, ctx: Context, arg: memoryview) -> None:
        raise FuseError(errno.EROFS)

    def _destroy(self, ctx: Context, arg: memoryview) -> None:
        self.fs.destroy()
        self._reply(ctx.unique)

    def _lookup(self, ctx: Context, arg: memoryview) -> None:
        name = bytes(arg).split(b"\0", 1)[0]
        native = self.native if self.fs.names_immutable else None
        epoch = native.names_epoch() if native is not None else 0
        e = self.fs.lookup(ctx, ctx.nodeid, name)
        entry_out = pack_entry(e)
        self._reply(ctx.unique, entry_out)
        if native is not None and e.nodeid:
            native.remember(epoch, ctx.nodeid, name, entry_out)

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
