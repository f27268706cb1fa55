"""A small read-only mirror of a directory served by fusell, run as a separate process by
tests/cache_worker/test_fusell.py and the fusell benchmark.

Node ids come from a table built by walking the source in sorted order, so a second process
over the same tree gives every path the same id (what a resumed connection needs).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time

from datahoard.cache_worker.fusell.passthrough import BackingTable
from datahoard.cache_worker.fusell.handshake import Wants
from datahoard.cache_worker.fusell.session import (
    Attr, Connection, DirItem, Entry, Filesystem, FuseError, InitState, Opened, Session, StatFs,
)


class Mirror(Filesystem):
    def __init__(self, root: str, *, no_open: bool = False, hold: str | None = None,
                 hold_signal: str | None = None, timeout: float = 1.0,
                 keep_cache: bool = True, naive_passthrough: bool = False):
        self.root = root
        self.no_open = no_open
        self.hold, self.hold_signal = hold, hold_signal
        self.timeout = timeout
        self.keep_cache = keep_cache
        self.naive = naive_passthrough
        self.table: BackingTable | None = None
        self.conn: Connection | None = None
        self.paths: dict[int, str] = {1: root}
        self.names: dict[tuple[int, bytes], int] = {}
        self.children: dict[int, list[tuple[bytes, int]]] = {1: []}
        self.fds: dict[int, int] = {}
        self._lock = threading.Lock()
        ids = {root: 1}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            parent = ids[dirpath]
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                nodeid = len(self.paths) + 1
                ids[full] = nodeid
                self.paths[nodeid] = full
                self.names[(parent, os.fsencode(name))] = nodeid
                self.children[parent].append((os.fsencode(name), nodeid))
                if name in dirnames:
                    self.children[nodeid] = []

    def _attr(self, nodeid: int) -> Attr:
        try:
            st = os.lstat(self.paths[nodeid])
        except KeyError:
            raise FuseError(errno.ENOENT) from None
        return Attr(ino=nodeid, size=st.st_size, mode=st.st_mode, nlink=st.st_nlink,
                    uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                    ctime_ns=st.st_ctime_ns, atime_ns=st.st_atime_ns)

    def _entry(self, nodeid: int) -> Entry:
        return Entry(nodeid, self._attr(nodeid), entry_timeout=self.timeout,
                     attr_timeout=self.timeout)

    def lookup(self, ctx, parent, name):
        nodeid = self.names.get((parent, name))
        if nodeid is None:
            raise FuseError(errno.ENOENT)
        return self._entry(nodeid)

    def getattr(self, ctx, nodeid, fh):
        return self._attr(nodeid), self.timeout

    def open(self, ctx, nodeid, flags):
        if self.no_open:
            raise FuseError(errno.ENOSYS)
        path = self.paths[nodeid]
        if self.naive and self.conn.state.passthrough:
            fd = os.open(path, os.O_RDONLY)
            try:
                return Opened(fh=0, backing_id=self.conn.backing_open(fd))
            finally:
                os.close(fd)
        if self.table is not None:
            c = self.table.open(nodeid, lambda: os.open(path, os.O_RDONLY))
            return Opened(fh=c.fh, backing_id=c.backing_id, keep_cache=self.keep_cache)
        return Opened(fh=0, keep_cache=self.keep_cache)

    def _fd(self, nodeid: int) -> int:
        fd = self.fds.get(nodeid)
        if fd is None:
            with self._lock:
                fd = self.fds.get(nodeid)
                if fd is None:
                    fd = self.fds[nodeid] = os.open(self.paths[nodeid], os.O_RDONLY)
        return fd

    def read(self, ctx, nodeid, fh, offset, size):
        if os.path.basename(self.paths[nodeid]) == "boom":
            raise RuntimeError("a handler bug: the session must answer EIO and keep serving")
        if self.hold is not None and os.path.basename(self.paths[nodeid]) == self.hold:
            with open(self.hold_signal, "w") as f:
                f.write(str(offset))
            threading.Event().wait()  # held until this process dies
        return os.pread(self._fd(nodeid), size, offset)

    def release(self, ctx, nodeid, fh, flags):
        if self.table is not None:
            self.table.release(nodeid, fh)

    def opendir(self, ctx, nodeid, flags):
        if nodeid not in self.children:
            raise FuseError(errno.ENOTDIR)
        return Opened()

    def readdir(self, ctx, nodeid, fh, offset):
        items = [(b".", nodeid), (b"..", 1)] + self.children[nodeid]
        for i in range(offset, len(items)):
            name, child = items[i]
            mode = stat.S_IFDIR if child in self.children else stat.S_IFREG
            entry = self._entry(child) if name not in (b".", b"..") else None
            yield DirItem(name, child, mode, i + 1, entry)

    def statfs(self, ctx, nodeid):
        s = os.statvfs(self.root)
        return StatFs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                      255, s.f_frsize)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("--mount")
    p.add_argument("--rw", action="store_true", help="mount without MS_RDONLY")
    p.add_argument("--resume-fd", type=int)
    p.add_argument("--state")
    p.add_argument("--resend", action="store_true")
    p.add_argument("--send-fd", help="unix socket to send the /dev/fuse fd and state to")
    p.add_argument("--no-open", action="store_true")
    p.add_argument("--no-passthrough", action="store_true")
    p.add_argument("--naive-passthrough", action="store_true")
    p.add_argument("--table")
    p.add_argument("--hold")
    p.add_argument("--hold-signal")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--no-keep-cache", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    fs = Mirror(a.source, no_open=a.no_open, hold=a.hold, hold_signal=a.hold_signal,
                timeout=a.timeout, naive_passthrough=a.naive_passthrough,
                keep_cache=not a.no_keep_cache)
    if a.resume_fd is not None:
        conn = Connection.resume(a.resume_fd, InitState.from_json(a.state))
    else:
        conn = Connection.mount(a.mount, fsname="mirror", subtype="fusell-test",
                                read_only=not a.rw)
    fs.conn = conn
    session = Session(conn, fs, threads=a.threads, want=Wants(passthrough=not a.no_passthrough))
    signal.signal(signal.SIGTERM, lambda *_: session.stop())

    def after_ready() -> None:
        session.ready.wait()
        if a.table:
            fs.table = BackingTable(a.table, conn)
        if a.resend:
            conn.notify_resend()
        if a.send_fd:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(a.send_fd)
                socket.send_fds(s, [conn.state.to_json().encode()], [conn.fd])
        print("READY", conn.state.to_json(), flush=True)

    if a.table and a.resume_fd is not None:
        fs.table = BackingTable(a.table, conn)  # before the first (resent) request
    threading.Thread(target=after_ready, daemon=True).start()
    how = session.serve()
    print("SERVE-RETURNED", how, flush=True)
    sys.stdout.flush()
    time.sleep(0)


if __name__ == "__main__":
    main()
