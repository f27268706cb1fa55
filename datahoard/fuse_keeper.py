"""The FUSE connection keeper: a node-local holder of ``/dev/fuse`` descriptors, so that a FUSE
mount outlives the worker that serves it (issue 17, part 2; ``../shared/facts/fuse-restart.md``).

A FUSE connection lives as long as one descriptor of it does. A worker that has just mounted
DEPOSITs a duplicate of its descriptor here (over a unix socket, ``SCM_RIGHTS``); when the worker
dies, requests wait in the kernel instead of failing, and the next worker CLAIMs the descriptor
and resumes serving it (no second mount, no second FUSE_INIT). On a clean unmount the worker
RELEASEs it. The CSI node plugin hosts the keeper on a node (a long-lived process that is
already there), a small supervisor does in standalone mode (``datahoard/supervisor.py``). Worker
and plugin both import this module and neither imports the other: this is their whole contract.

Protocol: one JSON document per ``SOCK_SEQPACKET`` message (so no framing, and a message and
its descriptor arrive together), a request answered by exactly one reply:

* ``deposit`` (mountpoint, state, + the descriptor) -> ``ok`` | ``refused`` | ``error``
* ``claim`` (mountpoint) -> ``ok`` (state, + a descriptor) | ``none`` | ``refused``
* ``release`` (mountpoint) -> ``ok`` | ``none`` | ``refused``
* ``list`` -> ``ok`` (entries), for ``datahoard status``

``state`` is whatever the FUSE layer needs to resume without an INIT (negotiated protocol
version, flags, max_write...); the keeper keeps it opaque, bounded by the message size.

The lease: a client connection that deposited or claimed an entry holds it for as long as that
connection stays open (a worker keeps its keeper connection open while it serves). A CLAIM or a
DEPOSIT of that mountpoint by anyone else is refused, naming the serving pid: two processes must
never read one FUSE connection (each would get half the requests). When the connection closes
(the worker exited or was SIGKILLed: the kernel closes its socket either way), the entry stays,
held and claimable by the next worker.

An entry is dropped, and its descriptor closed, when the FUSE connection has ended (``poll``
says POLLERR: the mount was unmounted or the connection aborted), when its mountpoint no longer
carries a FUSE mount of that connection (``/proc/self/mountinfo``: lazily detached), on RELEASE,
and when no worker has claimed it for ``orphan_timeout`` seconds: readers then fail (ENOTCONN,
as without a keeper) instead of waiting forever for a worker that is not coming.

The keeper never ``stat``s a mountpoint: on a held connection whose worker is down, a stat waits
for the next worker. It identifies a connection by ``fuse_connection`` in the descriptor's
``/proc/self/fdinfo`` (the minor device number of the mount, Linux 6.x) and the mount by the
``0:<minor>`` device in mountinfo.

Cost (measured here, 2 cores under a load average of ~12, Python 3.11, kernel 6.18): connect +
claim + close 1.6 ms, a claim on an open connection 0.35 ms; the keeper adds nothing to a
restart's stall that a reader could notice. It is a thread per client (capped) and one watcher
that polls the held descriptors once a second.

Access: only root and the keeper's own uid (``SO_PEERCRED``), and the socket's directory is
0700. Bounded: every client exchange has a timeout, the keeper never blocks on a client (a reply
that does not fit is a dropped client), and entries and clients are capped.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .mounts import read_mountinfo

log = logging.getLogger(__name__)

#: Largest message either side sends or accepts (the INIT state is a few hundred bytes).
MAX_MESSAGE = 64 * 1024
#: Seconds a client waits for the keeper's answer (and to connect).
CLIENT_TIMEOUT = 5.0
#: Entries (FUSE connections) one keeper holds: one per Dataset on a node, so far above need.
MAX_ENTRIES = 256
#: Client connections served at once (one per live worker, plus short-lived status calls).
MAX_CLIENTS = 128
#: Seconds an entry no worker has claimed is kept (the worker is down that long: readers then
#: get errors instead of waiting on). Kubelet's crash-loop back-off reaches 5 minutes; a worker
#: that has crashed that often is not about to serve.
ORPHAN_TIMEOUT = 300.0
#: Seconds between checks that held connections are still mounted.
CHECK_INTERVAL = 1.0

#: /dev/fuse is the misc character device 10:229.
_FUSE_RDEV = os.makedev(10, 229)
_UCRED = struct.Struct("3i")


class KeeperError(Exception):
    """The keeper answered with an error, or the exchange failed; the message says which."""


class KeeperUnavailable(KeeperError):
    """No keeper runs at the socket (or we may not talk to it): the worker then falls back to
    mounting fresh, and the CSI plugin repairs the binds, as before the keeper existed."""


class KeeperRefused(KeeperError):
    """Another live worker holds the mountpoint's connection; ``pid`` is that worker."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


