"""Recovery: a cache worker restart (its FUSE view replaced) and a plugin restart.

These tests also pin down what an application in the pod sees, which the README documents:
during the outage every access fails with ENOTCONN; after the repair, paths opened anew work
again in the running container, with HostToContainer propagation (the stacked bind propagates)
and without any (the plugin repairs the copy in the container's namespace), and for subPath
mounts; descriptors opened before the crash stay dead.
"""

from __future__ import annotations

import errno
import os
import subprocess

import grpc
import pytest

from datahoard.csi_node.mounter import Health, LinuxMounter
from tests.support.csi import Client, Container, RunningPlugin, TinyView
from tests.support.polling import eventually

pytestmark = pytest.mark.integration

#: A dead FUSE connection answers ENOTCONN, or ECONNABORTED for requests the kernel aborted.
DISCONNECTED = (errno.ENOTCONN, errno.ECONNABORTED)


def target_serves(target: str, rel: str = "labels.txt") -> bool:
    try:
        with open(os.path.join(target, rel)) as f:
            return f.read() == "cat\ndog\n"
    except OSError:
        return False


def test_worker_restart_is_repaired_and_a_host_to_container_pod_keeps_working(client: Client, node, tiny_view: TinyView):
    target = node.target()
    client.publish(target)
    with Container(node, target, propagation="rslave") as app:  # mountPropagation: HostToContainer
        assert app.read("labels.txt") == "cat\ndog\n"
        assert app.open("train/a.jpg")["ok"]

        tiny_view.kill()
        # During the outage: every access fails with ENOTCONN, in the pod and on the host.
        assert app.try_read("labels.txt")["errno"] in DISCONNECTED
        stats = client.stats(target)
        assert stats.volume_condition.abnormal and "disconnected" in stats.volume_condition.message

        tiny_view.restart()
        eventually(lambda: target_serves(target), what="the repair loop to re-bind the target")

        # After the repair: new opens work in the running container, no pod restart...
        assert app.read("labels.txt") == "cat\ndog\n"
        assert app.read("train/a.jpg") == "A" * 1000
        # ...but a descriptor opened before the crash still points at the dead connection.
        assert not app.pread("train/a.jpg")["ok"]
        assert not client.stats(target).volume_condition.abnormal


def test_pod_without_mount_propagation_is_repaired_in_its_own_namespace(client: Client, node, tiny_view):
    """mountPropagation None (the default): the container's copy is private, so the plugin
    attaches a clone of the live view inside the container's mount namespace."""
    target = node.target()
    client.publish(target)
    with Container(node, target, propagation="rprivate") as app:
        assert app.open("train/a.jpg")["ok"]
        tiny_view.kill()
        assert app.try_read("labels.txt")["errno"] in DISCONNECTED
        tiny_view.restart()
        eventually(lambda: app.try_read("labels.txt")["ok"], what="the container's copy to be repaired")
        assert app.read("train/a.jpg") == "A" * 1000
        assert not app.pread("train/a.jpg")["ok"]  # opened before the crash: stays dead
        top = [line for line in app.mountinfo() if str(app.dir) in line][-1]
        assert " ro," in top and "nosuid" in top and "master:" in top  # read-only, receives, never sends


def test_without_namespace_repair_a_pod_without_propagation_keeps_the_dead_mount(node, tiny_view):
    running = RunningPlugin(node, repair_namespaces=False).start()
    try:
        target = node.target()
        running.client.publish(target)
        with Container(node, target, propagation="rprivate") as app:
            tiny_view.kill()
            tiny_view.restart()
            eventually(lambda: target_serves(target), what="the repair loop to re-bind the target")
            assert app.try_read("labels.txt")["errno"] in DISCONNECTED  # nothing else will repair it
        with Container(node, target, propagation="rprivate", name="restarted") as app:  # a new pod
            assert app.read("labels.txt") == "cat\ndog\n"
    finally:
        running.stop()


def test_subpath_mounts_are_repaired_on_the_node_and_in_the_pod(client: Client, node, tiny_view):
    """kubelet serves ``subPath`` with a bind of a subdirectory of the target (on the node), which
    the container then binds; stacking on the target reaches neither."""
    target = node.target()
    client.publish(target)
    subpath = node.root / "var-lib-kubelet" / "pods" / "pod-a" / "volume-subpaths" / "vol" / "trainer" / "0"
    subpath.mkdir(parents=True)
    subprocess.run(["mount", "--bind", os.path.join(target, "train"), str(subpath)], check=True)
    with Container(node, str(subpath), propagation="rslave") as app:
        assert app.read("a.jpg") == "A" * 1000
        tiny_view.kill()
        tiny_view.restart()
        eventually(lambda: app.try_read("a.jpg")["ok"], what="the subPath copy in the pod to be repaired")
        assert (subpath / "a.jpg").read_bytes() == b"A" * 1000  # and the node's own subPath bind
    client.unpublish(target)


