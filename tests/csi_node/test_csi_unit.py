"""Unit tests: pure parts of the node plugin (no root, no mounts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2, genproto, validation
from datahoard.csi_node.errors import Aborted, FailedPrecondition, InvalidArgument
from datahoard.csi_node.logging_interceptor import REDACTED, redact
from datahoard.csi_node.server import socket_path
from datahoard.csi_node.state import PublishedTarget, StateStore
from datahoard.csi_node.views import resolve_view
from datahoard.csi_node.volume_lock import TargetLocks

Mode = csi_pb2.VolumeCapability.AccessMode


def test_committed_stubs_match_the_proto():
    assert genproto.stale_outputs() == []


def test_proto_field_numbers_follow_the_spec():
    fields = {f.name: f.number for f in csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields}
    assert fields == {"volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
                      "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8}
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_CONDITION == 4
    assert csi_pb2.VolumeCondition.DESCRIPTOR.fields_by_name["message"].number == 2
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"


def test_redaction_masks_secrets_and_mount_flags():
    req = csi_pb2.NodePublishVolumeRequest(volume_id="ml/imagenet", target_path="/t", secrets={"token": "hunter2"})
    req.volume_capability.mount.mount_flags.append("password=hunter3")
    text = redact(req)
    assert "hunter2" not in text and "hunter3" not in text
    assert REDACTED in text and "ml/imagenet" in text and "token" in text
    assert req.secrets["token"] == "hunter2"  # the request itself is untouched


def test_socket_path_accepts_csi_endpoint_forms():
    assert socket_path("unix:///csi/csi.sock") == "/csi/csi.sock"
    assert socket_path("unix:/csi/csi.sock") == "/csi/csi.sock"
    assert socket_path("/csi/csi.sock") == "/csi/csi.sock"
    with pytest.raises(ValueError):
        socket_path("tcp://0.0.0.0:1234")


def _publish(**overrides) -> csi_pb2.NodePublishVolumeRequest:
    req = csi_pb2.NodePublishVolumeRequest(volume_id="ml/imagenet", target_path="/pods/x/mount")
    req.volume_capability.mount.SetInParent()
    req.volume_capability.access_mode.mode = Mode.MULTI_NODE_READER_ONLY
    for key, value in overrides.items():
        setattr(req, key, value)
    return req


def test_publish_params_resolve_the_view_under_the_host_root(tmp_path: Path):
    params = validation.publish_params(_publish(), tmp_path)
    assert params.view.path == str(names.mount_dir("ml", "imagenet", tmp_path))
    ctx = {names.CTX_NAMESPACE: "team", names.CTX_NAME: "coco"}
    assert resolve_view("csi-abc123", ctx, tmp_path).path == str(names.mount_dir("team", "coco", tmp_path))


@pytest.mark.parametrize(
    ("context", "volume_id"),
    [
        ({}, "not-a-handle"),
        ({names.CTX_NAMESPACE: "..", names.CTX_NAME: "x"}, "v"),
        ({names.CTX_MOUNT_DIR: "/etc"}, "ml/imagenet"),
    ],
)
def test_view_outside_the_host_root_is_refused(tmp_path: Path, context, volume_id):
    with pytest.raises(InvalidArgument):
        resolve_view(volume_id, context, tmp_path)


def test_write_modes_are_refused_with_a_clear_message(tmp_path: Path):
    req = _publish()
    req.volume_capability.access_mode.mode = Mode.SINGLE_NODE_WRITER
    with pytest.raises(FailedPrecondition, match="read-only.*ReadOnlyMany"):
        validation.publish_params(req, tmp_path)


def test_unsupported_mount_flag_is_refused_without_echoing_it(tmp_path: Path):
    req = _publish()
    req.volume_capability.mount.mount_flags.append("password=sekrit")
    with pytest.raises(InvalidArgument) as info:
        validation.publish_params(req, tmp_path)
    assert "sekrit" not in str(info.value)


def test_state_store_survives_a_reload(tmp_path: Path):
    path = tmp_path / "state" / "state.json"
    rec = PublishedTarget("ml/imagenet", "/pods/a/mount", "/views/ml/imagenet", Mode.MULTI_NODE_READER_ONLY, False, ("noatime",))
    StateStore(path).put(rec)
    again = StateStore(path)
    assert again.get("/pods/a/mount") == rec
    assert path.stat().st_mode & 0o077 == 0  # no group/other access
    again.remove("/pods/a/mount")
    assert StateStore(path).all() == []


def test_unreadable_state_file_is_ignored_not_fatal(tmp_path: Path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert StateStore(path).all() == []


def test_volume_lock_refuses_a_second_holder():
    locks = TargetLocks()
    with locks.hold("/t", "NodePublishVolume", "ml/imagenet"):
        with pytest.raises(Aborted, match="NodePublishVolume"):
            with locks.hold("/t", "NodeUnpublishVolume", "ml/imagenet"):
                pass
        with locks.hold("/other", "NodePublishVolume", "ml/imagenet"):
            pass
    with locks.hold("/t", "NodeUnpublishVolume", "ml/imagenet"):
        pass


def test_an_rpc_waits_for_a_running_repair_instead_of_aborting():
    import threading

    from datahoard.csi_node.volume_lock import REPAIR

    locks = TargetLocks()
    assert locks.try_acquire("/t", REPAIR)
    acquired = threading.Event()

    def publish():
        with locks.hold("/t", "NodePublishVolume", "ml/imagenet"):
            acquired.set()

    thread = threading.Thread(target=publish)
    thread.start()
    assert not acquired.is_set()
    locks.release("/t")
    thread.join(10)
    assert acquired.is_set()
