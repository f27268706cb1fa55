"""fusell, the FUSE protocol layer, against the real kernel: a mirror filesystem
(tests/cache_worker/fusell_mirror.py) served in a child process over a real /dev/fuse mount.

Reads are done with os.open/os.pread (no buffered open(): it asks isatty, an ioctl the kernel
forwards to the daemon), in threads joined with a timeout, so a hung read fails the test.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from datahoard.cache_worker.fusell.passthrough_log import read_log
from tests.support.mounts import mounts_at
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

MIRROR = Path(__file__).with_name("fusell_mirror.py")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Tree:
    src: Path
    files: dict[str, bytes]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    src = tmp_path / "src"
    files = {
        "a.txt": b"hello fusell\n",
        "empty": b"",
        "sub/b.bin": os.urandom(300_000),
        "sub/deeper/c.bin": os.urandom(5000),
        "big": os.urandom(6 << 20),
        "boom": b"never served",
    }
    # enough long names that a listing takes several READDIRPLUS requests
    files.update({f"many/{i:04d}-{'x' * 60}": bytes([i % 256]) for i in range(300)})
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(body)
    return Tree(src, files)


@dataclass
class Servers:
    tmp: Path
    mnt: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    held: list[int] = field(default_factory=list)

    def start(self, *args: str, wait_ready: bool = True, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(MIRROR), *args], stdout=subprocess.PIPE,
                             text=True, cwd=REPO, **kw)
        self.procs.append(p)
        if wait_ready:
            line = _readline(p, 30)
            assert line.startswith("READY"), f"server did not come up: {line!r}"
        return p

    def mount(self, src: Path, *extra: str, send_fd: bool = False) -> subprocess.Popen:
        if not send_fd:
            return self.start(str(src), "--mount", str(self.mnt), *extra)
        sock_path = self.tmp / "fd.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
            lst.bind(str(sock_path))
            lst.listen(1)
            lst.settimeout(30)
            p = self.start(str(src), "--mount", str(self.mnt), "--send-fd", str(sock_path),
                           *extra, wait_ready=False)
            conn, _ = lst.accept()
            with conn:
                msg, fds, _, _ = socket.recv_fds(conn, 65536, 1)
        self.held.append(fds[0])
        self.state = msg.decode()
        assert _readline(p, 30).startswith("READY")
        return p

    def resume(self, src: Path, *extra: str) -> subprocess.Popen:
        fd = self.held[-1]
        return self.start(str(src), "--resume-fd", str(fd), "--state", self.state, *extra,
                          pass_fds=(fd,))


def _readline(p: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    s = Servers(tmp_path, mnt)
    yield s
    for p in s.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait(10)
    if mounts_at(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    for fd in s.held:
        os.close(fd)


def in_thread(fn, timeout: float = 20):
    """Run fn in a thread; its result, or AssertionError if it hangs past timeout."""
    box: dict = {}

    def run():
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{fn} still blocked after {timeout}s")
    if "e" in box:
        raise box["e"]
    return box["v"]


def read_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def test_stat_readdir_and_read_bytes(tree: Tree, servers: Servers):
    servers.mount(tree.src)
    m = servers.mnt
    assert mounts_at(m)[-1][0] == "fuse.fusell-test"
    assert sorted(os.listdir(m)) == ["a.txt", "big", "boom", "empty", "many", "sub"]
    assert sorted(os.listdir(m / "many")) == sorted(os.listdir(tree.src / "many"))
    assert sorted(os.listdir(m / "sub")) == ["b.bin", "deeper"]
    for rel, body in tree.files.items():
        if rel == "boom":
            continue
        st = os.stat(m / rel)
        assert st.st_size == len(body)
        assert st.st_mtime_ns == os.stat(tree.src / rel).st_mtime_ns
        assert in_thread(lambda rel=rel: read_all(m / rel)) == body
    assert os.path.isdir(m / "sub/deeper")
    # ids are the mirror's table rows, stable: root 1, then the sorted walk
    assert os.stat(m / "a.txt").st_ino == 2
    with pytest.raises(FileNotFoundError):
        os.stat(m / "nope")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "sub/nope")
    assert os.statvfs(m).f_namemax == 255


def test_a_handler_exception_is_eio_and_the_loop_keeps_serving(tree: Tree, servers: Servers):
    servers.mount(tree.src, "--threads", "1")
    for _ in range(3):
        with pytest.raises(OSError) as exc:
            in_thread(lambda: read_all(servers.mnt / "boom"))
        assert exc.value.errno == errno.EIO
        assert in_thread(lambda: read_all(servers.mnt / "a.txt")) == tree.files["a.txt"]


def test_every_write_is_answered_erofs_by_the_session(tree: Tree, servers: Servers):
    """Mounted read-write so the VFS passes the writes down: the EROFS comes from the session."""
    servers.mount(tree.src, "--rw")
    m = servers.mnt
    attempts = {
        "open for write": lambda: os.open(m / "a.txt", os.O_WRONLY),
        "create": lambda: os.open(m / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        "truncate": lambda: os.truncate(m / "a.txt", 0),
        "chmod": lambda: os.chmod(m / "a.txt", 0o600),
        "mkdir": lambda: os.mkdir(m / "d"),
        "unlink": lambda: os.unlink(m / "a.txt"),
        "rmdir": lambda: os.rmdir(m / "sub/deeper"),
        "rename": lambda: os.rename(m / "a.txt", m / "b.txt"),
        "symlink": lambda: os.symlink("a.txt", m / "ln"),
        "link": lambda: os.link(m / "a.txt", m / "hard"),
        "setxattr": lambda: os.setxattr(m / "a.txt", "user.x", b"1"),
        "mknod": lambda: os.mknod(m / "fifo", 0o600 | 0o010000),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as exc:
            in_thread(attempt)
        assert exc.value.errno == errno.EROFS, f"{what}: {exc.value}"
    assert in_thread(lambda: read_all(m / "a.txt")) == tree.files["a.txt"]


def test_open_answered_enosys_lets_the_kernel_open_and_reads_still_work(tree, servers):
    servers.mount(tree.src, "--no-open")
    for rel in ("a.txt", "sub/b.bin", "big"):
        assert in_thread(lambda rel=rel: read_all(servers.mnt / rel)) == tree.files[rel]


def test_passthrough_reads_while_the_daemon_is_stopped(tree, servers):
    p = servers.mount(tree.src, "--table", str(servers.tmp / "backing.log"))
    fd = os.open(servers.mnt / "big", os.O_RDONLY)
    try:
        os.kill(p.pid, signal.SIGSTOP)
        try:
            got = in_thread(lambda: os.pread(fd, len(tree.files["big"]), 0), timeout=20)
        finally:
            os.kill(p.pid, signal.SIGCONT)
        assert got == tree.files["big"]
    finally:
        os.close(fd)


def test_without_passthrough_a_stopped_daemon_blocks_reads(tree, servers):
    """The control of the test above: it is passthrough, not the page cache, that reads."""
    p = servers.mount(tree.src, "--no-passthrough")
    fd = os.open(servers.mnt / "big", os.O_RDONLY)
    try:
        os.kill(p.pid, signal.SIGSTOP)
        try:
            with pytest.raises(AssertionError, match="still blocked"):
                in_thread(lambda: os.pread(fd, len(tree.files["big"]), 0), timeout=2)
        finally:
            os.kill(p.pid, signal.SIGCONT)
    finally:
        os.close(fd)


def test_a_new_backing_id_per_open_breaks_concurrent_opens(tree, servers):
    """The kernel rule BackingTable exists for: a second concurrent passthrough open of one
    inode must name the same backing id, else open(2) fails with EIO."""
    servers.mount(tree.src, "--naive-passthrough")
    fd = os.open(servers.mnt / "big", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.open(servers.mnt / "big", os.O_RDONLY)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)


def _table(path: Path) -> list[list[str]]:
    """The server's BackingTable log as [op, nodeid, fh, kind, backing id] string lists."""
    return [[op, str(node), str(fh), kind, str(bid)] for op, node, fh, bid, kind in read_log(path)]


