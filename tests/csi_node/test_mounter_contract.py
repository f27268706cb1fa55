"""The Mounter contract, run against the in-memory FakeMounter and against LinuxMounter's real
mount(2)/umount2(2) (as root, marked integration): what the node service's unit tests rely on
from the fake, the kernel does too.

A "filesystem" here is what a cache worker mounts at its view: a tmpfs for the real mounter
(a FUSE view behaves the same for binds, mountinfo and statvfs), a FakeFilesystem for the fake.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from datahoard.csi_node.mounter import Health, LinuxMounter, Mounter

from datahoard.mounts import top_mounts
from tests.support.fakes.mounter import FakeFilesystem, FakeMounter

TINYFUSE = Path(__file__).resolve().parent / "tinyfuse.py"

_libc = ctypes.CDLL(None, use_errno=True)
FUSE_MISSING = None if os.path.exists("/dev/fuse") and os.geteuid() == 0 else "needs root and /dev/fuse"


class Daemon:
    """A FUSE daemon serving a view: it can crash (kill) or get stuck (pause)."""

    def kill(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class FakeDaemon(Daemon):
    def __init__(self, fs: FakeFilesystem) -> None:
        self.fs = fs

    def kill(self) -> None:
        self.fs.die()

    def pause(self) -> None:
        self.fs.hang()

    def resume(self) -> None:
        self.fs.revive()


class TinyFuse(Daemon):
    """tests/csi_node/tinyfuse.py, a FUSE filesystem of another make than the worker's."""

    def __init__(self, source: Path, path: str, mounter: LinuxMounter) -> None:
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", str(TINYFUSE), str(source), path],
                                     env=dict(os.environ, FUSE_LIBRARY_NAME="fuse3"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not any(m.fstype.startswith("fuse") for m in mounter.mounts_at(path)):
            assert self.proc.poll() is None and time.monotonic() < deadline, "tinyfuse did not mount"
            time.sleep(0.05)

    def kill(self) -> None:  # SIGKILL: the kernel aborts the connection
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:  # SIGSTOP: requests wait in the kernel without an answer
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@dataclass
class Machine:
    mounter: Mounter
    #: mount_filesystem(path) -> None: a new filesystem at ``path``, as a worker mounts its view.
    mount_filesystem: Callable[[str], None]
    #: start_fuse(path) -> Daemon: a FUSE filesystem at ``path`` whose daemon a test controls.
    start_fuse: Callable[[str], Daemon]
    daemons: list[Daemon] = field(default_factory=list)


def _real_tmpfs(path: str) -> None:
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"size=1m") != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@pytest.fixture(params=["fake", pytest.param("linux", marks=pytest.mark.integration)])
def machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Machine]:
    if request.param == "fake":
        fake = FakeMounter()
        m = Machine(fake, lambda path: fake.mount_filesystem(path, fstype="tmpfs", source="tmpfs"),
                    lambda path: FakeDaemon(fake.mount_filesystem(path)))
    else:
        if FUSE_MISSING:
            pytest.skip(FUSE_MISSING)
        files = tmp_path / "files"
        files.mkdir()
        (files / "hello").write_text("hello")
        linux = LinuxMounter()
        m = Machine(linux, _real_tmpfs, lambda path: TinyFuse(files, path, linux))
    start = m.start_fuse
    m.start_fuse = lambda path: m.daemons.append(start(path)) or m.daemons[-1]
    yield m
    for daemon in m.daemons:
        daemon.resume()
        daemon.kill()
    if isinstance(m.mounter, LinuxMounter):  # from mountinfo: a stat of a dead mount fails
        left = {e.mountpoint for e in m.mounter.mounts() if e.mountpoint.startswith(f"{tmp_path}/")}
        for path in sorted(left, key=len, reverse=True):
            m.mounter.unmount_all(path)


@pytest.fixture
def view(machine: Machine, tmp_path: Path) -> str:
    path = tmp_path / "view"
    path.mkdir()
    machine.mount_filesystem(str(path))
    return str(path)


def _dev(entry) -> int:
    major, minor = entry.device.split(":")
    return os.makedev(int(major), int(minor))


