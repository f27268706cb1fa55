"""Self-registration with the kubelet (``pluginregistration.v1``), called the way the kubelet's
plugin watcher calls it: a gRPC client on the ``<driver>-reg.sock`` unix socket, using the wire
method names the kubelet uses (not our stubs), then NodeGetInfo on the endpoint it was given.

In-process for the service itself, as a ``datahoard csi-node`` process for start-up, rejection
(exit 1), shutdown (sockets removed) and a killed plugin's restart (stale sockets replaced). Then
the same against the kubelet's own plugin watcher and reconciler (k8s.io/kubernetes
pkg/kubelet/pluginmanager, built from its Go module by kubeletwatcher/build.sh).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2, csi_pb2_grpc, genproto
from datahoard.csi_node import pluginregistration_pb2 as pb
from datahoard.csi_node.node import NodeConfig
from datahoard.csi_node.registration import KubeletRegistration, socket_name
from datahoard.csi_node.server import NodePlugin
from tests.support.csi import HERE
from tests.support.polling import eventually

DRIVER = names.CSI_DRIVER_NAME
#: The method names the kubelet's Go client sends (k8s.io/kubelet api_grpc.pb.go).
GET_INFO = "/pluginregistration.Registration/GetInfo"
NOTIFY = "/pluginregistration.Registration/NotifyRegistrationStatus"


class FakeKubeletCaller:
    """What the kubelet's plugin watcher does with a registration socket, over a real channel."""

    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._get_info = self.channel.unary_unary(
            GET_INFO, request_serializer=pb.InfoRequest.SerializeToString,
            response_deserializer=pb.PluginInfo.FromString)
        self._notify = self.channel.unary_unary(
            NOTIFY, request_serializer=pb.RegistrationStatus.SerializeToString,
            response_deserializer=pb.RegistrationStatusResponse.FromString)

    def get_info(self) -> pb.PluginInfo:
        return self._get_info(pb.InfoRequest(), timeout=30, wait_for_ready=True)

    def notify(self, registered: bool, error: str = "") -> pb.RegistrationStatusResponse:
        return self._notify(pb.RegistrationStatus(plugin_registered=registered, error=error), timeout=30)

    def close(self) -> None:
        self.channel.close()


def leave_stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a SIGKILLed plugin leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    assert path.is_socket()


# -- the proto and its stubs -------------------------------------------------------------------

def test_registration_stubs_are_generated_and_checked_like_the_csi_ones():
    assert {"pluginregistration_pb2.py", "pluginregistration_pb2_grpc.py", "pluginregistration_pb2.pyi"} <= set(
        genproto.OUTPUTS)
    assert genproto.stale_outputs() == []


def test_proto_is_the_kubelets():
    assert pb.DESCRIPTOR.package == "pluginregistration"
    service = pb.DESCRIPTOR.services_by_name["Registration"]
    assert service.full_name == "pluginregistration.Registration"
    assert sorted(m.name for m in service.methods) == ["GetInfo", "NotifyRegistrationStatus"]
    assert {f.name: f.number for f in pb.PluginInfo.DESCRIPTOR.fields} == {
        "type": 1, "name": 2, "endpoint": 3, "supported_versions": 4}
    assert {f.name: f.number for f in pb.RegistrationStatus.DESCRIPTOR.fields} == {
        "plugin_registered": 1, "error": 2}
    text = (Path(genproto.PACKAGE_DIR) / "pluginregistration.proto").read_text()
    assert "Licensed under the Apache License, Version 2.0" in text


# -- the service, in process ---------------------------------------------------------------------

