"""Helpers for the CSI node plugin tests: a scratch node, FUSE views, a CSI client, the
plugin in-process, and a simulated container (its own mount namespace) that reads the volume.

Imported by tests/csi_node/conftest.py and the tests there.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from datahoard import names
from datahoard.csi_node import csi_pb2, csi_pb2_grpc
from datahoard.csi_node.mounter import LinuxMounter
from datahoard.csi_node.node import NodeConfig
from datahoard.csi_node.server import NodePlugin
from datahoard.mounts import MNT_DETACH, canonical
from tests.support.polling import eventually

#: tests/csi_node: the tier these helpers serve, and tinyfuse.py, run as a script.
HERE = Path(__file__).resolve().parents[1] / "csi_node"
TINYFUSE = HERE / "tinyfuse.py"
Mode = csi_pb2.VolumeCapability.AccessMode

_libc = ctypes.CDLL(None, use_errno=True)


def mountpoints_under(root: str) -> list[str]:
    root = canonical(root)
    return [m.mountpoint for m in LinuxMounter().mounts() if m.mountpoint == root or m.mountpoint.startswith(root + "/")]


def detach_under(root: str, include_root: bool = False) -> None:
    """Lazy-unmount every mount below *root*, deepest (and most recent) first."""
    for _ in range(100):
        points = [p for p in mountpoints_under(root) if include_root or p != canonical(root)]
        if not points:
            return
        for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
            _libc.umount2(point.encode(), MNT_DETACH)


@dataclass
class Node:
    """A scratch 'node': host root for views, a kubelet pods dir, a socket dir, source data."""

    root: Path
    host_root: Path
    pods: Path
    csi_dir: Path
    data: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def view_path(self, ns: str = "ml", name: str = "imagenet") -> Path:
        return names.mount_dir(ns, name, self.host_root)

    def target(self, pod: str = "pod-a", pv: str = "datahoard-ml-imagenet") -> str:
        parent = self.pods / pod / "volumes" / "kubernetes.io~csi" / pv
        parent.mkdir(parents=True, exist_ok=True)  # kubelet creates the parent, the plugin the target
        return str(parent / "mount")


@dataclass
class TinyView:
    """A tiny FUSE view (tests/csi_node/tinyfuse.py) serving *source* at *path*."""

    node: Node
    source: Path
    path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> TinyView:
        self.path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3")
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", str(TINYFUSE), str(self.source), str(self.path)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.node.procs.append(self.proc)
        mounter = LinuxMounter()
        eventually(lambda: any(m.fstype.startswith("fuse") for m in mounter.mounts_at(str(self.path)))
                   or self.proc.poll() is not None, what=f"FUSE view at {self.path}")
        assert self.proc.poll() is None, "tinyfuse exited"
        return self

    def kill(self) -> None:
        """Like a crashed worker: SIGKILL, the kernel aborts the FUSE connection (ENOTCONN)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """A stuck worker: SIGSTOP, requests wait in the kernel without an answer."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """What a restarted worker does: detach its dead mount, mount a fresh view."""
        _libc.umount2(str(self.path).encode(), MNT_DETACH)
        self.start()


class Client:
    """A CSI client over the plugin's unix socket, with request builders for the tests."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    @staticmethod
    def publish_request(volume_id="ml/imagenet", target_path="", mode=Mode.MULTI_NODE_READER_ONLY, readonly=False,
                        context=None, secrets=None, flags=(), block=False) -> csi_pb2.NodePublishVolumeRequest:
        cap = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.mount_flags.extend(flags)
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target_path, volume_capability=cap, readonly=readonly,
            volume_context=context or {}, secrets=secrets or {},
        )

    def publish(self, target_path: str, **kwargs) -> csi_pb2.NodePublishVolumeResponse:
        return self.node.NodePublishVolume(self.publish_request(target_path=target_path, **kwargs), timeout=60)

    def unpublish(self, target_path: str, volume_id: str = "ml/imagenet") -> csi_pb2.NodeUnpublishVolumeResponse:
        return self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path), timeout=60)

    def stats(self, volume_path: str, volume_id: str = "ml/imagenet") -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=volume_path), timeout=60)

    def close(self) -> None:
        self.channel.close()


class RunningPlugin:
    """The plugin in this process (so caplog sees its logs), restartable on the same state file."""

    def __init__(self, node: Node, keeper: bool = False, **config) -> None:
        self.node = node
        #: Host the node's FUSE keeper, as ``datahoard csi-node`` does by default.
        #: Under a short directory: the node's run dir here is deeper than a socket path may be.
        self.keeper_socket = Path(tempfile.mkdtemp(prefix="dhk-")) / "keeper.sock" if keeper else None
        self.config = NodeConfig(node_id="node-a", host_root=node.host_root,
                                 state_file=node.host_root / "csi-node" / "state.json", **config)
        self.socket = str(node.csi_dir / "csi.sock")
        self.plugin: NodePlugin | None = None
        self.client: Client | None = None

    def start(self) -> RunningPlugin:
        from datahoard.fuse_keeper import FuseKeeper

        keeper = FuseKeeper(self.keeper_socket) if self.keeper_socket else None
        self.plugin = NodePlugin(self.config, keeper=keeper)
        self.plugin.start(f"unix://{self.socket}")
        self.client = Client(self.socket)
        return self

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.plugin:
            self.plugin.stop(grace=1)
        self.plugin = self.client = None

    def restart(self) -> None:
        self.stop()
        self.start()