@pytest.mark.parametrize("restart", ["sigkill", "graceful"])
def test_backing_table_shares_one_id_and_survives_a_restart(tree, servers, restart):
    log = servers.tmp / "backing.log"
    a = servers.mount(tree.src, "--table", str(log), send_fd=True)
    big = tree.files["big"]
    fd1 = os.open(servers.mnt / "big", os.O_RDONLY)
    fd2 = os.open(servers.mnt / "big", os.O_RDONLY)
    opens = [r for r in _table(log) if r[0] == "o"]
    assert [r[3] for r in opens] == ["P", "P"] and opens[0][4] == opens[1][4] != "0"
    bid, node = opens[0][4], opens[0][1]
    if restart == "sigkill":
        a.kill()
        a.wait(10)
        servers.resume(tree.src, "--table", str(log), "--resend")
    else:
        a.send_signal(signal.SIGTERM)
        assert a.wait(20) == 0
        servers.resume(tree.src, "--table", str(log))
    # a third open after the restart must reuse the id the kernel holds for the inode
    fd3 = os.open(servers.mnt / "big", os.O_RDONLY)
    assert [r for r in _table(log) if r[0] == "o"][-1][3:] == ["P", bid]
    for fd in (fd1, fd2, fd3):
        assert in_thread(lambda fd=fd: os.pread(fd, len(big), 0)) == big
    for fd in (fd1, fd2):
        os.close(fd)
    closed = ["c", node, "0", "", bid]
    assert closed not in _table(log)
    os.close(fd3)
    eventually(lambda: closed in _table(log), 10, "the backing id to be closed")
    # the inode is neutral again: a new open registers a fresh id and reads
    assert in_thread(lambda: read_all(servers.mnt / "big")) == big