@pytest.fixture
def reg_dir() -> Iterator[Path]:
    """Short, like the /registration the chart mounts: sun_path holds only 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="reg-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture
def registration(reg_dir: Path) -> Iterator[tuple[KubeletRegistration, list[str]]]:
    rejections: list[str] = []
    reg = KubeletRegistration(DRIVER, reg_dir, f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock",
                              on_rejected=rejections.append)
    reg.start()
    try:
        yield reg, rejections
    finally:
        reg.stop()


def test_get_info_answers_what_the_registrar_would(registration, reg_dir: Path):
    reg, _ = registration
    assert reg.socket == reg_dir / f"{DRIVER}-reg.sock" and reg.socket.is_socket()
    kubelet = FakeKubeletCaller(reg.socket)
    try:
        info = kubelet.get_info()
    finally:
        kubelet.close()
    assert info.type == "CSIPlugin"
    assert info.name == DRIVER
    assert info.endpoint == f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock"
    assert list(info.supported_versions) == ["1.0.0"]


def test_registration_status_is_logged(registration, caplog):
    reg, rejections = registration
    kubelet = FakeKubeletCaller(reg.socket)
    try:
        with caplog.at_level(logging.INFO, logger="datahoard.csi_node.registration"):
            kubelet.get_info()
            kubelet.notify(True)
        assert reg.registered.is_set() and reg.rejection is None and rejections == []
        assert any(r.levelno == logging.INFO and "registered with the kubelet" in r.getMessage()
                   for r in caplog.records)

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="datahoard.csi_node.registration"):
            kubelet.notify(False, "error updating CSINode: field is immutable")
    finally:
        kubelet.close()
    assert rejections == ["error updating CSINode: field is immutable"]
    assert reg.rejection == "error updating CSINode: field is immutable" and not reg.registered.is_set()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "rejected" in errors[0] and "field is immutable" in errors[0]


def test_stop_removes_the_socket(reg_dir: Path):
    reg = KubeletRegistration(DRIVER, reg_dir, "/csi/csi.sock")
    path = reg.start()
    assert path.is_socket()
    reg.stop()
    assert not path.exists()
    reg.stop()  # idempotent


def test_stop_leaves_a_newer_plugins_socket_alone(reg_dir: Path):
    old = KubeletRegistration(DRIVER, reg_dir, "/csi/csi.sock")
    old.start()
    new = KubeletRegistration(DRIVER, reg_dir, "/csi/csi.sock")
    new.start()  # replaces the old one's socket, as a restarted plugin would
    try:
        old.stop()
        assert new.socket.is_socket()
        kubelet = FakeKubeletCaller(new.socket)
        try:
            assert kubelet.get_info().name == DRIVER
        finally:
            kubelet.close()
    finally:
        new.stop()
    assert not new.socket.exists()


def test_a_stale_socket_is_replaced(reg_dir: Path):
    path = reg_dir / socket_name(DRIVER)
    leave_stale_socket(path)
    reg = KubeletRegistration(DRIVER, reg_dir, "/csi/csi.sock")
    reg.start()
    try:
        kubelet = FakeKubeletCaller(path)
        try:
            assert kubelet.get_info().endpoint == "/csi/csi.sock"
        finally:
            kubelet.close()
    finally:
        reg.stop()


def test_refuses_to_delete_what_is_not_a_socket(reg_dir: Path):
    path = reg_dir / socket_name(DRIVER)
    path.write_text("not mine")
    with pytest.raises(OSError, match="not a socket"):
        KubeletRegistration(DRIVER, reg_dir, "/csi/csi.sock").start()
    assert path.read_text() == "not mine"


def test_bad_configuration_is_one_clear_error(tmp_path: Path):
    with pytest.raises(OSError, match="does not exist"):
        KubeletRegistration(DRIVER, tmp_path / "missing", "/csi/csi.sock").start()
    with pytest.raises(ValueError, match="absolute"):
        KubeletRegistration(DRIVER, tmp_path, "csi.sock")
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(OSError, match="too deep for a unix socket"):
        KubeletRegistration(DRIVER, deep, "/csi/csi.sock").start()


def test_probe_fails_when_the_registration_socket_is_gone(tmp_path: Path, reg_dir: Path):
    """The livenessprobe sidecar then restarts the plugin, which registers again."""
    config = NodeConfig(node_id="node-a", host_root=tmp_path, state_file=tmp_path / "state.json")
    reg = KubeletRegistration(DRIVER, reg_dir, str(tmp_path / "csi.sock"))
    plugin = NodePlugin(config, registration=reg)
    plugin.start(f"unix://{tmp_path}/csi.sock")
    try:
        assert not [p for p in plugin.health() if "registration" in p]
        reg.socket.unlink()
        with grpc.insecure_channel(f"unix://{tmp_path}/csi.sock") as channel:
            with pytest.raises(grpc.RpcError) as err:
                csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "registration socket" in err.value.details()
    finally:
        plugin.stop(grace=1)
    assert not (tmp_path / "csi.sock").exists()


# -- `datahoard csi-node` with self-registration ---------------------------------------------------

class PluginProcess:
    """The node plugin as its own process; its log is collected as it comes, so a test can wait
    for a line (the kubelet's NotifyRegistrationStatus arrives after the watcher's RegisterPlugin
    returns, so "register" seen by the watcher does not yet mean "registered" logged)."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        (tmp_path / "root").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datahoard.cli", "csi-node", "--host-root", str(tmp_path / "root"),
             "--node-id", "gpu-node-7", *args],
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, path: Path) -> None:
        eventually(lambda: path.is_socket() or self.proc.poll() is not None, timeout=60, what=str(path))
        if self.proc.poll() is not None:
            self._reader.join(30)
            raise AssertionError(f"plugin exited {self.proc.returncode}:\n{self.output}")

    def wait_for_line(self, text: str, timeout: float = 60) -> None:
        eventually(lambda: text in self.output or self.proc.poll() is not None, timeout=timeout,
                   what=f"{text!r} in the plugin's log")
        if text not in self.output:
            self._reader.join(30)
            raise AssertionError(f"plugin exited {self.proc.returncode} before {text!r}:\n{self.output}")

    def finish(self, timeout: float = 60) -> str:
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._reader.join(30)


