"""Checks on incoming requests, in the order the spec and csi-sanity expect.

Required fields first (INVALID_ARGUMENT), then what this driver cannot do
(FAILED_PRECONDITION: block access, write access modes), then where the view is. Messages
name the volume and the path but never echo mount flags, which may carry secrets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datahoard.mounts import MOUNT_FLAG_BITS, canonical

from . import csi_pb2
from .errors import FailedPrecondition, InvalidArgument
from .state import PublishedTarget
from .views import ViewRef, resolve_view

Mode = csi_pb2.VolumeCapability.AccessMode.Mode

#: Datahoard volumes are read-only views of a remote dataset.
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
#: Modes that may be published at several targets on one node (the spec's MULTI_NODE_* rule).
MULTI_TARGET_MODES = frozenset({Mode.MULTI_NODE_READER_ONLY})

#: Linux PATH_MAX; the spec asks plugins to accept paths up to the OS maximum.
MAX_PATH = 4096


@dataclass(frozen=True)
class PublishParams:
    volume_id: str
    target_path: str
    view: ViewRef
    access_mode: int
    readonly: bool
    mount_flags: tuple[str, ...]

    def record(self) -> PublishedTarget:
        return PublishedTarget(
            volume_id=self.volume_id,
            target_path=self.target_path,
            view_path=self.view.path,
            access_mode=self.access_mode,
            readonly=self.readonly,
            mount_flags=self.mount_flags,
        )


def volume_id(value: str) -> str:
    if not value:
        raise InvalidArgument("volume_id is required")
    return value


def path(value: str, field: str, vol: str) -> str:
    """A required absolute path, canonicalised without touching its last component."""
    if not value:
        raise InvalidArgument(f"volume {vol}: {field} is required")
    if not os.path.isabs(value) or "\0" in value or len(value) > MAX_PATH:
        raise InvalidArgument(f"volume {vol}: {field} {value!r} is not an absolute path")
    return canonical(value)


def access_mode(cap: csi_pb2.VolumeCapability, vol: str, target: str) -> int:
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"volume {vol} at {target}: volume_capability needs mount or block access_type")
    if kind == "block":
        raise FailedPrecondition(
            f"volume {vol} at {target}: block access is not supported; Datahoard volumes are filesystems"
        )
    mode = cap.access_mode.mode
    if not cap.HasField("access_mode") or mode == Mode.UNKNOWN:
        raise InvalidArgument(f"volume {vol} at {target}: volume_capability.access_mode is required")
    if mode not in Mode.values():
        raise InvalidArgument(f"volume {vol} at {target}: unknown access mode {mode}")
    if mode not in READ_ONLY_MODES:
        raise FailedPrecondition(
            f"volume {vol} at {target}: access mode {Mode.Name(mode)} asks for write access, but "
            "Datahoard volumes are read-only dataset caches; use accessModes [ReadOnlyMany] on the PV/PVC"
        )
    return mode


def mount_flags(cap: csi_pb2.VolumeCapability, vol: str, target: str) -> tuple[str, ...]:
    flags = tuple(cap.mount.mount_flags)
    for index, flag in enumerate(flags):
        if flag not in MOUNT_FLAG_BITS:
            # The value is not echoed: mount flags may contain secrets.
            raise InvalidArgument(
                f"volume {vol} at {target}: mount option #{index + 1} is not supported "
                f"(allowed: {', '.join(sorted(MOUNT_FLAG_BITS))})"
            )
    return tuple(sorted(set(flags)))


def publish_params(req: csi_pb2.NodePublishVolumeRequest, host_root: Path) -> PublishParams:
    vol = volume_id(req.volume_id)
    target = path(req.target_path, "target_path", vol)
    if not req.HasField("volume_capability"):
        raise InvalidArgument(f"volume {vol} at {target}: volume_capability is required")
    mode = access_mode(req.volume_capability, vol, target)
    flags = mount_flags(req.volume_capability, vol, target)
    view = resolve_view(vol, req.volume_context, host_root)
    return PublishParams(vol, target, view, mode, req.readonly, flags)
