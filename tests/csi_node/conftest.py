"""Fixtures for the CSI node plugin tests: a shared-propagation scratch node, a FUSE view, the
plugin on a real unix socket, and a gRPC client for it.

Every mount a test makes lives under one tmpfs that the fixture made ``rshared`` (like ``/`` on
a systemd node), and teardown lazily detaches everything under it, deepest first, so a failed
test never leaves mounts behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.csi import HERE, Client, Node, RunningPlugin, TinyView, detach_under

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


@pytest.fixture
def tiny_view(node: Node) -> TinyView:
    src = node.data / "imagenet"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.jpg").write_bytes(b"A" * 1000)
    (src / "labels.txt").write_text("cat\ndog\n")
    return TinyView(node, src, node.view_path()).start()


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


@pytest.fixture
def keeper_plugin(node: Node) -> Iterator[RunningPlugin]:
    """The plugin hosting the node's FUSE keeper, as ``datahoard csi-node`` does by default."""
    running = RunningPlugin(node, keeper=True, publish_timeout=3.0, repair_interval=0.5).start()
    try:
        yield running
    finally:
        running.stop()
