"""Entry point of the node plugin: ``datahoard csi-node`` calls :func:`main`.

:class:`NodePlugin` wires the parts together (state, mounter, locks, repairer, the two services,
the logging interceptor) and owns the gRPC server; tests start it in-process on a temporary
socket, and :func:`main` adds the command line and SIGTERM handling. With
``--registration-dir`` the plugin also registers itself with the kubelet
(:mod:`.registration`), in place of the node-driver-registrar sidecar.

The plugin also hosts the node's FUSE keeper (``datahoard/fuse_keeper.py``, on
``<host root>/run/keeper/keeper.sock``, the run dir workers already share): it is the
long-lived process on the node, so it holds workers' ``/dev/fuse`` descriptors across their
restarts. ``--no-fuse-keeper`` (or ``DATAHOARD_FUSE_KEEPER=0``) turns that off.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc

from datahoard import names, runtime
from datahoard.fuse_keeper import FuseKeeper
from datahoard.keeper_protocol import KeeperError

from . import csi_pb2_grpc
from .healthz import HealthServer
from .identity import IdentityService
from .logging_interceptor import LoggingInterceptor
from .mounter import LinuxMounter, Mounter
from .node import NodeConfig, NodeService
from .recovery import Repairer, RepairLoop
from .registration import KubeletRegistration
from .state import StateStore
from .volume_lock import TargetLocks

log = logging.getLogger(__name__)

#: Threads serving RPCs. A publish can block for ``publish_timeout`` waiting for a view, so
#: leave room for several of those plus kubelet's stats calls and the sidecars' probes.
MAX_WORKERS = 16
#: Seconds in-flight RPCs get to finish after SIGTERM (kubelet's grace period is 30 s).
STOP_GRACE = 10.0
#: CAP_SYS_ADMIN, needed for mount(2); bit 21 of CapEff in /proc/self/status.
_CAP_SYS_ADMIN = 21


def default_state_file(host_root: Path) -> Path:
    """Under the host root (a hostPath), not next to the socket: the spec forbids other files there."""
    return host_root / "csi-node" / "state.json"


def socket_path(endpoint: str) -> str:
    """``unix:///csi/csi.sock``, ``unix:/csi/csi.sock`` or a bare path -> the socket's path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif "://" in endpoint:
        raise ValueError(f"CSI endpoint {endpoint!r}: only unix sockets are supported")
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ValueError(f"CSI endpoint {endpoint!r}: the socket path must be absolute")
    return path


def _has_cap_sys_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


