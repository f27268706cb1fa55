"""The parts of a cluster that envtest lacks, played by the tests: nodes, kubelet, the operator.

* Nodes are plain Node objects with the status a GPU node's kubelet would report.
* :class:`Kubelet` turns a DaemonSet's pod template into a pod on a node (what the DaemonSet
  controller and the scheduler would do), marks it Running/Ready with a local address, and can
  run the pod's real command as a local process, with the env its Secret references resolve to.
* :class:`OperatorProcess` is the operator as it runs in production: ``kopf run`` in its own
  process, so a test can kill it, restart it, and read its log.
"""

from __future__ import annotations

import base64
import datetime
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from datahoard.mounts import unmount_all

from tests.support.envtest import REPO
from tests.support.polling import eventually

GPU = "nvidia.com/gpu"


def make_node(api: kubernetes.client.ApiClient, name: str, gpus: int | None = None,
              labels: dict[str, str] | None = None,
              taints: list[dict[str, str]] | None = None) -> None:
    core = kubernetes.client.CoreV1Api(api)
    core.create_node({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                            **(labels or {})}}})
    resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    if gpus is not None:
        resources[GPU] = str(gpus)
    core.patch_node_status(name, {"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "played by the test"}]}})
    # The API server taints new nodes not-ready; the node lifecycle controller lifts that once
    # kubelet reports Ready. No such controller runs here, so the test does it.
    core.patch_node(name, {"spec": {"taints": taints}})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Kubelet:
    api: kubernetes.client.ApiClient
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    def daemonset(self, namespace: str, name: str) -> dict[str, Any]:
        ds = kubernetes.client.AppsV1Api(self.api).read_namespaced_daemon_set(name, namespace)
        return self.api.sanitize_for_serialization(ds)

    def start_pod(self, daemonset: dict[str, Any], node: str) -> str:
        """Create the pod the DaemonSet controller would create on ``node`` (Pending)."""
        template = daemonset["spec"]["template"]
        name = f"{daemonset['metadata']['name']}-{node}"
        self.core.create_namespaced_pod(daemonset["metadata"]["namespace"], {
            "metadata": {"name": name, "labels": template["metadata"]["labels"],
                         "annotations": template["metadata"].get("annotations", {})},
            "spec": {**template["spec"], "nodeName": node},
        })
        return name

    def set_status(self, namespace: str, pod: str, ready: bool, ip: str = "127.0.0.1") -> None:
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip,
            "startTime": _now(),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "lastTransitionTime": _now()}]}})

    def container_env(self, namespace: str, container: dict[str, Any], node: str | None = None) -> dict[str, str]:
        """Resolve secretKeyRef and configMapKeyRef env vars the way kubelet does (at each
        container start), and the downward API's spec.nodeName when ``node`` is given."""
        env = {}
        for var in container.get("env") or []:
            field_ref = (var.get("valueFrom") or {}).get("fieldRef")
            if field_ref is not None and field_ref.get("fieldPath") == "spec.nodeName" and node is not None:
                env[var["name"]] = node
                continue
            cm_ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
            if cm_ref is not None:
                try:
                    data = self.core.read_namespaced_config_map(cm_ref["name"], namespace).data or {}
                except kubernetes.client.ApiException as exc:
                    if exc.status != 404 or not cm_ref.get("optional"):
                        raise
                    data = {}
                if cm_ref["key"] in data:
                    env[var["name"]] = data[cm_ref["key"]]
                elif not cm_ref.get("optional"):
                    raise AssertionError(f"kubelet: ConfigMap {cm_ref['name']} has no key {cm_ref['key']}")
                continue
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[var["name"]] = var.get("value", "")
                continue
            data = self.core.read_namespaced_secret(ref["name"], namespace).data or {}
            if ref["key"] in data:
                env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif not ref.get("optional"):
                raise AssertionError(f"kubelet: secret {ref['name']} has no key {ref['key']}")
        return env

    def run_container(self, daemonset: dict[str, Any], stats_addr: str, log: Path,
                      node_env: dict[str, str] | None = None, node: str | None = None) -> subprocess.Popen:
        """Run the worker container's real command locally, its stats on ``stats_addr``.
        ``node_env``: what the node adds beneath the container's own env (e.g. where its
        instance metadata service answers); the container spec's variables win over it.
        ``node``: the node it runs on (the downward API's spec.nodeName)."""
        container = daemonset["spec"]["template"]["spec"]["containers"][0]
        cmd = list(container["command"])
        assert cmd[0] == "datahoard", cmd
        cmd[cmd.index("--stats-addr") + 1] = stats_addr
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(node_env or {})
        env.update(self.container_env(daemonset["metadata"]["namespace"], container, node))
        proc = subprocess.Popen([sys.executable, "-m", "datahoard.cli", *cmd[1:]], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes.append(proc)
        url = f"http://{stats_addr}/healthz"

        def healthy() -> bool:
            assert proc.poll() is None, f"worker exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        eventually(healthy, timeout=60, what=f"worker /healthz at {url}")
        return proc

    def stop_at(self, stats_addr: str) -> None:
        """Stop the worker whose stats are at ``stats_addr`` (its container ends: it unmounts)."""
        for proc in self.processes:
            if proc.poll() is None and stats_addr in " ".join(proc.args):
                _stop(proc, 30)
                return
        raise AssertionError(f"no worker at {stats_addr}")

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                _stop(proc, 20)


def _stop(worker: subprocess.Popen, grace: float) -> None:
    """End a worker container as the kubelet does: SIGTERM, then SIGKILL after ``grace``. A
    killed container's mounts go with its mount namespace; this one shares the test's, so its
    FUSE mount is detached here (a worker that unmounts itself leaves nothing to detach)."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace)
        return
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    args = list(worker.args)
    mountpoint = args[args.index("mount") + 2]   # python -m datahoard.cli mount SOURCE DIR ...
    unmount_all(mountpoint)


@dataclass
class OperatorProcess:
    """``kopf run`` of our handlers module against the test control plane."""

    kubeconfig: Path
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "--verbose",
             "-m", "datahoard.operator.handlers"],
            cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")
