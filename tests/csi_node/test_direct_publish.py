"""NodePublishVolume over real gRPC with a real ``datahoard mount --direct --no-direct-bind``
worker: once the worker reports its direct tree ready, new publishes bind the tree (plain
files, no FUSE hop); a publish made before stays on FUSE; the tree is kept while bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datahoard import names, runtime
from datahoard.csi_node import csi_pb2
from tests.support.csi import Client
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

CONTEXT = {names.CTX_NAMESPACE: "ml", names.CTX_NAME: "imagenet"}
FILES = {
    "labels.txt": b"cat\ndog\n",
    "train/n01/a.jpg": bytes(range(256)) * 400,
    "train/n02/b.jpg": os.urandom(150_000),
    "empty.bin": b"",
}


def top_mount(path: str) -> tuple[str, str]:
    """(fstype, root) of the mount a lookup of *path* reaches."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4] == path:
                entries.append((right.split()[0], fields[3]))
    assert entries, f"nothing mounted at {path}"
    return entries[-1]


def contents(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


class DirectWorker:
    def __init__(self, node, bucket: str, endpoint: str) -> None:
        self.view = node.view_path()
        self.cache_dir = names.cache_dir("ml", "imagenet", node.host_root)
        self.args = ["mount", f"s3://{bucket}/imagenet/", str(self.view), "--cache-dir", str(self.cache_dir),
                     "--endpoint-url", endpoint, "--warm", "--direct", "--no-direct-bind"]
        self.pid = 0

    def start(self) -> DirectWorker:
        self.view.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "datahoard.cli", *self.args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        self.pid = runtime.lookup(self.view).pid
        return self

    def stats(self):
        return runtime.fetch_stats(runtime.lookup(self.view).stats_url)

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "datahoard.cli", "umount", str(self.view)], capture_output=True)


@pytest.fixture
def direct_worker(node, s3, bucket, s3_server) -> Iterator[DirectWorker]:
    for key, body in FILES.items():
        s3.put_object(Bucket=bucket, Key=f"imagenet/{key}", Body=body)
    w = DirectWorker(node, bucket, s3_server.endpoint)
    try:
        yield w
    finally:
        w.stop()


def test_publish_binds_the_direct_tree_once_ready(client: Client, node, direct_worker: DirectWorker):
    # Publish a first pod while the worker has no tree yet (warming is slowed down): FUSE.
    direct_worker.args += ["--bandwidth-limit", "100000"]
    direct_worker.start()
    early = node.target("pod-early")
    client.publish(early, context=CONTEXT)
    assert top_mount(early)[0] == "fuse.datahoard"

    eventually(lambda: direct_worker.stats().direct.state == "ready", timeout=30, what="the direct tree")
    stats = direct_worker.stats()
    assert stats.serving == "direct"
    tree = stats.direct.path
    assert os.path.dirname(tree) == str(direct_worker.cache_dir / "direct")
    # --no-direct-bind: the worker's own mountpoint stays the FUSE view.
    assert top_mount(str(direct_worker.view))[0] == "fuse.datahoard"

    late = node.target("pod-late")
    client.publish(late, context=CONTEXT)
    fstype, root = top_mount(late)
    assert not fstype.startswith("fuse") and root.endswith("/direct/" + os.path.basename(tree))
    assert contents(late) == FILES
    with pytest.raises(OSError):
        open(os.path.join(late, "labels.txt"), "ab")
    client.publish(late, context=CONTEXT)  # the same publish again: OK
    assert top_mount(early)[0] == "fuse.datahoard"  # published before: stays on FUSE
    assert contents(early) == FILES

    # The target's reference keeps the tree; stats still come from the worker.
    refs = Path(f"{tree}.refs")
    assert len(list(refs.iterdir())) == 1
    stats_rpc = client.stats(late)
    assert not stats_rpc.volume_condition.abnormal
    usage = {u.unit: u for u in stats_rpc.usage}
    assert usage[csi_pb2.VolumeUsage.INODES].total == len(FILES)

    client.unpublish(late)
    assert not os.path.exists(late) and not list(refs.iterdir())
    client.unpublish(early)
    direct_worker.stop()
    with open("/proc/self/mountinfo") as f:
        assert str(node.pods) not in f.read()


def test_plugin_restart_keeps_a_tree_publish_healthy(plugin, node, direct_worker: DirectWorker):
    direct_worker.start()
    eventually(lambda: direct_worker.stats().direct.state == "ready", timeout=30, what="the direct tree")
    target = node.target()
    plugin.client.publish(target, context=CONTEXT)
    assert not top_mount(target)[0].startswith("fuse")
    plugin.restart()
    time.sleep(1.5)  # a few repair passes: a tree target is healthy, never re-bound to FUSE
    assert not top_mount(target)[0].startswith("fuse")
    assert not plugin.client.stats(target).volume_condition.abnormal
    assert contents(target) == FILES
    plugin.client.unpublish(target)
    assert not os.path.exists(target)
