"""The FUSE keeper (datahoard/fuse_keeper.py), its host in the CSI node plugin, and the standalone
supervisor (datahoard/supervisor.py), with real parts: real unix sockets, real processes, and a
real FUSE connection made with mount(2) (/dev/fuse opened, ``mount -t fuse.test fd=N``). No
daemon ever answers that connection, and none is needed: the tests prove the descriptor handed
out is the deposited one (kcmp(2), the connection id in fdinfo, and the mount's own FUSE_INIT read
from it in another process), and ``umount -l`` ends it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datahoard.fuse_fds import fuse_mounts
from datahoard.fuse_keeper import FuseKeeper
from datahoard.keeper_client import KeeperClient
from datahoard.keeper_protocol import KeeperError, KeeperUnavailable
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("keeper_peer.py")
_libc = ctypes.CDLL(None, use_errno=True)

if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
    pytest.skip("needs root and /dev/fuse (mount(2) of a FUSE connection)", allow_module_level=True)


@dataclass
class Conn:
    mountpoint: str
    fd: int  # our descriptor of the connection (the "worker's")
    minor: int


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: unix socket paths are at most 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="dhk-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for line in sorted((p for p, _ in fuse_mounts() if p.startswith(str(path))), reverse=True):
            subprocess.run(["umount", "-l", line], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def mount_fuse(mountpoint: Path, fstype: bytes = b"fuse.test") -> Conn:
    mountpoint.mkdir(parents=True, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if _libc.mount(b"test", str(mountpoint).encode(), fstype, 0, opts) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err), str(mountpoint))
    minor = next(m for p, m in fuse_mounts() if p == str(mountpoint))
    return Conn(str(mountpoint), fd, minor)


@pytest.fixture
def keeper(short_dir: Path) -> Iterator[FuseKeeper]:
    with FuseKeeper(short_dir / "run" / "keeper" / "keeper.sock", check_interval=0.1) as k:
        yield k


@pytest.fixture
def conn(short_dir: Path) -> Iterator[Conn]:
    c = mount_fuse(short_dir / "mnt")
    try:
        yield c
    finally:
        subprocess.run(["umount", "-l", c.mountpoint], capture_output=True)
        os.close(c.fd)


class Peers:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, pass_fds: tuple[int, ...] = (), user: int | None = None) -> subprocess.Popen:
        as_uid = ("--as-uid", str(user)) if user is not None else ()
        proc = subprocess.Popen([sys.executable, str(PEER), *args, *as_uid], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, pass_fds=pass_fds)
        self.procs.append(proc)
        return proc

    def answer(self, proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline()
        assert line, f"peer exited ({proc.wait(10)}) without answering"
        return json.loads(line)

    def run(self, *args: str, user: int | None = None) -> dict:
        proc = self.start(*args, user=user)
        proc.stdin.close()
        out = self.answer(proc)
        proc.wait(10)
        return out


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers()
    yield p
    for proc in p.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def claim_args(path: Path, conn: Conn) -> tuple[str, ...]:
    return ("claim", str(path), conn.mountpoint, str(os.getpid()), str(conn.fd))


def test_deposit_then_claim_in_another_process_hands_over_the_same_connection(keeper, conn, peers):
    depositor = peers.start("deposit", str(keeper.path), conn.mountpoint, str(conn.fd), pass_fds=(conn.fd,))
    assert peers.answer(depositor) == {"result": "ok", "pid": depositor.pid}

    # While the depositor lives, it serves the connection: nobody else may claim it.
    refused = peers.run(*claim_args(keeper.path, conn))
    assert refused["result"] == "refused"
    assert refused["pid"] == depositor.pid
    assert f"served by pid {depositor.pid}" in refused["message"]

    # The worker dies without a word: the keeper still holds the connection, claimable.
    depositor.kill()
    depositor.wait(10)
    eventually(lambda: keeper.entries()[0].served_by is None, 10, "the lease to end")
    claimed = peers.run(*claim_args(keeper.path, conn))
    assert claimed["result"] == "ok", claimed
    assert claimed["state"] == {"major": 7, "minor": 40, "max_write": 131072}
    assert claimed["kcmp"] == 0, "kcmp: the claimed descriptor is not the file we mounted with"
    assert claimed["connection"] == conn.minor
    assert claimed["opcode"] == 26, "the first request on the claimed descriptor should be this mount's FUSE_INIT"


def test_a_live_claimant_holds_the_lease_until_it_exits(keeper, conn, peers):
    with KeeperClient(keeper.path) as worker:
        worker.deposit(conn.mountpoint, {"v": 1}, conn.fd)
    # The depositor closed its connection (a clean exit would release; this one did not).
    first = peers.start(*claim_args(keeper.path, conn), "--hold")
    assert peers.answer(first)["result"] == "ok"
    second = peers.run(*claim_args(keeper.path, conn))
    assert (second["result"], second["pid"]) == ("refused", first.pid)
    # A depositor cannot take it over either: one worker serves a connection, never two.
    with KeeperClient(keeper.path) as other, pytest.raises(KeeperError, match=f"served by pid {first.pid}"):
        other.deposit(conn.mountpoint, {}, conn.fd)
    first.stdin.close()
    first.wait(10)
    eventually(lambda: keeper.entries()[0].served_by is None, 10, "the lease to end")
    assert peers.run(*claim_args(keeper.path, conn))["result"] == "ok"


def test_a_lease_ends_when_its_connection_closes_not_when_the_keeper_notices(keeper, conn):
    """A worker restarted at once (or a keeper under load) must not be refused by the lease of
    the process it replaces: a closed lease socket is an ended lease, even before the keeper's
    thread has read its EOF. Each round closes and claims again straight away."""
    with KeeperClient(keeper.path) as worker:
        worker.deposit(conn.mountpoint, {}, conn.fd)
    for _ in range(50):
        with KeeperClient(keeper.path) as worker:
            claimed = worker.claim(conn.mountpoint)
            assert claimed is not None
            os.close(claimed.fd)


def test_unmount_drops_the_entry(keeper, conn):
    with KeeperClient(keeper.path) as worker:
        worker.deposit(conn.mountpoint, {}, conn.fd)
    assert [e.connection for e in keeper.entries()] == [conn.minor]
    subprocess.run(["umount", "-l", conn.mountpoint], check=True)
    eventually(lambda: not keeper.entries(), 10, "the keeper to drop the ended connection")
    with KeeperClient(keeper.path) as worker:
        assert worker.claim(conn.mountpoint) is None


def test_release_lets_go_and_the_connection_ends_with_the_last_descriptor(keeper, short_dir):
    conn = mount_fuse(short_dir / "rel")
    with KeeperClient(keeper.path) as worker:
        worker.deposit(conn.mountpoint, {}, conn.fd)
        os.close(conn.fd)  # the worker's own copy gone: only the keeper keeps the mount alive
        assert (conn.mountpoint, conn.minor) in fuse_mounts()
        assert worker.release(conn.mountpoint) is True
        assert worker.release(conn.mountpoint) is False
    # The last descriptor closed: the connection is aborted (readers get ENOTCONN, as today).
    with pytest.raises(OSError) as err:
        os.stat(conn.mountpoint)
    assert err.value.errno == 107  # ENOTCONN
    subprocess.run(["umount", "-l", conn.mountpoint], check=True)


def test_an_unclaimed_connection_is_let_go_after_the_orphan_timeout(short_dir, conn):
    with FuseKeeper(short_dir / "k2" / "keeper.sock", orphan_timeout=0.2, check_interval=0.05) as keeper:
        with KeeperClient(keeper.path) as worker:
            worker.deposit(conn.mountpoint, {}, conn.fd)
            assert keeper.entries()  # held while the worker's lease lasts, however long
        eventually(lambda: not keeper.entries(), 10, "the orphaned entry to be dropped")


def test_a_view_detached_while_its_connection_lives_on_is_dropped(keeper, conn, short_dir):
    """Lazily unmounted while a bind still pins the superblock: the connection has not ended
    (no POLLERR), but the mountpoint no longer carries it, so no worker may resume it there."""
    pin = short_dir / "pin"
    pin.mkdir()
    assert _libc.mount(conn.mountpoint.encode(), str(pin).encode(), None, 0x1000, None) == 0  # MS_BIND
    with KeeperClient(keeper.path) as worker:
        worker.deposit(conn.mountpoint, {}, conn.fd)
    subprocess.run(["umount", "-l", conn.mountpoint], check=True)
    assert (str(pin), conn.minor) in fuse_mounts()  # the connection is alive, elsewhere
    eventually(lambda: not keeper.entries(), 10, "the keeper to drop the detached view")
    subprocess.run(["umount", "-l", str(pin)], check=True)


def test_entries_are_capped(short_dir, conn):
    other = mount_fuse(short_dir / "other")
    try:
        with FuseKeeper(short_dir / "k3" / "keeper.sock", max_entries=1) as keeper, KeeperClient(keeper.path) as w:
            w.deposit(conn.mountpoint, {}, conn.fd)
            with pytest.raises(KeeperError, match="holds 1 connections already"):
                w.deposit(other.mountpoint, {}, other.fd)
            w.deposit(conn.mountpoint, {"again": True}, conn.fd)  # replacing its own entry is fine
    finally:
        subprocess.run(["umount", "-l", other.mountpoint], capture_output=True)
        os.close(other.fd)


def test_naming_a_held_view_never_waits_for_its_server(conn):
    """A held connection whose worker is down answers no request: anything that stats the
    mountpoint waits for the next worker. The mount's lock and record key (what the supervisor
    and a restarting worker take first) must not. This mount never answers at all (no INIT), so a
    stat would hang; the child would then be killed at the timeout and the test fail."""
    code = ("import sys; from datahoard import runtime; m = sys.argv[1]; "
            "assert runtime.canonical_mountpoint(m) == m; runtime.MountLock(m).release(); "
            "assert runtime.lookup(m) is None; print('ok')")
    result = subprocess.run([sys.executable, "-c", code, conn.mountpoint], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_deposit_refuses_what_is_not_a_mounted_fuse_connection(keeper, conn, short_dir):
    with KeeperClient(keeper.path) as worker:
        with open(short_dir / "file", "w") as f, pytest.raises(KeeperError, match="not /dev/fuse"):
            worker.deposit(conn.mountpoint, {}, f.fileno())
        with pytest.raises(KeeperError, match="carries no FUSE mount of this connection"):
            worker.deposit(short_dir, {}, conn.fd)
        with pytest.raises(KeeperError, match="absolute path"):
            worker._exchange(__import__("datahoard.keeper_protocol", fromlist=["Request"]).Request(
                op="claim", mountpoint="relative/path"))
    assert keeper.entries() == []


def test_clients_are_capped_and_the_refused_one_is_told_why(short_dir):
    with FuseKeeper(short_dir / "k4" / "keeper.sock", max_clients=1) as keeper, KeeperClient(keeper.path) as first:
        assert first.entries() == []
        with pytest.raises(KeeperError, match="serves 1 clients already"), KeeperClient(keeper.path) as second:
            second.entries()
        first.close()
        eventually(lambda: _entries_or_none(keeper.path) is not None, 10, "the slot to free")


def _entries_or_none(path: Path):
    try:
        with KeeperClient(path) as client:
            return client.entries()
    except KeeperError:
        return None


def test_no_keeper_is_a_clear_error(short_dir):
    with pytest.raises(KeeperUnavailable, match=f"no FUSE keeper runs at {short_dir}/none.sock"):
        KeeperClient(short_dir / "none.sock")


def test_a_second_keeper_does_not_take_over_a_live_socket(keeper):
    with pytest.raises(KeeperError, match="another FUSE keeper already serves"):
        FuseKeeper(keeper.path).start()


def test_other_users_are_refused(keeper, peers):
    nobody = 65534
    # The socket's directory is 0700: another uid cannot even connect.
    assert oct(os.stat(keeper.path.parent).st_mode & 0o777) == "0o700"
    out = peers.run("claim", str(keeper.path), "/x", "1", "1", user=nobody)
    assert out["kind"] == "KeeperUnavailable" and "permission denied" in out["message"], out
    # Opened up by mistake, the keeper still checks the peer's uid (SO_PEERCRED).
    os.chmod(keeper.path.parent, 0o755)
    os.chmod(keeper.path, 0o777)
    out = peers.run("claim", str(keeper.path), "/x", "1", "1", user=nobody)
    assert out["result"] == "error" and f"uid {nobody} may not use the FUSE keeper" in out["message"], out


def test_the_csi_node_plugin_process_holds_connections(short_dir, conn, peers):
    root = short_dir / "host"
    env = os.environ | {"DATAHOARD_RUN_DIR": str(root / "run")}
    env.pop("DATAHOARD_KEEPER_SOCKET", None)
    plugin = subprocess.Popen([sys.executable, "-m", "datahoard.cli", "csi-node", f"--endpoint=unix://{short_dir}/csi.sock",
                               "--node-id=n1", f"--host-root={root}"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        path = root / "run" / "keeper" / "keeper.sock"  # where workers look: runtime.keeper_socket()
        eventually(path.exists, 30, "the plugin's keeper socket")
        depositor = peers.start("deposit", str(path), conn.mountpoint, str(conn.fd), pass_fds=(conn.fd,))
        assert peers.answer(depositor)["result"] == "ok"
        depositor.kill()
        depositor.wait(10)
        os.close(conn.fd)  # no worker holds the connection now: only the plugin process does
        conn.fd = os.open("/dev/null", os.O_RDONLY)  # (for the fixture's close)
        assert (conn.mountpoint, conn.minor) in fuse_mounts()
        claimed = peers.run("claim", str(path), conn.mountpoint, "1", "-1")
        assert (claimed["result"], claimed["connection"], claimed["opcode"]) == ("ok", conn.minor, 26), claimed
    finally:
        plugin.send_signal(signal.SIGTERM)
        assert plugin.wait(30) == 0, plugin.stderr.read()


def test_the_plugin_probe_fails_when_workers_cannot_reach_its_keeper(short_dir):
    """A socket removed under the keeper (a cleanup of the run dir) leaves workers with no keeper:
    the plugin's health says so, and its liveness probe restarts it, which serves a new one."""
    from datahoard.csi_node.node import NodeConfig
    from datahoard.csi_node.server import NodePlugin

    root = short_dir / "host"
    root.mkdir()
    config = NodeConfig(node_id="n1", host_root=root, state_file=root / "state.json")
    keeper = FuseKeeper(root / "run" / "keeper" / "keeper.sock")
    plugin = NodePlugin(config, keeper=keeper)
    plugin.start(f"unix://{short_dir}/csi.sock")
    try:
        assert plugin.health() == []
        keeper.path.unlink()
        assert plugin.health() == [f"the FUSE keeper's socket {keeper.path} was removed"]
    finally:
        plugin.stop(grace=1)


