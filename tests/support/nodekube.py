"""kubectl against the one-node cluster (tests/node), and its bounded waits: what the node-tier
tests and the e2e on the local provider share."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import polling

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "node" / "cluster.sh"
#: The node's root on this machine (cluster.sh) and the namespace the chart installs into.
NODE_DIR = os.environ.get("NODE_DIR", "/var/lib/datahoard-node")
SYSTEM_NS = "datahoard-system"
TOOLS_DIR = Path(os.environ.get("TOOLS_DIR", Path.home() / ".cache" / "datahoard-tools"))
HOST_IP = "10.244.0.1"   # the host's address on the pod bridge (cluster.sh)


def missing_prerequisites() -> str | None:
    """Why the one-node cluster cannot run here (None when it can): what the node tier and the
    e2e on the local provider skip with."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc, the pod bridge)"
    missing = [t for t in ("containerd", "runc", "buildah", "umoci", "skopeo", "socat") if not shutil.which(t)]
    if missing or not os.path.exists("/usr/lib/cni/bridge"):
        return f"{', '.join(missing) or 'CNI plugins'} not installed: run `make node-sysdeps`"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse (the cache workers mount FUSE views)"
    return None


#: The node tier's pace: each check runs kubectl against a real cluster on a 2-core machine, so
#: it polls every 2 s (a call may pass ``interval``), and a kubectl that fails is retried.
eventually = functools.partial(polling.eventually, interval=2.0)


@dataclass
class Kube:
    kubectl: str
    kubeconfig: str
    node: str

    @classmethod
    def from_env(cls) -> Kube:
        lines = subprocess.run([str(CLUSTER_SH), "env"], check=True, capture_output=True, text=True,
                               env={**os.environ, "TOOLS_DIR": str(TOOLS_DIR)}).stdout
        env = dict(part.split("=", 1) for line in lines.splitlines() if line.startswith("export ")
                   for part in line[len("export "):].split())
        path = env["PATH"].split(":")[0]
        return cls(kubectl=f"{path}/kubectl", kubeconfig=env["KUBECONFIG"], node=os.uname().nodename)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 120) -> str:
        result = subprocess.run([self.kubectl, *args], input=input, capture_output=True, text=True,
                                timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, ["kubectl", *args], result.stdout,
                                                result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self("get", "-o", "json", *args))

    def apply(self, manifest: str, namespace: str | None = None) -> str:
        ns = ["-n", namespace] if namespace else []
        return self(*ns, "apply", "-f", "-", input=manifest)

    def logs(self, *args: str) -> str:
        return self("logs", *args, check=False)


#: The image the node tier's reader pods run: the product image has Python, and there is no
#: registry to pull the examples' python image from.
IMAGE = "localhost/datahoard:dev"


def local_image(manifest: str) -> str:
    """An example manifest with its `python:3.12-slim-bookworm` replaced by :data:`IMAGE` (the
    only adaptation the examples need besides endpoint, secret and names)."""
    out, n = re.subn(r"^(\s*)image: python:3\.12-slim-bookworm$",
                     rf"\1image: {IMAGE}\n\1imagePullPolicy: Never", manifest, flags=re.M)
    assert n >= 1, "the example's reader image changed: update local_image()"
    return out


def master_only(manifest: str) -> str:
    """A PyTorchJob example without its Worker replicas: there is no cluster DNS here, and the
    training-operator gives Worker pods an init container that waits to resolve the Master."""
    return manifest[:manifest.index("    Worker:")]


def run_pytorchjob(kube: Kube, manifest: str, name: str, namespace: str, timeout: float = 600) -> str:
    """Apply a PyTorchJob, wait for Succeeded, return its master's log."""
    # The validating webhook may refuse for a moment after the Deployment is available.
    eventually(lambda: kube.apply(manifest, namespace=namespace), 120, "the PyTorchJob to be accepted",
               interval=5)
    try:
        eventually(lambda: kube("get", "-n", namespace, "pytorchjob", name, "-o",
                                'jsonpath={.status.conditions[?(@.type=="Succeeded")].status}') == "True",
                   timeout, f"the PyTorchJob {name} to succeed")
    finally:
        logs = kube.logs("-n", namespace, f"{name}-master-0")
        print(f"{name}-master-0:", logs[-2000:])
    return logs


def pod_events(kube: Kube, namespace: str, pod: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about ``pod``, oldest first."""
    items = kube.json("events", "-n", namespace, "--field-selector", f"involvedObject.name={pod}")["items"]
    items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return [(e.get("type", ""), e.get("reason", ""), e.get("message", "")) for e in items]


#: What a reader pod runs over the volume at /data: every file of the test dataset (its first line
#: is ``sha256:<hex of the rest>``) read whole and checked; prints ``verified N files`` or ``BAD [...]``.
VERIFY = """
import hashlib, os
files, bad = 0, []
for dirpath, _, names in os.walk("/data"):
    for name in names:
        data = open(os.path.join(dirpath, name), "rb").read()
        files += 1
        head, _, body = data.partition(b"\\n")
        if head[7:].decode() != hashlib.sha256(body).hexdigest():
            bad.append(name)
print(f"verified {files} files" if not bad else f"BAD {bad}")
"""