def test_sigkill_mid_read_is_invisible_after_resume_and_resend(tree, servers):
    signal_file = servers.tmp / "held"
    a = servers.mount(tree.src, "--no-passthrough", "--hold", "big",
                      "--hold-signal", str(signal_file), send_fd=True)
    early = os.open(servers.mnt / "sub/b.bin", os.O_RDONLY)
    results: dict = {}

    def blocked_reader():
        try:
            results["big"] = read_all(servers.mnt / "big")
        except OSError as e:
            results["error"] = e

    t = threading.Thread(target=blocked_reader, daemon=True)
    t.start()
    eventually(signal_file.exists, 20, "the held read to reach the handler")
    assert t.is_alive()
    a.kill()
    a.wait(10)
    assert mounts_at(servers.mnt), "the mount went away with the daemon"
    b = servers.resume(tree.src, "--resend")
    t.join(30)
    assert not t.is_alive(), "the held read never came back"
    assert "error" not in results, results.get("error")
    assert results["big"] == tree.files["big"]
    assert in_thread(lambda: os.pread(early, 300_000, 0)) == tree.files["sub/b.bin"]
    os.close(early)
    assert in_thread(lambda: read_all(servers.mnt / "a.txt")) == tree.files["a.txt"]
    assert b.poll() is None


def test_graceful_handover_loses_no_read(tree, servers):
    a = servers.mount(tree.src, "--no-passthrough", "--timeout", "0", send_fd=True)
    early = os.open(servers.mnt / "big", os.O_RDONLY)
    stop = threading.Event()
    stats = {"reads": 0, "errors": []}
    names = ["a.txt", "sub/b.bin", "sub/deeper/c.bin"]

    def reader():
        i = 0
        while not stop.is_set():
            rel = names[i % len(names)]
            i += 1
            try:
                fd = os.open(servers.mnt / rel, os.O_RDONLY)
                try:
                    got = os.pread(fd, 1 << 20, 0)
                finally:
                    os.close(fd)
                if got != tree.files[rel]:
                    stats["errors"].append(f"wrong bytes in {rel}")
                stats["reads"] += 1
            except OSError as e:
                stats["errors"].append(repr(e))

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    eventually(lambda: stats["reads"] > 50, 20, "reads before the handover")
    a.send_signal(signal.SIGTERM)
    assert a.wait(20) == 0
    assert "SERVE-RETURNED stopped" in a.stdout.read()
    before = stats["reads"]
    servers.resume(tree.src)
    eventually(lambda: stats["reads"] > before + 50, 20, "reads after the handover")
    stop.set()
    for t in threads:
        t.join(20)
    assert stats["errors"] == []
    assert in_thread(lambda: os.pread(early, len(tree.files["big"]), 0)) == tree.files["big"]
    os.close(early)
