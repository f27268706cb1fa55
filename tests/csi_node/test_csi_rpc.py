"""The node plugin over a real unix socket: identity, every error code from the spec's tables,
and the publish/unpublish lifecycle with real bind mounts of a real FUSE view."""

from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import grpc
import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2
from datahoard.csi_node.mounter import LinuxMounter
from tests.support.csi import Client, Mode, RunningPlugin, TinyView

pytestmark = pytest.mark.integration


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


def details_of(call, *args, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.details()


# -- identity ------------------------------------------------------------------------------------

def test_plugin_info_capabilities_and_probe(client: Client):
    info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == names.CSI_DRIVER_NAME and info.vendor_version
    caps = client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []  # node-only: no controller, no topology
    assert client.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_probe_fails_with_failed_precondition_when_host_root_is_missing(node):
    node.host_root.rmdir()
    running = RunningPlugin(node).start()
    try:
        with pytest.raises(grpc.RpcError) as info:
            running.client.identity.Probe(csi_pb2.ProbeRequest())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(node.host_root) in info.value.details()
    finally:
        running.stop()


def test_node_capabilities_and_info(client: Client):
    caps = client.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    RPC = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION}
    info = client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-a" and info.max_volumes_per_node == 0
    assert code_of(client.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest()) == grpc.StatusCode.UNIMPLEMENTED


# -- INVALID_ARGUMENT --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "change",
    ["no volume_id", "no target_path", "relative target_path", "no volume_capability", "no access_type",
     "no access_mode", "bad handle", "unsupported mount flag"],
)
def test_publish_invalid_argument(client: Client, node, change):
    req = client.publish_request(target_path=node.target())
    if change == "no volume_id":
        req.volume_id = ""
    elif change == "no target_path":
        req.target_path = ""
    elif change == "relative target_path":
        req.target_path = "pods/x/mount"
    elif change == "no volume_capability":
        req.ClearField("volume_capability")
    elif change == "no access_type":
        req.volume_capability.ClearField("mount")
    elif change == "no access_mode":
        req.volume_capability.ClearField("access_mode")
    elif change == "bad handle":
        req.volume_id = "no-slash"
    elif change == "unsupported mount flag":
        req.volume_capability.mount.mount_flags.append("rw")
    assert code_of(client.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists(req.target_path or "/nonexistent")


@pytest.mark.parametrize("missing", ["volume_id", "target_path"])
def test_unpublish_invalid_argument(client: Client, node, missing):
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id="ml/imagenet", target_path=node.target())
    req.ClearField(missing)
    assert code_of(client.node.NodeUnpublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("missing", ["volume_id", "volume_path"])
def test_volume_stats_invalid_argument(client: Client, node, missing):
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id="ml/imagenet", volume_path=node.target())
    req.ClearField(missing)
    assert code_of(client.node.NodeGetVolumeStats, req) == grpc.StatusCode.INVALID_ARGUMENT


# -- FAILED_PRECONDITION ----------------------------------------------------------------------------

def test_write_access_modes_and_block_are_refused(client: Client, node, tiny_view):
    for mode in (Mode.SINGLE_NODE_WRITER, Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_SINGLE_WRITER):
        details = details_of(client.publish, node.target(), mode=mode)
        assert "read-only" in details and "ml/imagenet" in details
        assert code_of(client.publish, node.target(), mode=mode) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(client.publish, node.target(), block=True) == grpc.StatusCode.FAILED_PRECONDITION
    assert not LinuxMounter().mounts_at(node.target())


def test_single_node_mode_on_a_second_target_is_failed_precondition(client: Client, node, tiny_view):
    client.publish(node.target("pod-a"), mode=Mode.SINGLE_NODE_READER_ONLY)
    assert code_of(client.publish, node.target("pod-b"), mode=Mode.SINGLE_NODE_READER_ONLY) == \
        grpc.StatusCode.FAILED_PRECONDITION
    client.publish(node.target("pod-c"))  # MULTI_NODE_READER_ONLY: any number of targets


# -- NOT_FOUND --------------------------------------------------------------------------------------

def test_publish_of_a_dataset_without_a_view_on_this_node_is_not_found(client: Client, node):
    target = node.target()
    details = details_of(client.publish, target, volume_id="ml/absent")
    assert "ml/absent" in details and str(node.view_path("ml", "absent")) in details
    assert code_of(client.publish, target, volume_id="ml/absent") == grpc.StatusCode.NOT_FOUND
    assert not os.path.exists(target)


def test_publish_when_the_view_is_not_mounted_is_unavailable(client: Client, node):
    node.view_path().mkdir(parents=True)  # the worker created the directory but is not serving yet
    assert code_of(client.publish, node.target()) == grpc.StatusCode.UNAVAILABLE


def test_unpublish_of_another_volume_at_a_published_target_is_not_found(client: Client, node, tiny_view):
    target = node.target()
    client.publish(target)
    assert code_of(client.unpublish, target, volume_id="ml/other") == grpc.StatusCode.NOT_FOUND
    assert LinuxMounter().mounts_at(target)  # untouched


def test_volume_stats_not_found_for_unknown_volume_and_wrong_path(client: Client, node, tiny_view):
    target = node.target()
    assert code_of(client.stats, target) == grpc.StatusCode.NOT_FOUND  # nothing published yet
    client.publish(target)
    assert code_of(client.stats, target, volume_id="ml/unknown") == grpc.StatusCode.NOT_FOUND
    details = details_of(client.stats, node.target("pod-z"))
    assert "ml/imagenet" in details and "pod-z" in details
    assert code_of(client.stats, node.target("pod-z")) == grpc.StatusCode.NOT_FOUND