@pytest.fixture
def processes() -> Iterator[list[PluginProcess]]:
    started: list[PluginProcess] = []
    yield started
    for p in started:
        p.kill()


def node_id_at(endpoint: Path) -> str:
    """The kubelet's next call after GetInfo: NodeGetInfo on the endpoint it was given."""
    with grpc.insecure_channel(f"unix://{endpoint}") as channel:
        return csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30).node_id


def test_plugin_registers_itself_and_deregisters_on_sigterm(tmp_path: Path, reg_dir: Path, processes):
    csi_sock = tmp_path / "csi" / "csi.sock"
    plugin = PluginProcess(tmp_path, "--endpoint", f"unix://{csi_sock}", "--registration-dir", str(reg_dir))
    processes.append(plugin)
    reg_sock = reg_dir / f"{DRIVER}-reg.sock"
    plugin.wait_for(reg_sock)
    kubelet = FakeKubeletCaller(reg_sock)
    try:
        info = kubelet.get_info()
        # Same path in the container and on the host here, so the default is the endpoint's path.
        assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
            "CSIPlugin", DRIVER, str(csi_sock), ["1.0.0"])
        assert node_id_at(Path(info.endpoint)) == "gpu-node-7"
        kubelet.notify(True)
    finally:
        kubelet.close()
    plugin.proc.send_signal(signal.SIGTERM)
    output = plugin.finish()
    assert plugin.proc.returncode == 0, output
    assert "registered with the kubelet" in output
    assert not reg_sock.exists() and not csi_sock.exists()