def test_repair_on_demand_from_volume_stats(plugin: RunningPlugin, client: Client, node, tiny_view):
    target = node.target()
    client.publish(target)
    assert plugin.plugin is not None
    plugin.plugin.repair_loop.stop()  # only the on-demand path is left
    tiny_view.kill()
    tiny_view.restart()
    assert not target_serves(target)
    stats = client.stats(target)
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert target_serves(target)


def test_plugin_restart_keeps_published_volumes_and_repairs_what_broke_meanwhile(plugin: RunningPlugin, node, tiny_view):
    target = node.target()
    plugin.client.publish(target)
    with Container(node, target, propagation="rslave") as app:
        plugin.stop()
        assert app.read("labels.txt") == "cat\ndog\n"  # mounts do not depend on the plugin process
        tiny_view.kill()
        tiny_view.restart()  # the worker restarts while the plugin is down
        assert not target_serves(target)

        plugin.start()  # same state file: the startup pass repairs the target
        eventually(lambda: target_serves(target), what="the restarted plugin to repair the target")
        assert app.read("labels.txt") == "cat\ndog\n"
        plugin.client.publish(target)  # kubelet's retry of an identical publish: OK
        assert not plugin.client.stats(target).volume_condition.abnormal
    plugin.client.unpublish(target)
    assert not os.path.exists(target)


def test_unpublish_detaches_every_repair_layer(client: Client, node, tiny_view):
    target = node.target()
    client.publish(target)
    for _ in range(2):
        tiny_view.kill()
        tiny_view.restart()
        eventually(lambda: target_serves(target), what="repair")
    assert len(LinuxMounter().mounts_at(target)) == 3  # the original bind and one per restart
    client.unpublish(target)
    assert not LinuxMounter().mounts_at(target) and not os.path.exists(target)


def test_target_stays_broken_and_abnormal_while_the_worker_is_down(client: Client, node, tiny_view):
    target = node.target()
    client.publish(target)
    tiny_view.kill()
    assert LinuxMounter().probe(target, 5).health is Health.DISCONNECTED
    stats = client.stats(target)
    assert stats.volume_condition.abnormal
    assert target in stats.volume_condition.message
    client.unpublish(target)  # a pod deleted during the outage is still cleaned up
    assert not LinuxMounter().mounts_at(target) and not os.path.exists(target)


def test_record_of_a_target_that_disappeared_is_forgotten(plugin: RunningPlugin, client: Client, node, tiny_view):
    """After a node reboot the mount is gone and kubelet may have removed the directory."""
    target = node.target()
    client.publish(target)
    LinuxMounter().unmount_all(target)
    os.rmdir(target)
    assert plugin.plugin is not None
    state = plugin.plugin.state
    eventually(lambda: state.get(target) is None, what="the repair loop to drop the record")
    assert not os.path.exists(target)  # not recreated


def test_a_stuck_worker_is_reported_not_repaired(node, tiny_view: TinyView):
    """A worker that does not answer may still answer later: report it, do not bind over it."""
    running = RunningPlugin(node, probe_timeout=1.0, publish_timeout=2.0).start()
    try:
        target = node.target()
        running.client.publish(target)
        layers = len(LinuxMounter().mounts_at(target))
        tiny_view.pause()
        try:
            stats = running.client.stats(target)
            assert stats.volume_condition.abnormal and "does not answer" in stats.volume_condition.message
            assert len(LinuxMounter().mounts_at(target)) == layers
            # A new publish waits for the view, bounded, and then lets kubelet retry.
            with pytest.raises(grpc.RpcError) as info:
                running.client.publish(node.target("pod-b"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            tiny_view.resume()
        eventually(lambda: not running.client.stats(target).volume_condition.abnormal, what="the worker to answer again")
        assert target_serves(target)
    finally:
        running.stop()


def test_publish_after_a_node_reboot_binds_again(client: Client, node, tiny_view):
    """A reboot wipes the mounts but not the target directory or the state file; kubelet then
    publishes again for the pods it restarts."""
    target = node.target()
    client.publish(target)
    LinuxMounter().unmount_all(target)
    assert os.path.isdir(target) and not LinuxMounter().mounts_at(target)
    client.publish(target)
    assert target_serves(target) and len(LinuxMounter().mounts_at(target)) == 1


def test_unpublish_while_the_worker_is_stuck(client: Client, node, tiny_view: TinyView):
    """Deleting a pod must not hang on a stuck worker: unpublish only reads mountinfo and detaches."""
    target = node.target()
    client.publish(target)
    tiny_view.pause()
    try:
        client.unpublish(target)
        assert not LinuxMounter().mounts_at(target) and not os.path.exists(target)
    finally:
        tiny_view.resume()
