"""The CSI Node service: publish a Dataset's FUSE view read-only into a pod, and back.

No staging: the view is already mounted on the node by the cache worker, so NodePublishVolume
is one bind mount and NodeStage/NodeUnstage/NodeExpand stay UNIMPLEMENTED (not advertised).

When the worker reports a ready *direct tree* (``--direct``: the fully cached dataset as plain
read-only files), a new publish binds the tree instead of the view, and the record names the
tree as the target's view: pods then read at local-disk speed with no FUSE hop. Targets
published before stay on FUSE. The tree needs no repair after a worker restart (it is plain
files), and the worker keeps it while a reference file of the target exists.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from datahoard import names, tree_layout

from . import consumers, csi_pb2, csi_pb2_grpc, usage, validation
from .errors import AlreadyExists, CsiError, FailedPrecondition, InvalidArgument, NotFound, rpc
from .mounter import Health, Mounter
from .recovery import Repairer, Status
from .state import PublishedTarget, StateStore
from .validation import MULTI_TARGET_MODES, PublishParams
from .views import check_view, ready_tree, view_of_tree, wait_live
from .volume_lock import TargetLocks

log = logging.getLogger(__name__)

RPC = csi_pb2.NodeServiceCapability.RPC

#: Directory mode for a target path the plugin creates (as csi-driver-host-path does).
TARGET_MODE = 0o750


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    host_root: Path
    state_file: Path
    #: How long NodePublishVolume waits for the view to become live before UNAVAILABLE. Well
    #: under kubelet's 2-minute CSI timeout, so kubelet sees our message, not its own timeout.
    publish_timeout: float = 20.0
    #: How long a statvfs on a view or target may take before it counts as hung.
    probe_timeout: float = 5.0
    #: Fallback period of the repair loop; mount-table changes wake it immediately anyway.
    repair_interval: float = 10.0
    #: Also repair dead copies in other mount namespaces (pods without mount propagation,
    #: subPath mounts); needs hostPID to see the pods' processes.
    repair_namespaces: bool = True


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        config: NodeConfig,
        state: StateStore,
        mounter: Mounter,
        locks: TargetLocks,
        repairer: Repairer,
        stats_lookup: usage.StatsLookup = usage.worker_stats,
    ) -> None:
        self.config = config
        self.state = state
        self.mounter = mounter
        self.locks = locks
        self.repairer = repairer
        self.stats_lookup = stats_lookup

    @rpc
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=RPC(type=RPC.GET_VOLUME_STATS)),
                csi_pb2.NodeServiceCapability(rpc=RPC(type=RPC.VOLUME_CONDITION)),
            ]
        )

    @rpc
    def NodeGetInfo(self, request, context):
        # No accessible_topology: placement is the PV's nodeAffinity on the operator's node label.
        return csi_pb2.NodeGetInfoResponse(node_id=self.config.node_id, max_volumes_per_node=0)

    @rpc
    def NodePublishVolume(self, request, context):
        params = validation.publish_params(request, self.config.host_root)
        with self.locks.hold(params.target_path, "NodePublishVolume", params.volume_id):
            self._publish(params)
            consumers.record(self.config.host_root, params.view.namespace, params.view.name,
                             params.target_path, request.volume_context)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish(self, p: PublishParams) -> None:
        """Bind the live view read-only at the target, or confirm an identical earlier publish.

        1. Same target, same parameters, already mounted: OK (repairing it first if it is stale).
           Same target, other parameters or another volume: ALREADY_EXISTS.
        2. A mount at the target that this plugin did not record: adopted if it is this view,
           ALREADY_EXISTS otherwise (never bind over someone else's mount).
        3. A single-node mode already published at another target: FAILED_PRECONDITION.
        4. Wait (bounded) for the view to be live: NOT_FOUND / UNAVAILABLE if it is not.
        5. Create the target directory, bind, remount read-only, record it.
        """
        wanted = p.record()
        where = f"volume {p.volume_id} at {p.target_path}"
        existing = self.state.get(p.target_path)
        mounted = bool(self.mounter.mounts_at(p.target_path))
        if existing is not None and self._is_tree_of(existing.view_path, p):
            wanted = replace(wanted, view_path=existing.view_path)  # the same publish, served direct
        if existing is not None:
            if not existing.same_publish(wanted):
                raise AlreadyExists(f"{where}: already published with different parameters ({_diff(existing, wanted)})")
            if mounted:
                self.repairer.repair(existing, holding_lock=True)
                return
        elif mounted:
            self._adopt_or_refuse(p)
            return
        others = [t for t in self.state.for_volume(p.volume_id) if t.target_path != p.target_path]
        if others and p.access_mode not in MULTI_TARGET_MODES:
            raise FailedPrecondition(
                f"{where}: access mode {validation.Mode.Name(p.access_mode)} allows one target per node, "
                f"and the volume is already published at {others[0].target_path}"
            )
        view = wait_live(self.mounter, p.volume_id, p.view, self.config.publish_timeout, self.config.probe_timeout)
        tree = ready_tree(p.view, self.config.host_root)
        source = tree or p.view.path
        _make_target(p.target_path, where)
        if tree:
            tree_layout.add_ref(tree, p.target_path)  # before the bind: the worker must never delete it under us
            wanted = replace(wanted, view_path=tree)
        try:
            self.mounter.bind_readonly(source, p.target_path, list(p.mount_flags))
        except OSError:
            if tree:
                tree_layout.drop_ref(tree, p.target_path)
            raise
        try:
            self.state.put(wanted)
        except OSError:
            self.mounter.unmount_all(p.target_path)
            if tree:
                tree_layout.drop_ref(tree, p.target_path)
            raise
        if tree:
            log.info("published %s from the direct tree %s (no FUSE hop)", where, tree)
        else:
            log.info("published %s (view %s, device %s)", where, p.view.path, view.device)

    def _is_tree_of(self, path: str, p: PublishParams) -> bool:
        """Whether *path* is a direct tree in the cache of the Dataset *p* publishes."""
        return tree_layout.in_cache(path, names.cache_dir(p.view.namespace, p.view.name, self.config.host_root))

    def _adopt_or_refuse(self, p: PublishParams) -> None:
        """A mount we have no record of (state file lost): keep it only if it shows our view."""
        where = f"volume {p.volume_id} at {p.target_path}"
        view = check_view(self.mounter, p.view.path, self.config.probe_timeout)
        target = self.mounter.probe(p.target_path, self.config.probe_timeout)
        if view.health is Health.OK and target.health is Health.OK and view.device == target.device:
            self.state.put(p.record())
            log.info("adopted existing mount of %s", where)
            return
        tree = ready_tree(p.view, self.config.host_root)
        top = self.mounter.mounts_at(p.target_path)
        if tree and target.health is Health.OK and top and tree_layout.tree_id(top[-1].root) == tree_layout.tree_id(tree):
            tree_layout.add_ref(tree, p.target_path)
            self.state.put(replace(p.record(), view_path=tree))
            log.info("adopted existing mount of %s (direct tree %s)", where, tree)
            return
        raise AlreadyExists(f"{where}: something else is already mounted at the target path")

    @rpc
    def NodeUnpublishVolume(self, request, context):
        vol = validation.volume_id(request.volume_id)
        target = validation.path(request.target_path, "target_path", vol)
        with self.locks.hold(target, "NodeUnpublishVolume", vol):
            dataset = self._dataset_of(vol, target)
            self._unpublish(vol, target)
            if dataset is not None:
                consumers.forget(self.config.host_root, *dataset, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _dataset_of(self, vol: str, target: str) -> tuple[str, str] | None:
        """The Dataset published at ``target``: from its record's view (right for inline volumes
        too), else from the volume handle."""
        existing = self.state.get(target)
        if existing is not None:
            view = Path(self._stats_view(existing.view_path))
            parts = view.relative_to(self.config.host_root / "mnt").parts if view.is_relative_to(
                self.config.host_root / "mnt") else ()
            if len(parts) == 2:
                return parts[0], parts[1]
        try:
            return names.parse_volume_handle(vol)
        except ValueError:
            return None

    def _unpublish(self, vol: str, target: str) -> None:
        """Detach every layer at the target, remove the directory, forget the record.

        Idempotent: a target that is not mounted or does not exist is success. The one refusal
        is a target recorded for *another* volume (NOT_FOUND): tearing that down would break a
        pod kubelet did not ask about.
        """
        existing = self.state.get(target)
        if existing is not None and existing.volume_id != vol:
            raise NotFound(f"volume {vol} is not published at {target} (volume {existing.volume_id} is)")
        layers = self.mounter.unmount_all(target)
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            os.unlink(target)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise CsiError(
                    f"volume {vol} at {target}: the target is not a mount point but holds files; not removing it",
                    grpc.StatusCode.INTERNAL,
                ) from None
            raise
        self.state.remove(target)
        if existing is not None and tree_layout.tree_id(existing.view_path) is not None:
            tree_layout.drop_ref(existing.view_path, target)
        log.info("unpublished volume %s at %s (%d mount layer(s) detached)", vol, target, layers)

    @rpc
    def NodeGetVolumeStats(self, request, context):
        vol = validation.volume_id(request.volume_id)
        if not request.volume_path:
            raise InvalidArgument(f"volume {vol}: volume_path is required")
        # Any other path is a question, not a malformed request: where nothing of ours is
        # published (including relative paths) the answer is NOT_FOUND, as csi-sanity expects.
        path = validation.canonical(request.volume_path) if os.path.isabs(request.volume_path) else request.volume_path
        rec = self.state.get(path)
        if rec is None or rec.volume_id != vol:
            if not self.state.for_volume(vol):
                raise NotFound(f"volume {vol} is not published on this node")
            raise NotFound(f"volume {vol} is not published at {path}")
        if not self.mounter.mounts_at(path) and not os.path.lexists(path):  # no stat of a possibly hung mount
            raise NotFound(f"volume {vol}: {path} does not exist")
        check = self.repairer.repair(rec)  # on demand: a broken target is re-bound before we answer
        target_vfs = check.target.statvfs if check.target is not None else None
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage.volume_usage(self._stats_view(rec.view_path), target_vfs, self.stats_lookup),
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=check.status is not Status.HEALTHY,
                message=check.message,
            ),
        )


    def _stats_view(self, view_path: str) -> str:
        """The worker's stats are keyed by its FUSE view, also for targets bound to its tree."""
        if tree_layout.tree_id(view_path) is not None:
            return view_of_tree(view_path, self.config.host_root) or view_path
        return view_path


def _make_target(target: str, where: str) -> None:
    """Create target_path (the CO creates only its parent); an existing empty directory is fine."""
    try:
        os.mkdir(target, TARGET_MODE)
    except FileExistsError:
        if not os.path.isdir(target):
            raise InvalidArgument(f"{where}: target_path exists and is not a directory") from None
    except FileNotFoundError:
        raise InvalidArgument(f"{where}: the parent directory of target_path does not exist") from None


def _diff(old: PublishedTarget, new: PublishedTarget) -> str:
    parts = []
    if old.volume_id != new.volume_id:
        parts.append(f"it holds volume {old.volume_id}")
    if old.view_path != new.view_path:
        parts.append(f"view {old.view_path} vs {new.view_path}")
    if old.access_mode != new.access_mode:
        parts.append(f"access mode {validation.Mode.Name(old.access_mode)} vs {validation.Mode.Name(new.access_mode)}")
    if old.readonly != new.readonly:
        parts.append(f"readonly {old.readonly} vs {new.readonly}")
    if old.mount_flags != new.mount_flags:
        parts.append("mount options differ")
    return "; ".join(parts) or "parameters differ"