# -- ALREADY_EXISTS -------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["readonly", "mount flags", "access mode", "volume"])
def test_republish_with_different_parameters_is_already_exists(client: Client, node, tiny_view, change):
    target = node.target()
    client.publish(target)
    kwargs = {"readonly": {"readonly": True}, "mount flags": {"flags": ["noexec"]},
              "access mode": {"mode": Mode.SINGLE_NODE_READER_ONLY}}.get(change, {})
    if change == "volume":
        (node.view_path("ml", "coco")).mkdir(parents=True)
        kwargs = {"volume_id": "ml/coco"}
    assert code_of(client.publish, target, **kwargs) == grpc.StatusCode.ALREADY_EXISTS
    assert (open(os.path.join(target, "labels.txt")).read()) == "cat\ndog\n"  # first publish intact


def test_foreign_mount_at_the_target_is_already_exists(client: Client, node, tiny_view):
    target = node.target()
    os.mkdir(target)
    other = node.root / "other"
    other.mkdir()
    LinuxMounter().bind_readonly(str(other), target, [])
    assert code_of(client.publish, target) == grpc.StatusCode.ALREADY_EXISTS


# -- ABORTED ----------------------------------------------------------------------------------------

def test_concurrent_publish_on_one_target_is_aborted(node):
    """Two publishes race for one target while the view is not live: whichever takes the
    target's lock waits for the view, the other is ABORTED at once. Then the view comes up and
    the waiting one succeeds. No sleeps: the ABORTED call is the first to return by construction."""
    running = RunningPlugin(node, publish_timeout=60.0).start()
    try:
        target = node.target()
        src = node.data / "imagenet"
        src.mkdir()
        (src / "labels.txt").write_text("cat\n")
        view = TinyView(node, src, node.view_path())
        view.path.mkdir(parents=True)
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(running.client.publish, target) for _ in range(2)]
            done, pending = wait(calls, return_when=FIRST_COMPLETED, timeout=50)
            assert len(done) == 1 and len(pending) == 1
            first = done.pop()
            assert first.exception() is not None and first.exception().code() == grpc.StatusCode.ABORTED
            assert target in first.exception().details()
            view.start()
            pending.pop().result(timeout=60)  # succeeds now that the view is live
        assert open(os.path.join(target, "labels.txt")).read() == "cat\n"
    finally:
        running.stop()


# -- lifecycle --------------------------------------------------------------------------------------

def test_publish_read_republish_unpublish_unpublish(client: Client, node, tiny_view):
    target = node.target()
    client.publish(target)
    assert open(os.path.join(target, "train", "a.jpg"), "rb").read() == b"A" * 1000
    top = LinuxMounter().mounts_at(target)[-1]
    assert top.readonly and "nosuid" in top.options and "nodev" in top.options
    with pytest.raises(OSError):
        open(os.path.join(target, "new.txt"), "w")

    client.publish(target)  # identical: OK, and no second layer
    assert len(LinuxMounter().mounts_at(target)) == 1

    stats = client.stats(target)
    assert not stats.volume_condition.abnormal
    assert any(u.unit == csi_pb2.VolumeUsage.BYTES and u.total > 0 for u in stats.usage)

    client.unpublish(target)
    assert not os.path.exists(target)
    assert not LinuxMounter().mounts_at(target)
    client.unpublish(target)  # again: OK
    assert os.path.isdir(node.view_path()) and LinuxMounter().mounts_at(str(node.view_path()))


def test_unpublish_of_a_never_published_target_is_ok(client: Client, node):
    client.unpublish(node.target())


def test_secrets_are_never_logged(client: Client, node, tiny_view, caplog):
    caplog.set_level(logging.DEBUG, logger="datahoard")
    client.publish(node.target(), secrets={"aws_secret_access_key": "SEKRIT-123"})
    code_of(client.publish, node.target(), secrets={"k": "SEKRIT-456"}, flags=["password=SEKRIT-789"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "NodePublishVolume" in text and "aws_secret_access_key" in text  # the call was logged...
    assert "SEKRIT" not in text  # ...without the values


def test_inline_ephemeral_volume_finds_its_view_from_volume_context(client: Client, node, tiny_view):
    """kubelet generates volume_id 'csi-<sha256>' for inline volumes; the attributes name the Dataset."""
    target = node.target()
    context = {names.CTX_NAMESPACE: "ml", names.CTX_NAME: "imagenet", "csi.storage.k8s.io/ephemeral": "true"}
    client.publish(target, volume_id="csi-0123abcd", context=context)
    assert open(os.path.join(target, "labels.txt")).read() == "cat\ndog\n"
    client.unpublish(target, volume_id="csi-0123abcd")
    assert not os.path.exists(target)


def test_failed_calls_are_logged_with_code_and_message(client: Client, node, caplog):
    caplog.set_level(logging.INFO, logger="datahoard")
    code_of(client.publish, node.target(), volume_id="")
    line = next(r.getMessage() for r in caplog.records if "NodePublishVolume" in r.getMessage())
    assert "INVALID_ARGUMENT" in line and "volume_id is required" in line and "b'" not in line
