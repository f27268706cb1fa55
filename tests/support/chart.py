"""Shared helpers of the chart tests: paths, values, `helm` runs, and a control plane with an
audit log so a test can see exactly which API calls the operator made under the chart's
ServiceAccount.

The control plane and the kubelet stand-in are the cluster tier's (tests/support), so the chart
is checked against the same real kube-apiserver (RBAC on) as the operator itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.envtest import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "datahoard"

RELEASE = "datahoard"
NAMESPACE = "datahoard-system"

#: Values that change every knob a platform team is likely to turn; rendered, linted and applied.
CUSTOM_VALUES: dict[str, Any] = {
    "fullnameOverride": "dh",
    "commonLabels": {"team": "ml-platform"},
    "image": {"repository": "registry.example.com/ml/datahoard", "tag": "0.1.0-rc1",
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "crds": {"enabled": False},
    "operator": {"interval": 30, "logLevel": "--verbose", "gpuResource": "amd.com/gpu",
                 "sourceSchemes": ["s3", "hdfs"], "extraEnv": [{"name": "HTTPS_PROXY",
                                                               "value": "http://proxy:3128"}],
                 "serviceAccount": {"name": "hoarder", "annotations": {"team": "ml"}},
                 "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                 "tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                                  "operator": "Exists", "effect": "NoSchedule"}]},
    "worker": {"hostRoot": "/mnt/nvme/datahoard", "statsPort": 9555,
               "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                             "limits": {"memory": "8Gi"}},
               "serviceAccount": {"create": False, "name": ""}},
    "csiNode": {"kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet/",
                "namespaceRepair": False, "fuseKeeper": False, "logLevel": "DEBUG", "priorityClassName": "",
                "tolerations": [{"operator": "Exists"}], "maxUnavailable": "10%"},
    "csiDriver": {"create": False},
}


@dataclass
class Rendered:
    text: str
    docs: list[dict[str, Any]]

    def find(self, kind: str, name: str | None = None) -> dict[str, Any]:
        hits = [d for d in self.docs if d["kind"] == kind
                and (name is None or d["metadata"]["name"] == name)]
        assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
        return hits[0]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)


def run_helm(helm: str, *args: str, check: bool = True,
             kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/datahoard-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/datahoard-helm/config", "HELM_DATA_HOME": "/tmp/datahoard-helm/data"}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=180, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


class AuditedControlPlane(ControlPlane):
    """The cluster tier's control plane plus an audit log of every request (metadata only)."""

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _spawn(self, name: str, args: list[str]) -> None:
        if name == "kube-apiserver":
            policy = self.workdir / "audit-policy.yaml"
            policy.write_text(yaml.safe_dump({
                "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata"}]}))
            args = [*args, "--audit-policy-file", str(policy),
                    "--audit-log-path", str(self.audit_log), "--audit-log-format", "json"]
        super()._spawn(name, args)

    def requests_by(self, username: str) -> list[dict[str, Any]]:
        """One audit event per request of one user, in order. A watch is logged when it starts
        (ResponseStarted) and again when it ends, so requests are told apart by auditID."""
        events: dict[str, dict[str, Any]] = {}
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            if event.get("user", {}).get("username") == username:
                events[event["auditID"]] = event
        return list(events.values())
