"""The standalone mount's supervisor: holds the FUSE keeper and restarts a worker that dies.

On a node the CSI plugin holds the keeper (``datahoard/fuse_keeper.py``) and kubelet restarts
workers. ``datahoard mount`` on one machine has neither, so the background mount starts this
small process first: it serves a keeper on the mount's own socket
(``runtime.mount_keeper_socket``, passed to the worker as ``$DATAHOARD_KEEPER_SOCKET``), starts
the worker, and when the worker dies with an error (a crash, SIGKILL, an OOM kill) starts it
again after a back-off (0.5 s doubling to 30 s, at most ``--max-restarts`` times in a row; a
worker that served for 10 minutes resets the count). It stops without restarting when the
worker exits 0 (unmounted) or is stopped with SIGTERM/SIGINT (``datahoard umount``), when it
is itself stopped, and when the view is gone or another mount/umount of it holds the mount lock.

It restarts the worker only while a FUSE mount is still at the mountpoint: that is what tells a
crash from an unmount. The restarted worker resumes the held connection (once the worker
claims it from the keeper) or, as before, detaches the dead view and mounts afresh. When the
supervisor gives up or is stopped, the keeper closes what it holds: readers then get errors, as
with no keeper.

The first worker's readiness reaches ``datahoard mount`` through this process (``--ready-fd``):
lines are forwarded until "ready" or "error", so a worker that fails to start is reported as
before and never restarted.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import runtime
from .fuse_fds import fuse_mounts
from .fuse_keeper import FuseKeeper
from .keeper_protocol import KeeperError

log = logging.getLogger("datahoard.supervisor")

#: Restarts in a row before giving up (``--max-restarts``).
MAX_RESTARTS = 5
#: Back-off before the first restart, doubled each time up to BACKOFF_MAX.
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: A worker that ran this long before dying starts the count again.
STABLE_SECONDS = 600.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m datahoard.supervisor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--mountpoint", required=True, type=Path)
    parser.add_argument("--ready-fd", type=int, help="where datahoard mount reads the first worker's progress")
    parser.add_argument("--lock-fd", type=int, help="the mount lock, held for the first worker")
    parser.add_argument("--max-restarts", type=int, default=MAX_RESTARTS)
    parser.add_argument("--no-keeper", dest="keeper", action="store_false",
                        help="restart the worker but hold no FUSE connection")
    parser.add_argument("worker", nargs=argparse.REMAINDER, help="-- then the worker's command line")
    args = parser.parse_args(argv)
    if args.worker[:1] == ["--"]:
        args.worker = args.worker[1:]
    if not args.worker:
        parser.error("no worker command after --")
    return args


class Supervisor:
    def __init__(self, mountpoint: Path, worker: list[str], max_restarts: int = MAX_RESTARTS,
                 keeper: bool = True) -> None:
        self.mountpoint = runtime.canonical_mountpoint(mountpoint)
        self.worker = worker
        self.max_restarts = max_restarts
        self.keeper: FuseKeeper | None = None
        self.env = dict(os.environ)
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        path = runtime.mount_keeper_socket(self.mountpoint)
        # Set even with no keeper: the worker then finds none there (and mounts afresh) rather
        # than the node's default socket, which is some other process's business.
        self.env[runtime.KEEPER_SOCKET_ENV] = str(path)
        if keeper:
            try:
                self.keeper = FuseKeeper(path).start()
            except (KeeperError, OSError) as exc:
                log.warning("no FUSE keeper for %s (%s): a worker restart will remount", self.mountpoint, exc)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop the worker (with ``signum``) and do not restart it."""
        self.stopping.set()
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signum)
            except ProcessLookupError:
                pass

    def _spawn(self, extra: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen:
        # Same process group as ours (datahoard mount started us as a session leader), so that
        # stopping the group stops both.
        self.child = subprocess.Popen([*self.worker, *extra], pass_fds=pass_fds, env=self.env,
                                      stdin=subprocess.DEVNULL)
        return self.child

    def first(self, ready_fd: int | None, lock_fd: int | None) -> bool:
        """Start the first worker and forward its progress; True once it reported ready."""
        extra: list[str] = []
        fds: list[int] = []
        pipe_r = pipe_w = None
        if ready_fd is not None:
            pipe_r, pipe_w = os.pipe()
            extra += ["--ready-fd", str(pipe_w)]
            fds.append(pipe_w)
        if lock_fd is not None:
            extra += ["--lock-fd", str(lock_fd)]
            fds.append(lock_fd)
        self._spawn(extra, tuple(fds))
        for fd in fds:
            os.close(fd)  # the worker has them; ours would keep the lock held and the pipe open
        if pipe_r is None:
            return True
        ready = False
        assert ready_fd is not None
        with os.fdopen(pipe_r, "rb", buffering=0) as source, os.fdopen(ready_fd, "wb", buffering=0) as sink:
            pending = b""
            while True:
                data = source.read(65536)
                if not data:
                    break
                try:
                    sink.write(data)
                except OSError:
                    pass  # datahoard mount gave up waiting; the worker runs on regardless
                pending = (pending + data)[-4096:]
                lines = pending.split(b"\n")
                if any(line.startswith(b"ready") for line in lines[:-1]):
                    ready = True
                    break
                if any(line.startswith(b"error") for line in lines[:-1]):
                    break
        return ready

    def run(self, ready_fd: int | None, lock_fd: int | None) -> int:
        if not self.first(ready_fd, lock_fd):
            assert self.child is not None
            return self.child.wait()
        restarts = 0
        backoff = BACKOFF_START
        while True:
            assert self.child is not None
            started = time.monotonic()
            code = self.child.wait()
            if self.stopping.is_set() or code in (0, -signal.SIGTERM, -signal.SIGINT):
                log.info("worker exited (%s); supervisor done", code)
                return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            if time.monotonic() - started > STABLE_SECONDS:
                restarts, backoff = 0, BACKOFF_START
            if restarts >= self.max_restarts:
                log.error("worker exited (%s) after %d restart(s); giving up (datahoard umount %s clears the view)",
                          code, restarts, self.mountpoint)
                return 1
            restarts += 1
            log.warning("worker exited (%s); restart %d of %d in %.1f s", code, restarts, self.max_restarts, backoff)
            if self.stopping.wait(backoff):
                return 0
            backoff = min(backoff * 2, BACKOFF_MAX)
            if not self._restart():
                return 0

    def _restart(self) -> bool:
        """Start the next worker under the mount lock, if the view is still there to serve."""
        try:
            lock = runtime.MountLock(self.mountpoint)
        except runtime.MountBusy as exc:
            log.info("a mount or umount of %s is in progress (%s); not restarting", self.mountpoint, exc)
            return False
        with lock:
            if not any(path == self.mountpoint for path, _ in fuse_mounts()):
                log.info("%s is no longer mounted; not restarting", self.mountpoint)
                return False
            self._spawn(["--lock-fd", str(lock.fileno())], (lock.fileno(),))
        return True

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    supervisor = Supervisor(args.mountpoint, args.worker, args.max_restarts, args.keeper)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: supervisor.stop(signum))
    # Locked for as long as this process lives (the kernel lets go when it has fully exited):
    # that is how ``datahoard umount`` knows we are gone, with no pid to trust.
    pidfile = runtime.supervisor_pidfile(supervisor.mountpoint)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    held = os.open(pidfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.ftruncate(held, 0)
    os.pwrite(held, f"{os.getpid()}\n".encode(), 0)
    try:
        return supervisor.run(args.ready_fd, args.lock_fd)
    finally:
        supervisor.close()


if __name__ == "__main__":
    sys.exit(main())