def test_nothing_mounted_is_empty_and_unmounting_it_is_zero_not_an_error(machine, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert machine.mounter.mounts_at(str(plain)) == []
    assert machine.mounter.unmount_all(str(plain)) == 0
    assert machine.mounter.unmount_all(str(tmp_path / "missing")) == 0


def test_a_bind_is_read_only_and_shows_the_source_filesystem(machine, tmp_path, view):
    target = tmp_path / "target"
    target.mkdir()
    machine.mounter.bind_readonly(view, str(target), [])
    [entry] = machine.mounter.mounts_at(str(target))
    [source] = machine.mounter.mounts_at(view)
    assert entry.readonly and {"nosuid", "nodev"} <= set(entry.options.split(","))
    assert (entry.fstype, entry.device, entry.root) == (source.fstype, source.device, source.root)
    probe = machine.mounter.probe(str(target), 5)
    assert probe.health is Health.OK and probe.device == _dev(entry)
    assert probe.device == machine.mounter.probe(view, 5).device
    assert probe.statvfs is not None


def test_binds_stack_and_unmount_all_removes_every_layer(machine, tmp_path, view):
    target = str(tmp_path / "target")
    os.mkdir(target)
    machine.mounter.bind_readonly(view, target, [])
    machine.mounter.bind_readonly(view, target, ["noexec"])
    layers = machine.mounter.mounts_at(target)
    assert len(layers) == 2
    assert layers[1].parent_id == layers[0].mount_id  # stacked on the first, not beside it
    assert top_mounts(layers) == [layers[1]]
    assert "noexec" in layers[1].options.split(",") and "noexec" not in layers[0].options.split(",")
    assert machine.mounter.unmount_all(target) == 2
    assert machine.mounter.mounts_at(target) == []
    assert machine.mounter.unmount_all(target) == 0
    assert machine.mounter.probe(view, 5).health is Health.OK  # the source is untouched


def test_paths_are_canonical(machine, tmp_path, view):
    real = tmp_path / "real"
    (real / "target").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    machine.mounter.bind_readonly(view, str(tmp_path / "link" / "target") + "/", [])
    assert len(machine.mounter.mounts_at(str(real / "target"))) == 1
    assert machine.mounter.mounts_at(str(real / "target"))[0].mountpoint == str(real / "target")
    assert machine.mounter.unmount_all(str(tmp_path / "link" / "target")) == 1


def test_a_bind_of_a_plain_directory_shows_that_directory(machine, tmp_path):
    tree = tmp_path / "cache" / "direct" / "0123456789abcdef"
    tree.mkdir(parents=True)
    (tree / "file").write_text("x")
    target = tmp_path / "target"
    target.mkdir()
    machine.mounter.bind_readonly(str(tree), str(target), [])
    [entry] = machine.mounter.mounts_at(str(target))
    assert entry.root.endswith("/cache/direct/0123456789abcdef")
    probe = machine.mounter.probe(str(target), 5)
    assert probe.health is Health.OK and probe.device == os.stat(tree).st_dev == _dev(entry)


@pytest.mark.parametrize("missing", ["source", "target"])
def test_a_bind_needs_both_paths(machine, tmp_path, view, missing):
    target = tmp_path / "target"
    if missing == "source":
        target.mkdir()
    source = str(tmp_path / "gone") if missing == "source" else view
    with pytest.raises(OSError) as info:
        machine.mounter.bind_readonly(source, str(target), [])
    assert info.value.errno == errno.ENOENT
    assert machine.mounter.mounts_at(str(target)) == []


def test_a_directory_binds_only_onto_a_directory(machine, tmp_path, view):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(OSError) as info:
        machine.mounter.bind_readonly(view, str(target), [])
    assert info.value.errno == errno.ENOTDIR
    assert machine.mounter.mounts_at(str(target)) == []


def test_an_unknown_flag_mounts_nothing(machine, tmp_path, view):
    # Found by this suite: the real bind_readonly used to bind before it looked the flags up,
    # so an unknown flag left a *writable* bind behind.
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(KeyError):
        machine.mounter.bind_readonly(view, str(target), ["rw"])
    assert machine.mounter.mounts_at(str(target)) == []


def test_probes_of_plain_and_missing_paths(machine, tmp_path):
    assert machine.mounter.probe(str(tmp_path / "missing"), 5).health is Health.MISSING
    probe = machine.mounter.probe(str(tmp_path), 5)
    assert probe.health is Health.OK and probe.device == os.stat(tmp_path).st_dev


def test_a_dead_fuse_daemon_disconnects_the_view_and_every_bind_of_it(machine, tmp_path):
    view, target = tmp_path / "fuse", tmp_path / "target"
    view.mkdir()
    target.mkdir()
    daemon = machine.start_fuse(str(view))
    machine.mounter.bind_readonly(str(view), str(target), [])
    alive = machine.mounter.probe(str(target), 5)
    assert alive.health is Health.OK
    daemon.kill()
    for path in (view, target):
        probe = machine.mounter.probe(str(path), 5)
        assert probe.health is Health.DISCONNECTED and probe.device is None
    assert len(machine.mounter.mounts_at(str(target))) == 1  # still listed: mountinfo, not stat
    # What a restarted worker and the repair do: a fresh view, a bind stacked over the dead one.
    machine.mounter.unmount_all(str(view))
    machine.start_fuse(str(view))
    machine.mounter.bind_readonly(str(view), str(target), [])
    fresh = machine.mounter.probe(str(target), 5)
    assert fresh.health is Health.OK and fresh.device != alive.device
    assert len(machine.mounter.mounts_at(str(target))) == 2


def test_a_stuck_fuse_daemon_makes_the_probe_hung_not_the_caller(machine, tmp_path):
    view = tmp_path / "fuse"
    view.mkdir()
    daemon = machine.start_fuse(str(view))
    daemon.pause()
    probe = machine.mounter.probe(str(view), 0.5)
    assert probe.health is Health.HUNG
    assert machine.mounter.mounts_at(str(view))  # mountinfo still answers
    daemon.resume()
