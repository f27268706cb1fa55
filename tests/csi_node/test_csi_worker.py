"""The node plugin with the real cache worker: a Dataset in a real S3 server (moto over HTTP),
``datahoard mount`` serving its FUSE view on the test node, the plugin binding it into a pod
target. Reads go through the whole stack; the worker is killed and restarted under a running
'container'; the plugin itself is restarted."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2
from tests.support.csi import Client, Container, RunningPlugin, Worker
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

LABELS = b"cat\ndog\n"
#: A dead FUSE connection answers ENOTCONN, or ECONNABORTED for requests the kernel aborted.
DISCONNECTED = (errno.ENOTCONN, errno.ECONNABORTED)
IMAGE = bytes(range(256)) * 4096  # 1 MiB: several FUSE reads


@pytest.fixture
def worker(node, s3, bucket, s3_server) -> Iterator[Worker]:
    s3.put_object(Bucket=bucket, Key="imagenet/labels.txt", Body=LABELS)
    s3.put_object(Bucket=bucket, Key="imagenet/train/n01/a.jpg", Body=IMAGE)
    w = Worker(f"s3://{bucket}/imagenet/", node.view_path(), node.root / "cache", s3_server.endpoint)
    try:
        yield w.start()
    finally:
        w.cleanup()


def serves(target: str) -> bool:
    try:
        with open(os.path.join(target, "labels.txt"), "rb") as f:
            return f.read() == LABELS
    except OSError:
        return False


CONTEXT = {names.CTX_NAMESPACE: "ml", names.CTX_NAME: "imagenet"}


def test_publish_read_and_stats_through_the_real_worker(client: Client, node, worker: Worker):
    target = node.target()
    client.publish(target, context=CONTEXT)
    with open(os.path.join(target, "train", "n01", "a.jpg"), "rb") as f:
        assert f.read() == IMAGE
    client.publish(target, context=CONTEXT)  # again: OK

    stats = client.stats(target)
    usage = {u.unit: u for u in stats.usage}
    assert not stats.volume_condition.abnormal
    # From the worker's stats document: dataset size, bytes cached on this node, file count.
    assert usage[csi_pb2.VolumeUsage.BYTES].total == len(LABELS) + len(IMAGE)
    assert usage[csi_pb2.VolumeUsage.BYTES].used > 0
    assert usage[csi_pb2.VolumeUsage.INODES].total == 2

    client.unpublish(target)
    assert not os.path.exists(target)
    client.unpublish(target)


def test_worker_crash_and_restart_under_a_running_pod(client: Client, node, worker: Worker):
    target = node.target()
    client.publish(target, context=CONTEXT)
    with Container(node, target, propagation="rslave") as app, \
            Container(node, target, propagation="rprivate", name="no-propagation") as plain:
        assert app.read("labels.txt") == LABELS.decode()
        assert app.open("train/n01/a.jpg")["ok"]  # held across the crash, nothing read yet

        worker.kill()
        assert app.try_read("labels.txt")["errno"] in DISCONNECTED
        assert plain.try_read("labels.txt")["errno"] in DISCONNECTED
        assert client.stats(target).volume_condition.abnormal

        worker.start()
        eventually(lambda: serves(target), what="the plugin to re-bind the restarted worker's view")
        assert app.read("labels.txt") == LABELS.decode()  # same pod, same container: works again
        # Without mount propagation the plugin repairs the copy inside the container's namespace.
        eventually(lambda: plain.try_read("labels.txt")["ok"], what="the private copy to be repaired")
        assert app.read("train/n01/a.jpg") == IMAGE.decode("latin-1")
        # A descriptor opened before the crash stays on the dead connection (only pages already
        # in the kernel's page cache would still read).
        held = app.pread("train/n01/a.jpg")
        assert not held["ok"] and held["errno"] in (*DISCONNECTED, errno.EIO), held
        assert not client.stats(target).volume_condition.abnormal


def test_plugin_restart_keeps_volumes_and_repairs_a_worker_restart_it_missed(plugin: RunningPlugin, node, worker: Worker):
    target = node.target()
    plugin.client.publish(target, context=CONTEXT)
    with Container(node, target, propagation="rslave") as app:
        plugin.restart()
        assert app.read("labels.txt") == LABELS.decode()
        assert not plugin.client.stats(target).volume_condition.abnormal

        plugin.stop()
        worker.restart()  # while the plugin is down
        plugin.start()
        eventually(lambda: serves(target), what="the restarted plugin to repair the target")
        assert app.read("labels.txt") == LABELS.decode()
    plugin.client.unpublish(target)
    assert not os.path.exists(target)