def test_plugin_exits_1_when_the_kubelet_rejects_it(tmp_path: Path, reg_dir: Path, processes):
    csi_sock = tmp_path / "csi.sock"
    plugin = PluginProcess(tmp_path, "--endpoint", f"unix://{csi_sock}",
                           "--kubelet-registration-path", f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock",
                           env={"DATAHOARD_REGISTRATION_DIR": str(reg_dir)})
    processes.append(plugin)
    reg_sock = reg_dir / f"{DRIVER}-reg.sock"
    plugin.wait_for(reg_sock)
    kubelet = FakeKubeletCaller(reg_sock)
    try:
        assert kubelet.get_info().endpoint == f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock"
        kubelet.notify(False, "RegisterPlugin error -- no handler registered for plugin type")
    finally:
        kubelet.close()
    output = plugin.finish()
    assert plugin.proc.returncode == 1, output
    assert "rejected" in output and "no handler registered for plugin type" in output
    assert not reg_sock.exists() and not csi_sock.exists()


def test_a_killed_plugin_restarts_over_its_stale_sockets(tmp_path: Path, reg_dir: Path, processes):
    csi_sock = tmp_path / "csi.sock"
    args = ("--endpoint", f"unix://{csi_sock}", "--registration-dir", str(reg_dir))
    reg_sock = reg_dir / f"{DRIVER}-reg.sock"
    first = PluginProcess(tmp_path, *args)
    processes.append(first)
    first.wait_for(reg_sock)
    first.kill()  # SIGKILL: nothing cleans up
    assert reg_sock.is_socket() and csi_sock.is_socket()

    second = PluginProcess(tmp_path, *args)
    processes.append(second)
    second.wait_for(csi_sock)
    kubelet = FakeKubeletCaller(reg_sock)
    try:
        info = kubelet.get_info()  # wait_for_ready: until the new process listens
        assert info.name == DRIVER and node_id_at(Path(info.endpoint)) == "gpu-node-7"
        kubelet.notify(True)
    finally:
        kubelet.close()
    second.proc.send_signal(signal.SIGTERM)
    output = second.finish()
    assert second.proc.returncode == 0 and "removed stale registration socket" in output, output


def test_without_a_registration_dir_nothing_is_offered_to_the_kubelet(tmp_path: Path, reg_dir: Path, processes):
    csi_sock = tmp_path / "csi.sock"
    plugin = PluginProcess(tmp_path, "--endpoint", f"unix://{csi_sock}")
    processes.append(plugin)
    plugin.wait_for(csi_sock)
    assert node_id_at(csi_sock) == "gpu-node-7"
    assert list(reg_dir.iterdir()) == []
    plugin.proc.send_signal(signal.SIGTERM)
    plugin.finish()
    assert plugin.proc.returncode == 0


def test_a_registration_dir_that_is_not_mounted_fails_start_up(tmp_path: Path, processes):
    plugin = PluginProcess(tmp_path, "--endpoint", f"unix://{tmp_path}/csi.sock",
                           "--registration-dir", str(tmp_path / "no-such-dir"))
    processes.append(plugin)
    output = plugin.finish()
    assert plugin.proc.returncode == 1
    assert "cannot start" in output and "plugins_registry" in output
    assert not (tmp_path / "csi.sock").exists()


# -- the kubelet's own plugin watcher ----------------------------------------------------------------

KUBELET_WATCHER = HERE / "kubeletwatcher"


@pytest.fixture(scope="session")
def kubelet_watcher_binary() -> str:
    """kubeletwatcher/main.go (the kubelet's pluginmanager watcher + reconciler), built once."""
    if shutil.which("go") is None:
        pytest.skip("needs a Go toolchain to build the kubelet's plugin watcher (kubeletwatcher/build.sh)")
    tools = os.environ.get("TOOLS_DIR", str(Path.home() / ".cache" / "datahoard-tools"))
    out = subprocess.run([str(KUBELET_WATCHER / "build.sh"), tools], check=True, stdout=subprocess.PIPE,
                         text=True, timeout=1500).stdout
    return out.strip().splitlines()[-1]