class NodePlugin:
    def __init__(self, config: NodeConfig, mounter: Mounter | None = None,
                 registration: KubeletRegistration | None = None, keeper: FuseKeeper | None = None) -> None:
        self.config = config
        #: The node's FUSE keeper, started with the plugin, or None when turned off.
        self.keeper = keeper
        #: Self-registration with the kubelet, or None when node-driver-registrar does it.
        self.registration = registration
        self.mounter = mounter or LinuxMounter()
        self.state = StateStore(config.state_file)
        self.locks = TargetLocks()
        self.repairer = Repairer(self.state, self.mounter, self.locks, config.probe_timeout, config.repair_namespaces)
        self.repair_loop = RepairLoop(self.repairer, config.repair_interval)
        self.node = NodeService(config, self.state, self.mounter, self.locks, self.repairer)
        self.identity = IdentityService(self.health)
        self.server: grpc.Server | None = None
        self.socket: str | None = None

    def health(self) -> list[str]:
        """Reasons the plugin cannot do its job; the Probe RPC turns any into FAILED_PRECONDITION."""
        problems = []
        root = self.config.host_root
        if not root.is_dir():
            problems.append(f"host root {root} is not a directory (is the hostPath mounted?)")
        if not _has_cap_sys_admin():
            problems.append("missing CAP_SYS_ADMIN: cannot mount (run the container privileged)")
        state_dir = self.config.state_file.parent
        if state_dir.exists() and not os.access(state_dir, os.W_OK):
            problems.append(f"state directory {state_dir} is not writable")
        if self.server is not None and not self.repair_loop.alive():
            problems.append("the repair loop has stopped")
        if self.registration is not None:
            problems.extend(self.registration.problems())
        if self.server is not None and self.keeper is not None and (problem := self.keeper.problem()):
            problems.append(problem)
        return problems

    def start(self, endpoint: str) -> str:
        """Bind the socket and serve, then (if configured) offer the kubelet the registration
        socket, which must come second: the kubelet calls NodeGetInfo as soon as it registers
        the plugin. Returns the CSI socket path."""
        path = socket_path(endpoint)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # stale socket from a previous run
        except FileNotFoundError:
            pass
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="csi-rpc"),
            interceptors=[LoggingInterceptor()],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, server)
        csi_pb2_grpc.add_NodeServicer_to_server(self.node, server)
        if server.add_insecure_port(f"unix://{path}") != 1:
            raise OSError(f"cannot listen on {path}")
        server.start()
        self.server, self.socket = server, path
        log.info(
            "%s node plugin serving on %s (node %s, host root %s, %d published target(s))",
            names.CSI_DRIVER_NAME, path, self.config.node_id, self.config.host_root, len(self.state.all()),
        )
        if self.keeper is not None:
            try:
                self.keeper.start()
            except (OSError, KeeperError) as exc:
                self.stop(grace=0)
                raise OSError(f"FUSE keeper: {exc}") from exc
        if self.registration is not None:
            try:
                self.registration.start()
            except (OSError, ValueError):
                self.stop(grace=0)
                raise
        self.repair_loop.start()
        return path

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Deregister from the kubelet (if self-registered), stop accepting calls, let in-flight
        ones finish, stop repairs. Mounts stay as they are."""
        if self.registration is not None:
            self.registration.stop()
        if self.server is not None:
            self.server.stop(grace).wait()
        self.repair_loop.stop()
        if self.keeper is not None:
            # Live workers keep their connections on their own descriptors; a worker that is
            # down right now loses its mount, as it would with no keeper.
            self.keeper.stop()
        if self.socket:
            try:
                os.unlink(self.socket)
            except FileNotFoundError:
                pass
        log.info("node plugin stopped")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="datahoard csi-node",
        description=f"CSI node plugin ({names.CSI_DRIVER_NAME}): bind Dataset FUSE views into pods, read-only.",
    )
    parser.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
                        help="unix socket to serve on (default: $CSI_ENDPOINT or unix:///csi/csi.sock)")
    parser.add_argument("--node-id", default=os.environ.get("NODE_NAME", ""),
                        help="node id reported to kubelet (default: $NODE_NAME)")
    parser.add_argument("--host-root", type=Path, default=names.host_root(),
                        help="where FUSE views live, <root>/mnt/<ns>/<name> (default: $DATAHOARD_HOST_ROOT "
                             f"or {names.DEFAULT_HOST_ROOT})")
    parser.add_argument("--state-file", type=Path, default=None,
                        help="published-target state (default: <host-root>/csi-node/state.json)")
    parser.add_argument("--publish-timeout", type=float, default=NodeConfig.publish_timeout,
                        help="seconds NodePublishVolume waits for a view to be live")
    parser.add_argument("--repair-interval", type=float, default=NodeConfig.repair_interval,
                        help="seconds between repair passes when no mount change wakes the loop")
    parser.add_argument("--no-namespace-repair", dest="repair_namespaces", action="store_false",
                        help="after a worker restart, repair only the published targets, not dead copies in "
                             "pods without mount propagation or in subPath mounts")
    parser.add_argument("--registration-dir", type=Path,
                        default=os.environ.get("DATAHOARD_REGISTRATION_DIR") or None,
                        help="register with the kubelet by serving its plugin-registration service on "
                             f"DIR/{names.CSI_DRIVER_NAME}-reg.sock; DIR is the kubelet's plugins_registry "
                             "directory as mounted in this container (default: $DATAHOARD_REGISTRATION_DIR; "
                             "unset: no self-registration, node-driver-registrar does it)")
    parser.add_argument("--kubelet-registration-path",
                        default=os.environ.get("DATAHOARD_KUBELET_REGISTRATION_PATH") or None,
                        help="the CSI socket's path as the kubelet sees it on the host, e.g. "
                             f"/var/lib/kubelet/plugins/{names.CSI_DRIVER_NAME}/csi.sock (default: "
                             "$DATAHOARD_KUBELET_REGISTRATION_PATH, else the --endpoint path)")
    parser.add_argument("--health-port", type=int, default=os.environ.get("DATAHOARD_HEALTH_PORT") or None,
                        help="serve GET /healthz on this port with the Probe RPC's checks, in place of the "
                             "livenessprobe sidecar (default: $DATAHOARD_HEALTH_PORT; unset: not served)")
    parser.add_argument("--no-fuse-keeper", dest="fuse_keeper", action="store_false",
                        default=os.environ.get("DATAHOARD_FUSE_KEEPER", "1") not in ("0", "false", "no"),
                        help="do not hold workers' FUSE connections across their restarts (default: held, "
                             "on <host-root>/run/keeper/keeper.sock; DATAHOARD_FUSE_KEEPER=0 also turns it off)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.node_id:
        log.error("no node id: set NODE_NAME (downward API spec.nodeName) or pass --node-id")
        return 2
    # Workers record their mounts under the host root (datahoard.names.run_dir); read them there.
    os.environ.setdefault("DATAHOARD_RUN_DIR", str(names.run_dir(args.host_root)))
    config = NodeConfig(
        node_id=args.node_id,
        host_root=args.host_root,
        state_file=args.state_file or default_state_file(args.host_root),
        publish_timeout=args.publish_timeout,
        repair_interval=args.repair_interval,
        repair_namespaces=args.repair_namespaces,
    )
    stopping = threading.Event()
    # Before anything starts: a SIGTERM during start-up then stops the plugin cleanly once it is
    # up (it used to kill it outright, e.g. right after the socket appeared).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.set())
    registration = None
    try:
        if args.registration_dir is not None:
            registration = KubeletRegistration(
                names.CSI_DRIVER_NAME, args.registration_dir,
                args.kubelet_registration_path or socket_path(args.endpoint),
                on_rejected=lambda _reason: stopping.set())
        # Where workers look for it: runtime.keeper_socket(), under the run dir set above.
        keeper = FuseKeeper(runtime.keeper_socket()) if args.fuse_keeper else None
        plugin = NodePlugin(config, registration=registration, keeper=keeper)
        plugin.start(args.endpoint)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    healthz = None
    if args.health_port is not None:
        healthz = HealthServer(plugin.health, args.health_port)
        try:
            healthz.start()
        except OSError as exc:
            log.error("cannot start: /healthz on port %d: %s", args.health_port, exc)
            plugin.stop()
            return 1
    while not stopping.wait(3600):
        pass
    if healthz is not None:
        healthz.stop()
    if registration is not None and registration.rejection is not None:
        # As node-driver-registrar does: exit non-zero so the container restarts and the
        # kubelet gets a fresh socket to register; the reason is in the line logged above.
        log.error("exiting: the kubelet rejected the registration (%s); published volumes stay mounted",
                  registration.rejection)
        plugin.stop()
        return 1
    log.info("signal received, stopping (published volumes stay mounted)")
    plugin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
