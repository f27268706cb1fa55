"""Fixtures for the CSI node plugin tests: a shared-propagation scratch root, FUSE views, the
plugin on a real unix socket, and a gRPC client for it.

Every mount a test makes lives under one tmpfs that the fixture made ``rshared`` (like ``/`` on
a systemd node), and teardown lazily detaches everything under it, deepest first, so a failed
test never leaves mounts behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2, csi_pb2_grpc
from datahoard.csi_node.mounter import MNT_DETACH, LinuxMounter, canonical
from datahoard.csi_node.node import NodeConfig
from datahoard.csi_node.server import NodePlugin

HERE = Path(__file__).resolve().parent
TINYFUSE = HERE / "tinyfuse.py"
Mode = csi_pb2.VolumeCapability.AccessMode

_libc = ctypes.CDLL(None, use_errno=True)


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount(2))"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "needs fuse3 (fusermount3)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _can_mount()
    if reason is None:
        return
    for item in items:
        if "integration" in item.keywords and str(HERE) in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


def mountpoints_under(root: str) -> list[str]:
    root = canonical(root)
    return [m.mountpoint for m in LinuxMounter().mounts() if m.mountpoint == root or m.mountpoint.startswith(root + "/")]


def detach_under(root: str, include_root: bool = False) -> None:
    """Lazy-unmount every mount below *root*, deepest (and most recent) first."""
    for _ in range(100):
        points = [p for p in mountpoints_under(root) if include_root or p != canonical(root)]
        if not points:
            return
        for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
            _libc.umount2(point.encode(), MNT_DETACH)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll for an *event* (a mount appearing, a process being ready); fails after *timeout*.

    Used only to wait for something to happen, never to assert how fast it happens.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Node:
    """A scratch 'node': host root for views, a kubelet pods dir, a socket dir, source data."""

    root: Path
    host_root: Path
    pods: Path
    csi_dir: Path
    data: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def view_path(self, ns: str = "ml", name: str = "imagenet") -> Path:
        return names.mount_dir(ns, name, self.host_root)

    def target(self, pod: str = "pod-a", pv: str = "datahoard-ml-imagenet") -> str:
        parent = self.pods / pod / "volumes" / "kubernetes.io~csi" / pv
        parent.mkdir(parents=True, exist_ok=True)  # kubelet creates the parent, the plugin the target
        return str(parent / "mount")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "node"
    root.mkdir()
    assert _libc.mount(b"tmpfs", str(root).encode(), b"tmpfs", 0, b"mode=0755") == 0, os.strerror(ctypes.get_errno())
    subprocess.run(["mount", "--make-rshared", str(root)], check=True)
    n = Node(root, root / "var-lib-datahoard", root / "var-lib-kubelet" / "pods", root / "csi", root / "data")
    for d in (n.host_root, n.pods, n.csi_dir, n.data):
        d.mkdir(parents=True)
    try:
        yield n
    finally:
        for proc in n.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        detach_under(str(root), include_root=True)


@dataclass
class TinyView:
    """A tiny FUSE view (tests/csi_node/tinyfuse.py) serving *source* at *path*."""

    node: Node
    source: Path
    path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> TinyView:
        self.path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3")
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", str(TINYFUSE), str(self.source), str(self.path)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.node.procs.append(self.proc)
        mounter = LinuxMounter()
        wait_until(lambda: any(m.fstype.startswith("fuse") for m in mounter.mounts_at(str(self.path)))
                   or self.proc.poll() is not None, what=f"FUSE view at {self.path}")
        assert self.proc.poll() is None, "tinyfuse exited"
        return self

    def kill(self) -> None:
        """Like a crashed worker: SIGKILL, the kernel aborts the FUSE connection (ENOTCONN)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        """What a restarted worker does: detach its dead mount, mount a fresh view."""
        _libc.umount2(str(self.path).encode(), MNT_DETACH)
        self.start()


@pytest.fixture
def tiny_view(node: Node) -> TinyView:
    src = node.data / "imagenet"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.jpg").write_bytes(b"A" * 1000)
    (src / "labels.txt").write_text("cat\ndog\n")
    return TinyView(node, src, node.view_path()).start()


class Client:
    """A CSI client over the plugin's unix socket, with request builders for the tests."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    @staticmethod
    def publish_request(volume_id="ml/imagenet", target_path="", mode=Mode.MULTI_NODE_READER_ONLY, readonly=False,
                        context=None, secrets=None, flags=(), block=False) -> csi_pb2.NodePublishVolumeRequest:
        cap = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.mount_flags.extend(flags)
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target_path, volume_capability=cap, readonly=readonly,
            volume_context=context or {}, secrets=secrets or {},
        )

    def publish(self, target_path: str, **kwargs) -> csi_pb2.NodePublishVolumeResponse:
        return self.node.NodePublishVolume(self.publish_request(target_path=target_path, **kwargs), timeout=60)

    def unpublish(self, target_path: str, volume_id: str = "ml/imagenet") -> csi_pb2.NodeUnpublishVolumeResponse:
        return self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path), timeout=60)

    def stats(self, volume_path: str, volume_id: str = "ml/imagenet") -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=volume_path), timeout=60)

    def close(self) -> None:
        self.channel.close()


class RunningPlugin:
    """The plugin in this process (so caplog sees its logs), restartable on the same state file."""

    def __init__(self, node: Node, **config) -> None:
        self.node = node
        self.config = NodeConfig(node_id="node-a", host_root=node.host_root,
                                 state_file=node.host_root / "csi-node" / "state.json", **config)
        self.socket = str(node.csi_dir / "csi.sock")
        self.plugin: NodePlugin | None = None
        self.client: Client | None = None

    def start(self) -> RunningPlugin:
        self.plugin = NodePlugin(self.config)
        self.plugin.start(f"unix://{self.socket}")
        self.client = Client(self.socket)
        return self

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.plugin:
            self.plugin.stop(grace=1)
        self.plugin = self.client = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def plugin(node: Node) -> Iterator[RunningPlugin]:
    running = RunningPlugin(node, publish_timeout=3.0, repair_interval=0.5).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(plugin: RunningPlugin) -> Client:
    assert plugin.client is not None
    return plugin.client