class KubeletWatcher:
    """The kubeletwatcher process; its JSON lines (one per registration event) in a queue."""

    def __init__(self, binary: str, directory: Path, *args: str) -> None:
        self.proc = subprocess.Popen([binary, "-dir", str(directory), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next("ready")["dir"] == str(directory)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next(self, event: str, timeout: float = 60) -> dict:
        """The next event of that kind (others before it are dropped); fails after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"kubelet watcher: no {event!r} event within {timeout} s")
            try:
                got = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if got["event"] == event:
                return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture
def kubelet_watcher(kubelet_watcher_binary: str) -> Iterator[Callable[..., KubeletWatcher]]:
    started: list[KubeletWatcher] = []

    def start(directory: Path, *args: str) -> KubeletWatcher:
        started.append(KubeletWatcher(kubelet_watcher_binary, directory, *args))
        return started[-1]

    yield start
    for w in started:
        w.stop()


@pytest.mark.integration
@pytest.mark.tools   # the kubelet's plugin watcher, built from Go
def test_the_kubelets_plugin_watcher_registers_and_deregisters_the_plugin(tmp_path, reg_dir, processes,
                                                                           kubelet_watcher):
    watcher = kubelet_watcher(reg_dir)
    csi_sock = tmp_path / "csi.sock"
    plugin = PluginProcess(tmp_path, "--endpoint", f"unix://{csi_sock}", "--registration-dir", str(reg_dir))
    processes.append(plugin)
    validated = watcher.next("validate")
    assert (validated["name"], validated["endpoint"], validated["versions"], validated["error"]) == (
        DRIVER, str(csi_sock), ["1.0.0"], "")
    registered = watcher.next("register")
    assert (registered["name"], registered["node_id"], registered["error"]) == (DRIVER, "gpu-node-7", "")
    plugin.wait_for_line("registered with the kubelet")
    plugin.proc.send_signal(signal.SIGTERM)
    assert watcher.next("deregister")["name"] == DRIVER
    output = plugin.finish()
    assert plugin.proc.returncode == 0 and "registered with the kubelet" in output, output


@pytest.mark.integration
@pytest.mark.tools   # the kubelet's plugin watcher, built from Go
def test_a_rejection_by_the_kubelets_plugin_watcher_stops_the_plugin(tmp_path, reg_dir, processes, kubelet_watcher):
    kubelet_watcher(reg_dir, "-reject", "CSINode update failed: field is immutable")
    plugin = PluginProcess(tmp_path, "--endpoint", f"unix://{tmp_path}/csi.sock", "--registration-dir", str(reg_dir))
    processes.append(plugin)
    output = plugin.finish(timeout=120)
    assert plugin.proc.returncode == 1, output
    # The kubelet's own wording (operation_generator.go), passed through the plugin's log.
    assert "plugin registration failed with err: CSINode update failed: field is immutable" in output
    assert list(reg_dir.iterdir()) == []


@pytest.mark.integration
@pytest.mark.tools   # the kubelet's plugin watcher, built from Go
def test_the_kubelets_plugin_watcher_re_registers_a_killed_and_restarted_plugin(tmp_path, reg_dir, processes,
                                                                                kubelet_watcher):
    watcher = kubelet_watcher(reg_dir)
    args = ("--endpoint", f"unix://{tmp_path}/csi.sock", "--registration-dir", str(reg_dir))
    first = PluginProcess(tmp_path, *args)
    processes.append(first)
    assert watcher.next("register")["error"] == ""
    first.kill()  # the stale socket stays; the kubelet keeps the driver registered
    second = PluginProcess(tmp_path, *args)
    processes.append(second)
    # The stale socket is removed (the kubelet deregisters) and a live one appears (it registers).
    assert watcher.next("deregister")["name"] == DRIVER
    again = watcher.next("register")
    assert (again["name"], again["node_id"], again["error"]) == (DRIVER, "gpu-node-7", "")
    second.proc.send_signal(signal.SIGTERM)
    assert watcher.next("deregister")["name"] == DRIVER
    assert second.finish() and second.proc.returncode == 0
