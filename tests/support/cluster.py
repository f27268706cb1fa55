"""Reads of an envtest cluster's state for the cluster-tier tests (tests/cluster, tests/chart):
the Dataset, its conditions, the objects the operator made for it, and a worker's stats."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import kubernetes
import yaml

from datahoard import names
from datahoard.stats import WorkerStats
from tests.support.envtest import ControlPlane

SYSTEM = names.SYSTEM_NAMESPACE


class Cluster:
    """Small read helpers over the API, returning plain dicts."""

    def __init__(self, api: kubernetes.client.ApiClient, plane: ControlPlane) -> None:
        self.api = api
        self.plane = plane
        self.core = kubernetes.client.CoreV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.batch = kubernetes.client.BatchV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def apply_dataset(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        manifest = yaml.safe_dump({"apiVersion": names.API_VERSION, "kind": names.KIND,
                                   "metadata": {"name": name, "namespace": namespace}, "spec": spec})
        self.plane.kubectl("apply", "-f", "-", input=manifest)

    def apply_s3_dataset(self, namespace: str, name: str, uri: str, endpoint: str, **spec: Any) -> None:
        """A Dataset reading ``uri`` at ``endpoint`` with the test store's keys in a Secret
        ``s3-creds``; ``spec`` adds or replaces top-level spec fields (cache, warm, ...)."""
        self.core.create_namespaced_secret(namespace, {
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}})
        self.apply_dataset(namespace, name, {
            "source": {"uri": uri, "endpoint": endpoint, "region": "us-east-1", "secretRef": {"name": "s3-creds"}},
            **spec})

    def dataset(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(names.GROUP, names.VERSION, namespace,
                                                            names.PLURAL, name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return (self.dataset(namespace, name) or {}).get("status") or {}

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        for cond in self.status(namespace, name).get("conditions") or []:
            if cond["type"] == type_:
                return cond
        return {}

    def daemonset(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.sanitize_for_serialization(
                self.apps.read_namespaced_daemon_set(names.worker_name(namespace, name), SYSTEM))
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def owned(self, namespace: str, name: str) -> dict[str, list[str]]:
        """Every object carrying this Dataset's label, by kind."""
        selector = f"{names.GROUP}/dataset={names.worker_name(namespace, name)}"
        return {
            "DaemonSet": sorted(d.metadata.name for d in
                                self.apps.list_daemon_set_for_all_namespaces(label_selector=selector).items),
            "Secret": sorted(s.metadata.name for s in
                             self.core.list_secret_for_all_namespaces(label_selector=selector).items),
            "PersistentVolume": sorted(p.metadata.name for p in
                                       self.core.list_persistent_volume(label_selector=selector).items),
            "PersistentVolumeClaim": sorted(
                p.metadata.name for p in
                self.core.list_persistent_volume_claim_for_all_namespaces(label_selector=selector).items),
            "Job": sorted(j.spec.template.spec.node_name for j in
                          self.batch.list_job_for_all_namespaces(label_selector=selector).items),
        }

    def node_labels(self, node: str) -> dict[str, str]:
        return self.core.read_node(node).metadata.labels or {}

    def events(self, namespace: str, name: str) -> list[tuple[str, str, str]]:
        events = self.core.list_namespaced_event(namespace,
                                                 field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason, e.message) for e in events]


def worker_stats(port: str) -> WorkerStats:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        return WorkerStats.model_validate(json.load(resp))