# An "application" running in a container: a line-oriented command loop, so a test can make it
# open files, keep descriptors across a worker restart, and report exactly what it saw.
_APP = r"""
import json, os, sys
fds = {}
def answer(fn):
    try:
        out = {"ok": True, "value": fn()}
    except OSError as exc:
        out = {"ok": False, "errno": exc.errno, "error": os.strerror(exc.errno or 0)}
    print(json.dumps(out), flush=True)
print(json.dumps({"ok": True, "value": "ready"}), flush=True)
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "read":
        answer(lambda: open(arg, "rb").read().decode("latin-1"))
    elif cmd == "open":
        answer(lambda: fds.setdefault(arg, os.open(arg, os.O_RDONLY)) and arg)
    elif cmd == "pread":
        answer(lambda: os.pread(fds[arg], 1 << 20, 0).decode("latin-1"))
    elif cmd == "listdir":
        answer(lambda: sorted(os.listdir(arg)))
    elif cmd == "mountinfo":
        answer(lambda: open("/proc/self/mountinfo").read().splitlines())
"""


class Container:
    """A process in its own mount namespace with the target bind-mounted, as a runtime does.

    runc bind-mounts the volume's target path into the container and then applies the
    volumeMount's propagation: ``rprivate`` for None (the default), ``rslave`` for
    HostToContainer, ``rshared`` for Bidirectional. This reproduces exactly that, then runs
    the small application above inside.
    """

    def __init__(self, node: Node, target: str, propagation: str, name: str = "ctr") -> None:
        self.dir = node.root / "containers" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.target, self.propagation = target, propagation
        self.proc: subprocess.Popen | None = None
        self.node = node

    def __enter__(self) -> Container:
        setup = (
            f"mount --bind {self.target} {self.dir} && mount --make-{self.propagation} {self.dir} && "
            f"exec {sys.executable} -c '{_APP}'"
        )
        # --propagation slave: nothing done in the container's namespace leaks back to the host.
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", setup],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.node.procs.append(self.proc)
        first = self.proc.stdout.readline()
        assert first, "container failed to start"
        return self

    def _ask(self, command: str) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def path(self, rel: str) -> str:
        return str(self.dir / rel)

    def try_read(self, rel: str) -> dict:
        return self._ask(f"read {self.path(rel)}")

    def read(self, rel: str) -> str:
        reply = self.try_read(rel)
        assert reply["ok"], reply
        return reply["value"]

    def open(self, rel: str) -> dict:
        return self._ask(f"open {self.path(rel)}")

    def pread(self, rel: str) -> dict:
        return self._ask(f"pread {self.path(rel)}")

    def mountinfo(self) -> list[str]:
        reply = self._ask("mountinfo x")
        assert reply["ok"], reply
        return reply["value"]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Worker:
    """The real cache worker (``datahoard mount``) serving a Dataset's view on the test node."""

    def __init__(self, source: str, view: Path, cache_dir: Path, endpoint: str) -> None:
        self.source, self.view, self.cache_dir, self.endpoint = source, view, cache_dir, endpoint
        self.pids: list[int] = []

    def start(self) -> Worker:
        """``datahoard mount`` returns once the view is live (it also clears a dead mount first)."""
        from datahoard import runtime

        self.view.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "datahoard.cli", "mount", self.source, str(self.view),
             "--cache-dir", str(self.cache_dir), "--endpoint-url", self.endpoint,
             # Stands for a Kubernetes worker: restarts are the test's (kubelet's), not a supervisor's.
             "--max-restarts", "0"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        record = runtime.lookup(self.view)
        assert record is not None, f"no mount record for {self.view}"
        self.pids.append(record.pid)
        return self

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def kill(self) -> None:
        """A crash: SIGKILL, so the kernel aborts the FUSE connection."""
        os.kill(self.pid, signal.SIGKILL)
        eventually(lambda: not _alive(self.pid), what=f"worker {self.pid} to die")

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class PodWorker:
    """The cache worker as its pod runs it (``datahoard mount --foreground``, the node's run dir,
    so the CSI plugin's FUSE keeper), started again after it dies, as the kubelet would."""

    def __init__(self, node: Node, source: str, view: Path, cache_dir: Path, endpoint: str,
                 log_dir: Path | None = None, keeper_socket: Path | None = None) -> None:
        self.node, self.source, self.view, self.cache_dir, self.endpoint = node, source, view, cache_dir, endpoint
        self.log_dir = log_dir or cache_dir.parent
        self.extra_args: list[str] = os.environ.get("DH_EXTRA", "").split()
        self.env = {**os.environ, "DATAHOARD_RUN_DIR": str(node.host_root / "run")}
        if keeper_socket is not None:
            self.env["DATAHOARD_KEEPER_SOCKET"] = str(keeper_socket)
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self, timeout: float = 120) -> PodWorker:
        self.view.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "datahoard.cli", "mount", self.source, str(self.view),
                 "--cache-dir", str(self.cache_dir), "--endpoint-url", self.endpoint, "--foreground",
                 *self.extra_args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT)
        eventually(self.ready, timeout=timeout, what=f"the worker to serve {self.view} (log {log})")
        return self

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.logs[-1].read_text()[-3000:]
        return "INFO datahoard.cache_worker.worker: serving" in self.logs[-1].read_text()

    def problems(self) -> str:
        """Warnings and errors the workers logged, for a failure message."""
        return "\n".join(line for log in self.logs for line in log.read_text().splitlines()
                         if " WARNING " in line or " ERROR " in line)[-4000:]

    def kill(self) -> None:
        """A crash: SIGKILL. The keeper holds the connection, so requests wait in the kernel."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        """A planned restart (the pod deleted, a DaemonSet roll): SIGTERM, which hands over."""
        self.proc.terminate()
        assert self.proc.wait(60) == 0, self.logs[-1].read_text()[-3000:]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        subprocess.run(["umount", "-l", str(self.view)], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed daemon that nobody reaped yet is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
