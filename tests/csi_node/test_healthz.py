"""``/healthz`` served by the plugin (``--health-port``), for clusters without the livenessprobe
sidecar: the same verdict as the Probe RPC, over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from datahoard import names
from datahoard.csi_node import csi_pb2, csi_pb2_grpc
from datahoard.csi_node.healthz import HealthServer
from tests.support.polling import eventually
from tests.support.ports import free_port


def get(port: int, path: str = "/healthz") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("problems, code, body", [
    ([], 200, "ok\n"),
    (["host root /x is not a directory", "the repair loop has stopped"], 500,
     "host root /x is not a directory\nthe repair loop has stopped\n"),
])
def test_healthz_answers_from_the_check(problems: list[str], code: int, body: str) -> None:
    server = HealthServer(lambda: problems, 0, host="127.0.0.1")
    port = server.start()
    try:
        assert get(port) == (code, body)
        assert get(port, "/healthz?probe=1") == (code, body)
        assert get(port, "/metrics")[0] == 404
    finally:
        server.stop()


def test_a_failing_check_is_unhealthy_not_a_crash() -> None:
    def broken() -> list[str]:
        raise RuntimeError("state file unreadable")

    server = HealthServer(broken, 0, host="127.0.0.1")
    port = server.start()
    try:
        code, body = get(port)
        assert code == 500 and "state file unreadable" in body
        assert get(port)[0] == 500  # still serving
    finally:
        server.stop()


def test_plugin_serves_healthz_with_the_probes_verdict(tmp_path: Path) -> None:
    reg_dir = Path(tempfile.mkdtemp(prefix="reg-", dir="/tmp"))
    sock = tmp_path / "csi.sock"
    (tmp_path / "root").mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "datahoard.cli", "csi-node", "--host-root", str(tmp_path / "root"),
         "--node-id", "n1", "--endpoint", f"unix://{sock}", "--registration-dir", str(reg_dir)],
        env={**os.environ, "DATAHOARD_HEALTH_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reg_sock = reg_dir / f"{names.CSI_DRIVER_NAME}-reg.sock"
    try:
        eventually(lambda: reg_sock.exists() or proc.poll() is not None, timeout=60, what="the plugin")
        assert proc.poll() is None, proc.communicate()[0]

        def probe() -> tuple[bool, str]:
            with grpc.insecure_channel(f"unix://{sock}") as channel:
                try:
                    csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=30)
                    return True, ""
                except grpc.RpcError as err:
                    return False, err.details()

        healthy, details = probe()
        code, body = get(port)
        assert (code == 200) == healthy, (code, body, details)
        for problem in body.splitlines() if code == 500 else []:
            assert problem in details

        reg_sock.unlink()  # the kubelet could no longer re-register the plugin
        code, body = get(port)
        assert code == 500 and "registration socket" in body
        assert not probe()[0]

        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output
        with pytest.raises(OSError):
            get(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for leftover in reg_dir.iterdir():
            leftover.unlink()
        reg_dir.rmdir()


def test_a_bad_health_port_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "datahoard.cli", "csi-node", "--node-id", "n1", "--host-root", str(tmp_path),
         "--endpoint", f"unix://{tmp_path}/csi.sock"],
        env={**os.environ, "DATAHOARD_HEALTH_PORT": "ninety"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--health-port" in result.stderr and "ninety" in result.stderr
