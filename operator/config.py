"""Operator configuration: environment variables, read once at startup.

The Helm chart sets these on the operator Deployment; tests set them on the operator process
(e.g. a short interval and the port of a locally running worker). Every variable is prefixed
``DATAHOARD_``; e.g. ``DATAHOARD_WORKER_IMAGE``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from datahoard import names


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DATAHOARD_", frozen=True)

    namespace: str = Field(default=names.SYSTEM_NAMESPACE,
                           description="Where workers and Secret copies live")
    worker_image: str = Field(default="ghcr.io/datahoard/datahoard:0.1.0",
                              description="Image with the `datahoard` CLI (cache worker)")
    image_pull_policy: str = "IfNotPresent"
    worker_service_account: str = Field(default="",
                                        description="ServiceAccount of worker pods ('' = default)")
    stats_port: int = Field(default=names.WORKER_STATS_PORT, ge=1, le=65535,
                            description="Port of the workers' /stats, /metrics and /healthz")
    host_root: Path = Field(default=names.DEFAULT_HOST_ROOT,
                            description="Node directory holding mnt/ and cache/")
    gpu_resource: str = Field(default="nvidia.com/gpu",
                              description="Allocatable resource that marks a default cache node")
    source_schemes: list[str] = Field(default=["s3", "hdfs", "webhdfs", "swebhdfs"],
                                      description="URI schemes the worker image can read")
    interval: float = Field(default=10.0, gt=0,
                            description="Seconds between reconciles / stats collections")
    stats_timeout: float = Field(default=3.0, gt=0,
                                 description="Per-worker timeout of one GET /stats")
    stats_concurrency: int = Field(default=16, ge=1,
                                   description="Workers polled at once, per Dataset")
    metrics_port: int = Field(default=9102, ge=0, le=65535,
                              description="Port of the operator's own Prometheus /metrics (0 = "
                              "not served)")
    delete_poll: float = Field(default=5.0, gt=0,
                               description="Seconds between checks while deletion waits")
    # -- What tenants may ask for (the chart's `policy` values). Anyone who may create a Dataset
    # gets a privileged worker on some node, reading some source: these bound which.
    allow_node_identity: bool = Field(
        default=False, description="Let Datasets use spec.source.credentials NodeIdentity (the "
        "node's instance role / the worker ServiceAccount's IRSA); off: a condition refuses them")
    allow_link_local_endpoints: bool = Field(
        default=False, description="Let spec.source.endpoint name a link-local address "
        "(169.254.0.0/16, fe80::/10: cloud metadata services) or a host resolving to one")
    forbidden_node_labels: list[str] = Field(
        default=["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"],
        description="Nodes with any of these label keys never run workers, whatever the spec says")
    forbidden_taints: list[str] = Field(
        default=["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"],
        description="Nodes with a taint of any of these keys never run workers, even when a "
        "Dataset's tolerations tolerate it")
    capacity_resource: str = Field(
        default="ephemeral-storage",
        description="Node allocatable resource that bounds a Disk cache's capacity ('' = no "
        "bound); Memory caches are bounded by allocatable memory")
    dataset_namespaces: list[str] = Field(
        default=[], description="Namespaces whose Datasets are served ([] = all); the chart "
        "then grants Secret reads in these namespaces only")
    peer_network_policy: bool = Field(
        default=False, description="Make a NetworkPolicy per Dataset letting its workers reach each "
        "other's stats port (to fetch the Dataset's listing snapshot). On where the chart's worker "
        "NetworkPolicy is (it admits only the operator, the CSI plugin and scrapers): off otherwise, "
        "since a policy selecting the workers would shut out everything else")
    # Requests keep the scheduler honest; no CPU limit, because throttling a FUSE server stalls
    # every reader. The memory limit leaves headroom over the page-cache-free working set.
    worker_cpu_request: str = "250m"
    worker_memory_request: str = "512Mi"
    worker_memory_limit: str = "4Gi"
