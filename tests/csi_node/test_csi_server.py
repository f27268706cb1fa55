"""``datahoard csi-node`` as a process: socket from CSI_ENDPOINT, node id from NODE_NAME,
flags override both, graceful stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from datahoard.csi_node import csi_pb2, csi_pb2_grpc
from tests.support.polling import eventually


def run_plugin(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "datahoard.cli", "csi-node", "--host-root", str(tmp_path / "root"), *args],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_env_configured_plugin_serves_and_stops_on_sigterm(tmp_path: Path):
    sock = tmp_path / "csi" / "csi.sock"
    (tmp_path / "root").mkdir()
    proc = run_plugin(tmp_path, env={"CSI_ENDPOINT": f"unix://{sock}", "NODE_NAME": "gpu-node-7"})
    try:
        eventually(lambda: sock.exists() or proc.poll() is not None, what="the plugin socket")
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert info.node_id == "gpu-node-7"
            name = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10).name
            assert name == "csi.datahoard.io"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert "stopping" in output
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_flags_override_env(tmp_path: Path):
    sock = tmp_path / "flag.sock"
    proc = run_plugin(tmp_path, "--endpoint", f"unix://{sock}", "--node-id", "from-flag",
                      env={"CSI_ENDPOINT": f"unix://{tmp_path}/env.sock", "NODE_NAME": "from-env"})
    try:
        eventually(lambda: sock.exists() or proc.poll() is not None, what="the plugin socket")
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            assert csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id == "from-flag"
        assert not (tmp_path / "env.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_missing_node_id_is_a_startup_error(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    result = subprocess.run(
        [sys.executable, "-m", "datahoard.cli", "csi-node", "--endpoint", f"unix://{tmp_path}/x.sock"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "NODE_NAME" in result.stderr
