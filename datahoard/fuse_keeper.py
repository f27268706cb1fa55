"""The FUSE connection keeper: a node-local holder of ``/dev/fuse`` descriptors, so that a FUSE
mount outlives the worker that serves it (issue 17, part 2; ``../shared/facts/fuse-restart.md``).

A FUSE connection lives as long as one descriptor of it does. A worker that has just mounted
DEPOSITs a duplicate of its descriptor here (over a unix socket, ``SCM_RIGHTS``); when the worker
dies, requests wait in the kernel instead of failing, and the next worker CLAIMs the descriptor
and resumes serving it (no second mount, no second FUSE_INIT). On a clean unmount the worker
RELEASEs it. The CSI node plugin hosts the keeper on a node (a long-lived process that is
already there), a small supervisor does in standalone mode (``datahoard/supervisor.py``). Worker
and plugin both import the protocol and neither imports the other.

The protocol (deposit, claim, release, list) is :mod:`keeper_protocol`; a worker's side of it
is :mod:`keeper_client`; the descriptors themselves (passing them, telling their connection and
mount) are :mod:`fuse_fds`'s.

The lease on an entry, and when an entry is dropped: :mod:`keeper_leases`.

The keeper never ``stat``s a mountpoint (see :mod:`fuse_fds` for how it identifies a
connection and its mount without one).

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
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from .fuse_fds import TruncatedMessage, peer, recv_message, send_message
from .keeper_leases import Client, HeldConnections
from .keeper_protocol import MAX_MESSAGE, EntryInfo, KeeperError, Reply, Request

log = logging.getLogger(__name__)

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
        self._lock = threading.Lock()  # guards _clients
        self._held = HeldConnections(max_entries, orphan_timeout, on_change=self._wake)
        self._clients: set[Client] = set()
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
        for client in clients:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        held = self._held.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        log.info("FUSE keeper stopped (%d connection(s) let go)", held)

    def __enter__(self) -> FuseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def entries(self) -> list[EntryInfo]:
        return self._held.entries()

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
                pid, uid = peer(sock)
            except OSError:
                sock.close()
                continue
            client = Client(sock, pid, uid)
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
        FuseKeeper._reply(sock, Reply(status="error", message=message))
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2.0)
            while sock.recv(MAX_MESSAGE):
                pass
        except OSError:
            pass
        sock.close()

    def _serve(self, client: Client) -> None:
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
                    data, fds = recv_message(client.sock, MAX_MESSAGE)
                except TruncatedMessage as exc:
                    self._reply(client.sock, Reply(status="error", message=str(exc)))
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

    def _drop_client(self, client: Client) -> None:
        """The client's connection ended: its leases end, its entries stay claimable."""
        with self._lock:
            self._clients.discard(client)
        self._held.let_go(client)
        client.sock.close()

    @staticmethod
    def _reply(sock: socket.socket, reply: Reply, fd: int | None = None) -> bool:
        """Send without ever blocking: a client that does not read its answers is dropped."""
        data = reply.model_dump_json(exclude_none=True).encode()
        try:
            send_message(sock, data, fd, socket.MSG_DONTWAIT)
            return True
        except OSError:
            return False

    # requests
    def _handle(self, client: Client, data: bytes, fds: list[int]) -> tuple[Reply, int | None]:
        try:
            return self._dispatch(client, data, fds)
        except OSError as exc:  # fstat/dup of what the client sent, mountinfo: its answer, not our end
            log.warning("FUSE keeper: request of pid %d failed: %s", client.pid, exc)
            return Reply(status="error", message=f"the keeper could not do that: {exc}"), None

    def _dispatch(self, client: Client, data: bytes, fds: list[int]) -> tuple[Reply, int | None]:
        try:
            request = Request.model_validate_json(data)
        except ValidationError as exc:
            return Reply(status="error", message=f"bad request: {exc.errors()[0]['msg']}"), None
        if request.op == "list":
            return Reply(status="ok", entries=self.entries()), None
        if not request.mountpoint or not request.mountpoint.startswith("/"):
            return Reply(status="error", message=f"{request.op}: the mountpoint must be an absolute path, "
                                                  f"got {request.mountpoint!r}"), None
        mountpoint = os.path.normpath(request.mountpoint)
        if request.op == "deposit":
            return self._held.deposit(client, mountpoint, request.state or {}, fds), None
        if request.op == "claim":
            return self._held.claim(client, mountpoint)
        return self._held.release(client, mountpoint), None

    # watching held connections
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

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
                    self._held.check()
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
