"""FUSE_INIT: what the session asks the kernel for, and what they agree.

The kernel offers its flags once per connection; the session answers with the subset it wants
(:class:`Wants`) and the limits it serves within, and keeps the result as the connection's
:class:`~.state.InitState`, which a process resuming the connection reads back instead of an
INIT (state.py). The kernel grants at most what it offers: passthrough only if it offered
FUSE_PASSTHROUGH, and then with ``max_stack_depth`` 1 (passthrough.py, rule 6). A kernel
speaking a newer major version is answered with 7 and sends INIT again.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from . import abi
from .model import ConnInfo, Context, FuseError
from .state import InitState

log = logging.getLogger("datahoard.cache_worker.fusell.session")  # one log for the session, as before the split


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


class Handshake:
    """Answers FUSE_INIT.
    A part of :class:`.session.Session`, which sets up the state in ``__init__``."""

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
