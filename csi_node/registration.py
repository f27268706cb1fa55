"""Registering the plugin with the kubelet without node-driver-registrar.

The kubelet's plugin watcher watches ``<kubelet root>/plugins_registry/`` for unix sockets. For
each new one it calls ``Registration.GetInfo`` (package ``pluginregistration``, from
k8s.io/kubelet ``pkg/apis/pluginregistration/v1``), validates the answer, calls the CSI driver's
NodeGetInfo on the endpoint it was given, writes the CSINode entry, and then tells the socket's
owner the outcome through ``NotifyRegistrationStatus``. Deleting the socket deregisters the
driver. That is all node-driver-registrar does; :class:`KubeletRegistration` does the same from
inside the plugin, so the DaemonSet needs no sidecar that cannot be built or pulled here.

Behaviour copied from node-driver-registrar v2.17.0:

- the socket is ``<registration dir>/<driver name>-reg.sock``; a stale socket left by a killed
  plugin is replaced (removing it and binding again is also what makes the kubelet re-register);
- ``GetInfo`` answers type ``CSIPlugin``, the driver name, the CSI socket's path *as the kubelet
  sees it* (on the host, not in the container) and supported versions ``["1.0.0"]``;
- a ``NotifyRegistrationStatus`` saying the kubelet rejected the plugin is fatal: the registrar
  exits 1 so the container restarts and registration is retried from scratch; here the plugin's
  main loop is woken (``on_rejected``) and ``datahoard csi-node`` exits 1 after logging why;
- the socket is removed on shutdown.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from . import pluginregistration_pb2 as pb
from . import pluginregistration_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: The kubelet's plugin type for CSI drivers (k8s.io/kubelet pluginregistration/v1 constants.go).
CSI_PLUGIN = "CSIPlugin"
#: What node-driver-registrar advertises; the kubelet accepts any 1.x.
SUPPORTED_VERSIONS = ("1.0.0",)
#: The kubelet calls GetInfo and NotifyRegistrationStatus one at a time; two threads suffice.
_WORKERS = 2
#: sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def socket_name(driver_name: str) -> str:
    """The registration socket's file name, the one node-driver-registrar uses."""
    return f"{driver_name}-reg.sock"


def remove_stale_socket(path: Path) -> None:
    """Remove a socket left by an earlier run; refuse to delete anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; remove it (the kubelet watches this directory)")
    os.unlink(path)
    log.info("removed stale registration socket %s", path)


class RegistrationService(pb_grpc.RegistrationServicer):
    """The two RPCs the kubelet calls; remembers the last status it reported."""

    def __init__(self, driver_name: str, kubelet_endpoint: str, on_rejected: Callable[[str], None]) -> None:
        self.driver_name = driver_name
        self.kubelet_endpoint = kubelet_endpoint
        self.on_rejected = on_rejected
        self.registered = threading.Event()
        self.rejection: str | None = None

    def GetInfo(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.PluginInfo:
        log.info("kubelet asked for plugin info: %s at %s", self.driver_name, self.kubelet_endpoint)
        return pb.PluginInfo(type=CSI_PLUGIN, name=self.driver_name, endpoint=self.kubelet_endpoint,
                             supported_versions=list(SUPPORTED_VERSIONS))

    def NotifyRegistrationStatus(self, request: pb.RegistrationStatus,
                                 context: grpc.ServicerContext) -> pb.RegistrationStatusResponse:
        if request.plugin_registered:
            log.info("registered with the kubelet as %s (CSI endpoint %s)", self.driver_name, self.kubelet_endpoint)
            self.rejection = None
            self.registered.set()
        else:
            reason = request.error or "(the kubelet gave no reason)"
            log.error("the kubelet rejected the registration of %s: %s", self.driver_name, reason)
            self.rejection = reason
            self.registered.clear()
            self.on_rejected(reason)
        return pb.RegistrationStatusResponse()


class KubeletRegistration:
    """The Registration service on ``<registration_dir>/<driver>-reg.sock``, started and stopped
    with the plugin (start it only once the CSI socket serves: the kubelet calls NodeGetInfo on
    it right after GetInfo)."""

    def __init__(self, driver_name: str, registration_dir: Path, kubelet_endpoint: str,
                 on_rejected: Callable[[str], None] = lambda reason: None) -> None:
        if not kubelet_endpoint.startswith("/"):
            raise ValueError(f"kubelet registration path {kubelet_endpoint!r} must be an absolute path "
                             "(the CSI socket as the kubelet sees it on the host)")
        self.socket = Path(registration_dir) / socket_name(driver_name)
        self.service = RegistrationService(driver_name, kubelet_endpoint, on_rejected)
        self.server: grpc.Server | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound

    @property
    def rejection(self) -> str | None:
        """The kubelet's error if its last word was a rejection, else None."""
        return self.service.rejection

    @property
    def registered(self) -> threading.Event:
        """Set once the kubelet reported a successful registration (cleared by a rejection)."""
        return self.service.registered

    def start(self) -> Path:
        """Bind the registration socket (replacing a stale one) and serve; returns its path."""
        directory = self.socket.parent
        if not directory.is_dir():
            raise OSError(f"registration directory {directory} does not exist "
                          "(mount the kubelet's plugins_registry directory there)")
        remove_stale_socket(self.socket)
        # gRPC unlinks a unix socket *by path* when its server stops. A DaemonSet creates the
        # replacement pod as soon as the old one is marked for deletion, not once it has gone,
        # so an old plugin that stops late would delete its successor's socket and with it the
        # driver's registration. So bind under a dot-name, which the kubelet's watcher ignores,
        # and rename it into place: gRPC then only ever unlinks the dot-name, and stop() removes
        # the real name only if it is still this server's socket.
        bind_path = self.socket.with_name(f".{self.socket.name}.{os.getpid()}")
        if len(os.fsencode(bind_path)) > _MAX_SOCKET_PATH:
            raise OSError(f"registration directory {directory} is too deep for a unix socket "
                          f"({bind_path} is over {_MAX_SOCKET_PATH} bytes); mount it at a shorter path")
        remove_stale_socket(bind_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="kubelet-reg"))
        pb_grpc.add_RegistrationServicer_to_server(self.service, server)
        try:
            bound = server.add_insecure_port(f"unix://{bind_path}")
        except RuntimeError as exc:  # grpcio raises instead of returning 0 on bind failures
            raise OSError(f"cannot listen on {bind_path}: {exc}") from exc
        if bound != 1:
            raise OSError(f"cannot listen on {bind_path}")
        server.start()
        try:
            os.rename(bind_path, self.socket)
        except OSError:
            server.stop(0).wait()
            raise
        st = os.lstat(self.socket)
        self.server, self._bound = server, (st.st_dev, st.st_ino)
        log.info("serving kubelet plugin registration on %s (CSI endpoint for the kubelet: %s)",
                 self.socket, self.service.kubelet_endpoint)
        return self.socket

    def problems(self) -> list[str]:
        """Why the kubelet could not (re-)register the plugin now; the Probe RPC reports these."""
        if self.server is not None and not self.socket.exists():
            return [f"registration socket {self.socket} is gone (the kubelet cannot re-register the plugin)"]
        return []

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving and remove the socket: the kubelet then deregisters the driver, as it does
        when node-driver-registrar stops. A socket that a newer plugin bound in the meantime is
        left alone."""
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        try:
            st = os.lstat(self.socket)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self._bound = None