# -- wire format (pydantic: this is an edge, any local process of the right uid may write it) --
class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["deposit", "claim", "release", "list"]
    mountpoint: str | None = Field(default=None, max_length=4096)
    state: dict[str, Any] | None = None


class EntryInfo(BaseModel):
    """One held connection, as ``list`` reports it."""

    mountpoint: str
    connection: int | None
    #: The pid serving it now (the lease holder), or None while no worker does.
    served_by: int | None
    held_seconds: float
    #: Seconds since the last worker let go, while unclaimed.
    unclaimed_seconds: float | None = None


class _Reply(BaseModel):
    status: Literal["ok", "none", "refused", "error"]
    message: str = ""
    pid: int | None = None
    state: dict[str, Any] | None = None
    entries: list[EntryInfo] | None = None


@dataclass(frozen=True)
class Claimed:
    """A claimed connection: ``fd`` is ours to serve (and to close); ``state`` as deposited."""

    fd: int
    state: dict[str, Any]


# -- the pieces of /proc the keeper relies on --------------------------------------------------
def fuse_connection(fd: int) -> int | None:
    """The FUSE connection id of a /dev/fuse descriptor (``fuse_connection`` in fdinfo, equal
    to the minor device number of its mount), or None on a kernel that does not show it."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "fuse_connection":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def fuse_mounts() -> set[tuple[str, int]]:
    """(mountpoint, minor device) of every FUSE mount this process can see."""
    return {(m.mountpoint, m.anonymous_minor) for m in read_mountinfo()
            if m.fstype.startswith("fuse") and m.anonymous_minor is not None}


def _peer(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and its descriptors; b"" at end of stream. A truncated message is an error
    (and its descriptors are closed, never leaked)."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise KeeperError(f"message longer than {MAX_MESSAGE} bytes or with more than one descriptor")
    return data, fds


# -- server --------------------------------------------------------------------------------
@dataclass(eq=False)
class _Client:
    sock: socket.socket
    pid: int
    uid: int


@dataclass(eq=False)
class _Entry:
    mountpoint: str
    fd: int
    state: dict[str, Any]
    connection: int | None
    deposited: float = field(default_factory=time.monotonic)
    lease: _Client | None = None
    #: Monotonic time the last lease ended, while no worker holds one.
    unclaimed_since: float | None = None


class FuseKeeper:
    """Serve the keeper protocol on ``path`` from threads of this process.

    ``start()`` binds (refusing to take over a socket another keeper answers on), ``stop()``
    closes everything, the held descriptors too: a connection whose worker is alive keeps
    going on the worker's own descriptor; one whose worker is down then ends.
    """

    def __init__(self, path: str | os.PathLike, *, max_entries: int = MAX_ENTRIES,
                 max_clients: int = MAX_CLIENTS, orphan_timeout: float = ORPHAN_TIMEOUT,
                 check_interval: float = CHECK_INTERVAL) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_clients = max_clients
        self.orphan_timeout = orphan_timeout
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._clients: set[_Client] = set()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = -1, -1
        self._inode = -1

    # lifecycle
    def start(self) -> FuseKeeper:
        if len(os.fsencode(self.path)) >= 108:
            raise KeeperError(f"keeper socket path {self.path} is longer than a unix socket path may be "
                              f"(107 bytes); set DATAHOARD_RUN_DIR to a shorter directory")
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise KeeperError(f"{self.path} exists and is not a socket; remove it")
            if _answers(self.path):
                raise KeeperError(f"another FUSE keeper already serves on {self.path}")
            os.unlink(self.path)  # left by a keeper that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            self._inode = os.lstat(self.path).st_ino
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for target, name in ((self._accept_loop, "keeper-accept"), (self._watch_loop, "keeper-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("FUSE keeper serving on %s", self.path)
        return self

    def problem(self) -> str | None:
        """Why workers cannot reach this keeper now, or None: its threads ended, or its socket
        file is gone or replaced (a cleanup of the run dir), so a worker would find no keeper."""
        if self._stopping.is_set() or not self._threads:
            return "the FUSE keeper is not running"
        if not all(t.is_alive() for t in self._threads):
            return "the FUSE keeper's threads have stopped"
        try:
            if os.lstat(self.path).st_ino != self._inode:
                return f"the FUSE keeper's socket {self.path} was replaced"
        except FileNotFoundError:
            return f"the FUSE keeper's socket {self.path} was removed"
        return None

    def alive(self) -> bool:
        return self.problem() is None

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            try:
                if os.lstat(self.path).st_ino == self._inode:  # not a successor's socket
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._wake()
        with self._lock:
            clients, self._clients = list(self._clients), set()
            entries, self._entries = list(self._entries.values()), {}
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        for entry in entries:
            os.close(entry.fd)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        log.info("FUSE keeper stopped (%d connection(s) let go)", len(entries))

    def __enter__(self) -> FuseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def entries(self) -> list[EntryInfo]:
        now = time.monotonic()
        with self._lock:
            return [EntryInfo(mountpoint=e.mountpoint, connection=e.connection,
                              served_by=e.lease.pid if e.lease else None,
                              held_seconds=round(now - e.deposited, 3),
                              unclaimed_seconds=None if e.unclaimed_since is None
                              else round(now - e.unclaimed_since, 3))
                    for e in self._entries.values()]

    # connections
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: do not spin
                continue
            try:
                pid, uid = _peer(sock)
            except OSError:
                sock.close()
                continue
            client = _Client(sock, pid, uid)
            with self._lock:
                full = len(self._clients) >= self.max_clients
                if not full:
                    self._clients.add(client)
            if full:
                threading.Thread(target=self._refuse, args=(sock, f"the FUSE keeper serves {self.max_clients} "
                                 f"clients already"), name="keeper-refuse", daemon=True).start()
                continue
            threading.Thread(target=self._serve, args=(client,), name=f"keeper-client-{pid}", daemon=True).start()

    @staticmethod
    def _refuse(sock: socket.socket, message: str) -> None:
        """Say why, then close only once the client has read it: closing a unix socket with
        the client's request still unread makes the client's recv fail with ECONNRESET, and it
        would never see the reason. Bounded: 2 s for the client to read and close."""
        FuseKeeper._reply(sock, _Reply(status="error", message=message))
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2.0)
            while sock.recv(MAX_MESSAGE):
                pass
        except OSError:
            pass
        sock.close()

    def _serve(self, client: _Client) -> None:
        if client.uid not in (0, os.geteuid()):
            log.warning("FUSE keeper: refused pid %d of uid %d", client.pid, client.uid)
            with self._lock:
                self._clients.discard(client)
            self._refuse(client.sock, f"uid {client.uid} may not use the FUSE keeper "
                                      f"(only root and uid {os.geteuid()})")
            return
        try:
            while not self._stopping.is_set():
                try:
                    data, fds = _recv(client.sock)
                except KeeperError as exc:
                    self._reply(client.sock, _Reply(status="error", message=str(exc)))
                    break
                except OSError:
                    break
                if not data:
                    break
                out_fd = None
                try:
                    reply, out_fd = self._handle(client, data, fds)
                    sent = self._reply(client.sock, reply, out_fd)
                finally:
                    for fd in fds:  # _handle dup()s what it keeps
                        os.close(fd)
                    if out_fd is not None:  # our duplicate; the client has its own now
                        os.close(out_fd)
                if not sent:
                    break
        finally:
            self._drop_client(client)

    def _drop_client(self, client: _Client) -> None:
        """The client's connection ended: its leases end, its entries stay claimable."""
        now = time.monotonic()
        with self._lock:
            self._clients.discard(client)
            for entry in self._entries.values():
                if entry.lease is client:
                    entry.lease = None
                    entry.unclaimed_since = now
                    log.info("FUSE keeper: pid %d let go of %s; the connection is held for the next worker",
                             client.pid, entry.mountpoint)
        client.sock.close()

    @staticmethod
    def _reply(sock: socket.socket, reply: _Reply, fd: int | None = None) -> bool:
        """Send without ever blocking: a client that does not read its answers is dropped."""
        data = reply.model_dump_json(exclude_none=True).encode()
        try:
            socket.send_fds(sock, [data], [fd] if fd is not None else [], socket.MSG_DONTWAIT)
            return True
        except OSError:
            return False

    @staticmethod
    def _held_by_other(entry: _Entry, client: _Client) -> _Client | None:
        """The other client whose lease on ``entry`` is live, if any. Called under the lock.

        A lease whose socket the peer has closed counts as ended even before its thread has
        seen the EOF: a worker restarted at once (or under load) must not be refused by the
        ghost of the one it replaces. Checked without reading (POLLHUP/POLLRDHUP); the socket
        cannot be closed meanwhile, since its thread clears the lease under the lock first."""
        lease = entry.lease
        if lease is None or lease is client:
            return None
        poller = select.poll()
        poller.register(lease.sock, select.POLLRDHUP)
        ended = any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL)
                    for _, ev in poller.poll(0))
        return None if ended else lease

    # requests
    def _handle(self, client: _Client, data: bytes, fds: list[int]) -> tuple[_Reply, int | None]:
        try:
            return self._dispatch(client, data, fds)
        except OSError as exc:  # fstat/dup of what the client sent, mountinfo: its answer, not our end
            log.warning("FUSE keeper: request of pid %d failed: %s", client.pid, exc)
            return _Reply(status="error", message=f"the keeper could not do that: {exc}"), None

    def _dispatch(self, client: _Client, data: bytes, fds: list[int]) -> tuple[_Reply, int | None]:
        try:
            request = _Request.model_validate_json(data)
        except ValidationError as exc:
            return _Reply(status="error", message=f"bad request: {exc.errors()[0]['msg']}"), None
        if request.op == "list":
            return _Reply(status="ok", entries=self.entries()), None
        if not request.mountpoint or not request.mountpoint.startswith("/"):
            return _Reply(status="error", message=f"{request.op}: the mountpoint must be an absolute path, "
                                                  f"got {request.mountpoint!r}"), None
        mountpoint = os.path.normpath(request.mountpoint)
        if request.op == "deposit":
            return self._deposit(client, mountpoint, request.state or {}, fds), None
        if request.op == "claim":
            return self._claim(client, mountpoint)
        return self._release(client, mountpoint), None

    def _deposit(self, client: _Client, mountpoint: str, state: dict[str, Any], fds: list[int]) -> _Reply:
        if len(fds) != 1:
            return _Reply(status="error", message="deposit: send exactly one /dev/fuse descriptor with it")
        st = os.fstat(fds[0])
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _FUSE_RDEV:
            return _Reply(status="error", message="deposit: the descriptor is not /dev/fuse")
        connection = fuse_connection(fds[0])
        if connection is not None and (mountpoint, connection) not in fuse_mounts():
            return _Reply(status="error", message=(
                f"deposit: {mountpoint} carries no FUSE mount of this connection ({connection}); deposit "
                f"after mounting, with the mountpoint as /proc/self/mountinfo shows it"))
        with self._lock:
            old = self._entries.get(mountpoint)
            if old is not None and (holder := self._held_by_other(old, client)):
                return _Reply(status="refused", pid=holder.pid, message=f"{mountpoint} is served by pid {holder.pid}")
            if old is None and len(self._entries) >= self.max_entries:
                return _Reply(status="error", message=f"the FUSE keeper holds {self.max_entries} connections "
                                                      f"already (its cap)")
            self._entries[mountpoint] = _Entry(mountpoint, os.dup(fds[0]), state, connection, lease=client)
        if old is not None:
            os.close(old.fd)  # a fresh mount replaced the one held
        self._wake()
        log.info("FUSE keeper: pid %d deposited %s (connection %s)", client.pid, mountpoint, connection)
        return _Reply(status="ok")

    def _claim(self, client: _Client, mountpoint: str) -> tuple[_Reply, int | None]:
        self._check(mountpoint)
        with self._lock:
            entry = self._entries.get(mountpoint)
            if entry is None:
                return _Reply(status="none", message=f"no FUSE connection of {mountpoint} is held"), None
            if holder := self._held_by_other(entry, client):
                return _Reply(status="refused", pid=holder.pid,
                              message=f"{mountpoint} is served by pid {holder.pid}"), None
            entry.lease, entry.unclaimed_since = client, None
            log.info("FUSE keeper: pid %d claimed %s (connection %s)", client.pid, mountpoint, entry.connection)
            # A duplicate taken under the lock: the watcher may drop (close) the entry's own
            # descriptor at any moment, and a closed number may be reused by then.
            return _Reply(status="ok", state=entry.state), os.dup(entry.fd)

    def _release(self, client: _Client, mountpoint: str) -> _Reply:
        with self._lock:
            entry = self._entries.get(mountpoint)
            if entry is None:
                return _Reply(status="none", message=f"no FUSE connection of {mountpoint} is held")
            if holder := self._held_by_other(entry, client):
                return _Reply(status="refused", pid=holder.pid, message=f"{mountpoint} is served by pid {holder.pid}")
            del self._entries[mountpoint]
        os.close(entry.fd)
        log.info("FUSE keeper: pid %d released %s", client.pid, mountpoint)
        return _Reply(status="ok")

    # watching held connections
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _drop(self, entry: _Entry, why: str) -> None:
        with self._lock:
            if self._entries.get(entry.mountpoint) is not entry:
                return
            del self._entries[entry.mountpoint]
        os.close(entry.fd)
        log.info("FUSE keeper: dropped %s (%s)", entry.mountpoint, why)

    def _check(self, mountpoint: str | None = None) -> None:
        """Drop entries whose connection ended, is no longer mounted, or waited too long."""
        with self._lock:
            entries = [e for e in self._entries.values() if mountpoint is None or e.mountpoint == mountpoint]
        if not entries:
            return
        poller = select.poll()
        for entry in entries:
            poller.register(entry.fd, 0)  # only POLLERR/POLLHUP/POLLNVAL: requests waiting are POLLIN
        ended = {fd for fd, _ in poller.poll(0)}
        mounted = fuse_mounts()
        now = time.monotonic()
        for entry in entries:
            if entry.fd in ended:
                self._drop(entry, "the FUSE connection ended: unmounted or aborted")
            elif entry.connection is not None and (entry.mountpoint, entry.connection) not in mounted:
                self._drop(entry, "no FUSE mount of this connection at the mountpoint any more")
            elif entry.unclaimed_since is not None and now - entry.unclaimed_since > self.orphan_timeout:
                self._drop(entry, f"no worker claimed it for {self.orphan_timeout:g} s; readers now get errors")

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                select.select([self._wake_r], [], [], self.check_interval)
                while True:
                    try:
                        if not os.read(self._wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                if not self._stopping.is_set():
                    self._check()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("FUSE keeper: checking held connections failed: %s", exc)
                time.sleep(self.check_interval)


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


# -- client --------------------------------------------------------------------------------
class KeeperClient:
    """A worker's connection to the keeper. Keep it open while serving: it is the lease.

    Mountpoints are canonicalised without a stat (``runtime.canonical_mountpoint``) to the
    form mountinfo shows. Every exchange waits at most ``timeout`` seconds.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = CLIENT_TIMEOUT) -> None:
        from .runtime import keeper_socket

        self.path = Path(path) if path is not None else keeper_socket()
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise KeeperUnavailable(f"no FUSE keeper runs at {self.path} ({exc.strerror}): a worker restart "
                                    f"will remount, and readers see errors meanwhile") from None
        except PermissionError:
            sock.close()
            raise KeeperUnavailable(f"may not use the FUSE keeper at {self.path} (permission denied: only "
                                    f"root and the keeper's own user may)") from None
        except OSError as exc:
            sock.close()
            raise KeeperUnavailable(f"cannot reach the FUSE keeper at {self.path}: {exc}") from None
        self._sock: socket.socket | None = sock

    def _exchange(self, request: _Request, fd: int | None = None) -> tuple[_Reply, int | None]:
        if self._sock is None:
            raise KeeperError("the keeper connection is closed")
        data = request.model_dump_json(exclude_none=True).encode()
        if len(data) > MAX_MESSAGE:
            raise KeeperError(f"{request.op}: the message is {len(data)} bytes, more than {MAX_MESSAGE}")
        try:
            try:
                socket.send_fds(self._sock, [data], [fd] if fd is not None else [])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the keeper said why before closing (a refused uid, too many clients): read it
            answer, fds = _recv(self._sock)
        except TimeoutError:
            raise KeeperError(f"the FUSE keeper at {self.path} did not answer {request.op} within "
                              f"{self.timeout:g} s") from None
        except OSError as exc:
            raise KeeperError(f"{request.op} to the FUSE keeper at {self.path} failed: {exc}") from None
        if not answer:
            raise KeeperError(f"the FUSE keeper at {self.path} closed the connection")
        try:
            reply = _Reply.model_validate_json(answer)
        except ValidationError:
            for got in fds:
                os.close(got)
            raise KeeperError(f"unreadable answer from the FUSE keeper at {self.path}") from None
        if reply.status == "error":
            for got in fds:
                os.close(got)
            raise KeeperError(reply.message)
        if reply.status == "refused":
            for got in fds:
                os.close(got)
            raise KeeperRefused(reply.message, reply.pid)
        return reply, (fds[0] if fds else None)

    @staticmethod
    def _canonical(mountpoint: str | os.PathLike) -> str:
        from .runtime import canonical_mountpoint

        return canonical_mountpoint(mountpoint)

    def deposit(self, mountpoint: str | os.PathLike, state: dict[str, Any], fd: int) -> None:
        """Hand the keeper a duplicate of ``fd`` (ours stays ours) and take the lease."""
        self._exchange(_Request(op="deposit", mountpoint=self._canonical(mountpoint), state=state), fd)

    def claim(self, mountpoint: str | os.PathLike) -> Claimed | None:
        """The held connection of ``mountpoint`` and the lease on it, or None when none is held.
        Raises :class:`KeeperRefused` while another live worker serves it."""
        reply, fd = self._exchange(_Request(op="claim", mountpoint=self._canonical(mountpoint)))
        if reply.status == "none":
            return None
        if fd is None:
            raise KeeperError("the FUSE keeper answered a claim without a descriptor")
        return Claimed(fd, reply.state or {})

    def release(self, mountpoint: str | os.PathLike) -> bool:
        """The keeper lets go of ``mountpoint``'s connection (a clean unmount); False if it held none."""
        reply, _ = self._exchange(_Request(op="release", mountpoint=self._canonical(mountpoint)))
        return reply.status == "ok"

    def entries(self) -> list[EntryInfo]:
        reply, _ = self._exchange(_Request(op="list"))
        return reply.entries or []

    def connected(self) -> bool:
        """Whether the keeper is still at the other end (it closes its side when it stops: a
        CSI plugin restart). Never blocks: one poll of the socket."""
        if self._sock is None:
            return False
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)  # the keeper never speaks first: any event means it is gone

    def close(self) -> None:
        """Ends the lease: what this client deposited or claimed stays held, claimable."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> KeeperClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(path: str | os.PathLike, mountpoint: str | os.PathLike, timeout: float = 1.0) -> str:
    """One line for ``datahoard status``: does a keeper hold this mount's connection?"""
    try:
        with KeeperClient(path, timeout=timeout) as client:
            entries = client.entries()
    except KeeperError as exc:
        return f"none ({exc})" if not isinstance(exc, KeeperUnavailable) else "none: worker restarts remount"
    from .runtime import canonical_mountpoint

    wanted = canonical_mountpoint(mountpoint)
    for entry in entries:
        if entry.mountpoint == wanted:
            who = f"served by pid {entry.served_by}" if entry.served_by else "no worker serving it now"
            return f"holds the FUSE connection ({entry.connection}), {who}: a worker restart is not seen by readers"
    return (f"running at {path}, but holds no connection of this mount: the worker does not hand it over "
            f"yet, so a worker restart remounts")