def test_the_csi_node_plugin_can_run_without_a_keeper(short_dir):
    root = short_dir / "host"
    env = os.environ | {"DATAHOARD_RUN_DIR": str(root / "run"), "DATAHOARD_FUSE_KEEPER": "0"}
    plugin = subprocess.Popen([sys.executable, "-m", "datahoard.cli", "csi-node", f"--endpoint=unix://{short_dir}/csi.sock",
                               "--node-id=n1", f"--host-root={root}"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        eventually((short_dir / "csi.sock").exists, 30, "the plugin's CSI socket")
        assert not (root / "run" / "keeper" / "keeper.sock").exists()
    finally:
        plugin.send_signal(signal.SIGTERM)
        assert plugin.wait(30) == 0


# -- the standalone supervisor --------------------------------------------------------------
#: A stand-in worker (today's worker cannot resume a held connection yet, so the supervisor's
#: own behaviour is tested with this): it records each start, reports ready on --ready-fd if
#: given, then crashes while a file "crash" exists, else serves until SIGTERM.
FAKE_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    state = sys.argv[1]
    args = sys.argv[2:]
    with open(os.path.join(state, "starts"), "a") as f:
        f.write(f"{os.getpid()} {os.environ.get('DATAHOARD_KEEPER_SOCKET', '')} {' '.join(args)}\\n")
    if "--ready-fd" in args:
        os.write(int(args[args.index("--ready-fd") + 1]), b"ready http://x\\n")
    if os.path.exists(os.path.join(state, "claim")):  # what the real worker will do on start
        from datahoard.fuse_fds import fuse_connection
        from datahoard.keeper_client import KeeperClient
        client = KeeperClient()  # $DATAHOARD_KEEPER_SOCKET, set by the supervisor
        claimed = client.claim(open(os.path.join(state, "claim")).read())
        with open(os.path.join(state, "claims"), "a") as f:
            f.write(f"{fuse_connection(claimed.fd) if claimed else None}\\n")
    if os.path.exists(os.path.join(state, "crash")):
        sys.exit(3)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        time.sleep(1)
""")


def _starts(state: Path) -> list[list[str]]:
    try:
        return [line.split() for line in (state / "starts").read_text().splitlines()]
    except FileNotFoundError:
        return []


def _supervise(short_dir: Path, mountpoint: str, max_restarts: int) -> tuple[subprocess.Popen, int]:
    script = short_dir / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    ready_r, ready_w = os.pipe()
    env = os.environ | {"DATAHOARD_RUN_DIR": str(short_dir / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "datahoard.supervisor", "--mountpoint", mountpoint,
                             "--ready-fd", str(ready_w), "--max-restarts", str(max_restarts), "--",
                             sys.executable, str(script), str(short_dir)],
                            pass_fds=(ready_w,), env=env, stderr=subprocess.PIPE, text=True)
    os.close(ready_w)
    return proc, ready_r


def test_the_supervisor_restarts_a_worker_that_dies_and_holds_the_keeper(short_dir, conn):
    (short_dir / "crash").touch()
    proc, ready_r = _supervise(short_dir, conn.mountpoint, max_restarts=3)
    try:
        with os.fdopen(ready_r) as ready:
            assert ready.readline().startswith("ready")  # forwarded from the first worker
        eventually(lambda: len(_starts(short_dir)) >= 2, 30, "a restart")
        (short_dir / "crash").unlink()
        eventually(lambda: len(_starts(short_dir)) >= 3 or proc.poll() is not None, 30, "a worker that stays up")
        starts = _starts(short_dir)
        assert proc.poll() is None, proc.stderr.read()
        # The first start carried the readiness pipe; restarts take the mount lock themselves.
        assert "--ready-fd" in starts[0] and "--ready-fd" not in starts[1]
        assert "--lock-fd" in starts[1]
        # Every worker is told where the supervisor's keeper is, and it answers there.
        socket_path = starts[0][1]
        assert all(s[1] == socket_path for s in starts)
        with KeeperClient(socket_path) as client:
            assert client.entries() == []
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, proc.stderr.read()
    assert not Path(socket_path).exists()
    for pid in (int(s[0]) for s in _starts(short_dir)):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_worker_restarted_by_the_supervisor_claims_the_held_connection(short_dir, conn):
    proc, ready_r = _supervise(short_dir, conn.mountpoint, max_restarts=3)
    try:
        with os.fdopen(ready_r) as ready:
            assert ready.readline().startswith("ready")
        [[first_pid, socket_path, *_]] = _starts(short_dir)
        # As the worker will once it serves the connection itself: deposit it after mounting.
        with KeeperClient(socket_path) as worker:
            worker.deposit(conn.mountpoint, {"major": 7}, conn.fd)
        (short_dir / "claim").write_text(conn.mountpoint)
        os.kill(int(first_pid), signal.SIGKILL)
        eventually(lambda: (short_dir / "claims").exists(), 30, "the restarted worker to claim")
        assert (short_dir / "claims").read_text().split() == [str(conn.minor)]
        with KeeperClient(socket_path) as status:
            [entry] = status.entries()
        assert entry.served_by == int(_starts(short_dir)[1][0])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()


def test_a_holder_that_dies_leaves_the_mount_failing_cleanly(short_dir, peers):
    """The keeper's process killed while it holds the only descriptor: the connection ends and
    reads fail with ENOTCONN, as with no keeper; nothing hangs."""
    conn = mount_fuse(short_dir / "lone")
    root = short_dir / "host"
    env = os.environ | {"DATAHOARD_RUN_DIR": str(root / "run")}
    plugin = subprocess.Popen([sys.executable, "-m", "datahoard.cli", "csi-node", f"--endpoint=unix://{short_dir}/csi.sock",
                               "--node-id=n1", f"--host-root={root}"], env=env, stderr=subprocess.DEVNULL)
    try:
        path = root / "run" / "keeper" / "keeper.sock"
        eventually(path.exists, 30, "the plugin's keeper socket")
        with KeeperClient(path) as worker:
            worker.deposit(conn.mountpoint, {}, conn.fd)
        os.close(conn.fd)
    finally:
        plugin.kill()
        plugin.wait(10)
    with pytest.raises(OSError) as err:
        os.stat(conn.mountpoint)
    assert err.value.errno == 107  # ENOTCONN
    subprocess.run(["umount", "-l", conn.mountpoint], check=True)


def test_the_supervisor_gives_up_after_max_restarts(short_dir, conn):
    (short_dir / "crash").touch()
    proc, ready_r = _supervise(short_dir, conn.mountpoint, max_restarts=2)
    os.close(ready_r)
    assert proc.wait(60) == 1
    assert len(_starts(short_dir)) == 3  # the first start and 2 restarts
    assert "giving up" in proc.stderr.read()


def test_the_supervisor_does_not_restart_once_the_view_is_unmounted(short_dir, conn):
    (short_dir / "crash").touch()
    subprocess.run(["umount", "-l", conn.mountpoint], check=True)  # as datahoard umount would
    proc, ready_r = _supervise(short_dir, conn.mountpoint, max_restarts=3)
    os.close(ready_r)
    assert proc.wait(60) == 0
    assert len(_starts(short_dir)) == 1
    assert "no longer mounted" in proc.stderr.read()


def test_datahoard_mount_restarts_a_killed_worker_and_umount_ends_everything(s3, bucket, mount_dataset):
    """The real worker under the real CLI: a SIGKILLed worker comes back serving the same
    connection (resumed from the supervisor's keeper), status says restarts are hidden, and
    umount leaves no process, no mount and no keeper socket behind."""
    from datahoard import runtime

    s3.put_object(Bucket=bucket, Key="ds/f", Body=b"hello")
    m = mount_dataset(bucket, "ds")
    first = runtime.lookup(m.mountpoint)
    supervisor = int(runtime.supervisor_pidfile(m.mountpoint).read_text())
    assert runtime.alive(supervisor) and first.pid != supervisor
    status = subprocess.run([sys.executable, "-m", "datahoard.cli", "status", str(m.mountpoint)],
                            capture_output=True, text=True, timeout=60)
    assert "hidden: a keeper holds the FUSE connection" in status.stdout, status.stdout

    os.kill(first.pid, signal.SIGKILL)
    second = eventually(lambda: (r := runtime.lookup(m.mountpoint)) and r.pid != first.pid and r, 60,
                      "the supervisor to start a new worker")
    assert (m.mountpoint / "f").read_bytes() == b"hello"
    assert runtime.alive(supervisor)
    assert m.stats().fuse.resumed  # the same connection, not a remount

    result = subprocess.run([sys.executable, "-m", "datahoard.cli", "umount", str(m.mountpoint)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [t for t, _ in _mounts(m.mountpoint)] == []
    assert not runtime.alive(second.pid) and not runtime.alive(supervisor)
    assert not runtime.mount_keeper_socket(m.mountpoint).exists()


def _mounts(path: Path) -> list[tuple[str, str]]:
    from tests.support.mounts import mounts_at

    return mounts_at(path)
