"""The CSI node service's idempotency and error codes without root: the servicer's methods
called directly, mounts kept by the in-memory FakeMounter (its contract with LinuxMounter is
checked in test_mounter_contract.py), targets as real directories under a tmp host root.

The gRPC server, the real kernel and csi-sanity are in the integration tier (test_csi_rpc.py,
test_csi_sanity.py); this is the rulebook: what each request gets in each state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2
from datahoard.csi_node.node import NodeConfig, NodeService
from datahoard.csi_node.recovery import Repairer
from datahoard.csi_node.state import StateStore
from datahoard.csi_node.volume_lock import TargetLocks
from tests.support.fakes.mounter import FakeFilesystem, FakeMounter

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
VOLUME = "ml/imagenet"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    """The part of grpc.ServicerContext the servicer uses: ``abort`` raises, as gRPC's does."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@dataclass
class Node:
    service: NodeService
    mounter: FakeMounter
    root: Path
    view_fs: FakeFilesystem | None = None

    @property
    def view(self) -> str:
        return str(names.mount_dir("ml", "imagenet", self.root))

    def start_worker(self) -> FakeFilesystem:
        """What a cache worker does: mount a new FUSE view of the Dataset."""
        os.makedirs(self.view, exist_ok=True)
        self.view_fs = self.mounter.mount_filesystem(self.view)
        return self.view_fs

    def target(self, n: int = 0) -> str:
        pod = self.root / "pods" / f"pod{n}"
        pod.mkdir(parents=True, exist_ok=True)
        return str(pod / "mount")

    def publish(self, target: str, mode: int = Mode.MULTI_NODE_READER_ONLY, flags: tuple[str, ...] = (),
                volume_id: str = VOLUME, block: bool = False, readonly: bool = True):
        req = csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=target, readonly=readonly)
        if block:
            req.volume_capability.block.SetInParent()
        else:
            req.volume_capability.mount.mount_flags.extend(flags)
        req.volume_capability.access_mode.mode = mode
        return self.service.NodePublishVolume(req, Context())

    def unpublish(self, target: str, volume_id: str = VOLUME):
        return self.service.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), Context())

    def stats(self, path: str, volume_id: str = VOLUME):
        return self.service.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path), Context())

    def layers(self, target: str) -> int:
        return len(self.mounter.mounts_at(target))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(Aborted) as info:
        call()
    return info.value.code


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    mounter = FakeMounter()
    state = StateStore(tmp_path / "state.json")
    locks = TargetLocks()
    # publish_timeout 0: one look at the view, no waiting (waits are the integration tier's).
    config = NodeConfig(node_id="node-a", host_root=tmp_path, state_file=tmp_path / "state.json",
                        publish_timeout=0, probe_timeout=1, repair_namespaces=False)
    repairer = Repairer(state, mounter, locks, probe_timeout=1, repair_namespaces=False)
    service = NodeService(config, state, mounter, locks, repairer, stats_lookup=lambda view: None)
    yield Node(service, mounter, tmp_path)


def test_publish_binds_the_live_view_read_only(node):
    fs = node.start_worker()
    target = node.target()
    node.publish(target, flags=("noexec",))
    [layer] = node.mounter.mounts_at(target)
    assert layer.readonly and "noexec" in layer.options
    assert node.mounter.probe(target, 1).device == fs.device
    assert node.service.state.get(target).view_path == node.view


def test_publishing_the_same_thing_twice_is_success_without_a_second_bind(node):
    node.start_worker()
    target = node.target()
    node.publish(target)
    node.publish(target)
    assert node.layers(target) == 1 and node.mounter.binds == 1


@pytest.mark.parametrize("change", [{"flags": ("noexec",)}, {"readonly": False},
                                    {"mode": Mode.SINGLE_NODE_READER_ONLY}])
def test_the_same_target_with_other_parameters_already_exists(node, change):
    node.start_worker()
    target = node.target()
    node.publish(target)
    assert code_of(lambda: node.publish(target, **change)) is grpc.StatusCode.ALREADY_EXISTS
    assert node.layers(target) == 1


def test_a_single_node_mode_allows_one_target(node):
    node.start_worker()
    node.publish(node.target(0), mode=Mode.SINGLE_NODE_READER_ONLY)
    assert code_of(lambda: node.publish(node.target(1), mode=Mode.SINGLE_NODE_READER_ONLY)) \
        is grpc.StatusCode.FAILED_PRECONDITION
    node.publish(node.target(2))  # a multi-node mode may add targets
    assert node.layers(node.target(2)) == 1


