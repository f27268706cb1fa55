"""The CSI Identity service: who the plugin is and whether it is healthy.

node-driver-registrar reads the name from GetPluginInfo; the livenessprobe sidecar calls Probe,
and a FAILED_PRECONDITION there (the spec's code for "not healthy") makes kubelet restart the
plugin container, which is safe: published mounts and the state file survive it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

from google.protobuf import wrappers_pb2

from datahoard import names

from . import csi_pb2, csi_pb2_grpc
from .errors import FailedPrecondition, rpc

#: Returns the reasons the plugin cannot work right now (empty when healthy).
HealthCheck = Callable[[], list[str]]


def plugin_version() -> str:
    try:
        return metadata.version("datahoard")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+unknown"


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, health: HealthCheck) -> None:
        self.health = health

    @rpc
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=names.CSI_DRIVER_NAME, vendor_version=plugin_version())

    @rpc
    def GetPluginCapabilities(self, request, context):
        # Node-only: no CONTROLLER_SERVICE, and no VOLUME_ACCESSIBILITY_CONSTRAINTS because
        # placement comes from the PV's nodeAffinity, not from CSI topology.
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])

    @rpc
    def Probe(self, request, context):
        problems = self.health()
        if problems:
            raise FailedPrecondition(f"{names.CSI_DRIVER_NAME} is not healthy: {'; '.join(problems)}")
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