def test_no_view_directory_is_not_found(node):
    target = node.target()
    assert code_of(lambda: node.publish(target)) is grpc.StatusCode.NOT_FOUND
    assert not os.path.exists(target)


def test_a_view_that_is_not_live_is_unavailable(node):
    target = node.target()
    os.makedirs(node.view)  # the directory, but no worker mounted it
    assert code_of(lambda: node.publish(target)) is grpc.StatusCode.UNAVAILABLE
    node.start_worker().die()  # mounted, then the worker died
    assert code_of(lambda: node.publish(target)) is grpc.StatusCode.UNAVAILABLE
    assert node.layers(target) == 0


def test_someone_elses_mount_at_the_target_is_never_bound_over(node):
    node.start_worker()
    target = node.target()
    os.mkdir(target)
    other = node.root / "other"
    other.mkdir()
    node.mounter.bind_readonly(str(other), target, [])
    assert code_of(lambda: node.publish(target)) is grpc.StatusCode.ALREADY_EXISTS
    assert node.layers(target) == 1


def test_a_lost_record_of_our_own_mount_is_adopted(node):
    node.start_worker()
    target = node.target()
    node.publish(target)
    node.service.state.remove(target)  # the state file was lost
    node.publish(target)
    assert node.layers(target) == 1 and node.service.state.get(target) is not None


def test_republishing_after_a_worker_restart_stacks_a_fresh_bind(node):
    old = node.start_worker()
    target = node.target()
    node.publish(target)
    old.die()
    new = node.start_worker()
    node.publish(target)  # kubelet retries the publish: the target is repaired, not refused
    assert node.layers(target) == 2
    assert node.mounter.probe(target, 1).device == new.device
    assert node.stats(target).volume_condition.abnormal is False


def test_unpublish_is_idempotent(node):
    node.start_worker()
    target = node.target()
    node.publish(target)
    node.unpublish(target)
    assert node.layers(target) == 0 and not os.path.exists(target)
    assert node.service.state.get(target) is None
    node.unpublish(target)  # again: success
    node.unpublish(node.target(5))  # never published: success


def test_unpublish_removes_every_layer(node):
    node.start_worker().die()
    node.start_worker()
    target = node.target()
    os.mkdir(target)
    for _ in range(3):
        node.mounter.bind_readonly(node.view, target, [])
    node.unpublish(target)
    assert node.layers(target) == 0 and not os.path.exists(target)


def test_unpublish_of_another_volumes_target_is_not_found(node):
    node.start_worker()
    target = node.target()
    node.publish(target)
    assert code_of(lambda: node.unpublish(target, volume_id="ml/other")) is grpc.StatusCode.NOT_FOUND
    assert node.layers(target) == 1


def test_unpublish_keeps_a_directory_with_files_in_it(node):
    target = node.target()
    os.mkdir(target)
    Path(target, "precious").write_text("x")
    assert code_of(lambda: node.unpublish(target)) is grpc.StatusCode.INTERNAL
    assert Path(target, "precious").exists()


def test_volume_stats_report_a_hung_view_as_abnormal(node):
    fs = node.start_worker()
    target = node.target()
    node.publish(target)
    assert node.stats(target).volume_condition.abnormal is False
    fs.hang()
    condition = node.stats(target).volume_condition
    assert condition.abnormal is True and "does not answer" in condition.message
    assert node.layers(target) == 1  # a slow worker is not repaired over


def test_volume_stats_errors(node):
    node.start_worker()
    target = node.target()
    assert code_of(lambda: node.stats(target)) is grpc.StatusCode.NOT_FOUND
    node.publish(target)
    assert code_of(lambda: node.stats("")) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: node.stats(node.target(3))) is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("request_kwargs, code", [
    ({"volume_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"block": True}, grpc.StatusCode.FAILED_PRECONDITION),
    ({"mode": Mode.SINGLE_NODE_WRITER}, grpc.StatusCode.FAILED_PRECONDITION),
    ({"flags": ("rw",)}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_are_refused_before_anything_is_mounted(node, request_kwargs, code):
    node.start_worker()
    target = node.target()
    assert code_of(lambda: node.publish(target, **request_kwargs)) is code
    assert node.layers(target) == 0 and not os.path.exists(target)


def test_a_relative_or_orphan_target_is_invalid(node):
    node.start_worker()
    assert code_of(lambda: node.publish("pods/x/mount")) is grpc.StatusCode.INVALID_ARGUMENT
    orphan = str(node.root / "no-such-pod" / "mount")
    assert code_of(lambda: node.publish(orphan)) is grpc.StatusCode.INVALID_ARGUMENT
