"""The cache workers' manifest: one privileged worker pod per selected node, as a DaemonSet.

The largest builder and the one that changes most (the `datahoard mount` command line, env,
probes, host paths), so it has a module to itself. Pure, like every builder: a Dataset (plus
operator settings) in, the complete desired DaemonSet out, checked against golden YAML in
``tests/operator/``; the converge pass server-side-applies it.
"""

from __future__ import annotations

from datahoard import names
from datahoard.api import Dataset, quantity_bytes

from .config import OperatorSettings
from .credentials import secret_keys
from .labels import (COMPONENT_LABEL, DATASET_ANNOTATION, DATASET_LABEL, Manifest, dataset_key, labels,
                     metadata)
from .snapshots import worker_env

CREDENTIALS_ANNOTATION = f"{names.GROUP}/credentials-hash"
WORKER_CONTAINER = "worker"
#: The worker's credentials mode, set from spec.source.credentials (see cache_worker/sources.py).
CREDENTIALS_ENV = "DATAHOARD_SOURCE_CREDENTIALS"
CREDENTIALS_VALUES = {"Anonymous": "anonymous", "Secret": "secret", "NodeIdentity": "node-identity"}
#: Where the worker writes its fatal error (datahoard/cli.py reads the path from
#: DATAHOARD_TERMINATION_LOG); the kubelet copies it into the container's status.
TERMINATION_LOG = "/dev/termination-log"


def worker_command(ds: Dataset, settings: OperatorSettings) -> list[str]:
    """The cache worker's command line (the `datahoard mount` CLI contract)."""
    source = ds.spec.source
    cmd = [
        "datahoard", "mount", source.uri,
        str(names.mount_dir(ds.namespace, ds.name, settings.host_root)),
        "--cache-dir", str(names.cache_dir(ds.namespace, ds.name, settings.host_root)),
        "--capacity", ds.spec.cache.capacity,
        # The CSI plugin's records of the pods this Dataset is published to (per-pod hit ratio).
        "--consumers-dir", str(names.consumers_dir(ds.namespace, ds.name, settings.host_root)),
    ]
    if ds.spec.warm.policy == "Eager":
        cmd.append("--warm")
    if ds.spec.cache.direct:
        # The tree is published to new pods by the CSI plugin (NodePublishVolume binds it);
        # the worker does not stack it over the view that running pods already read.
        cmd += ["--direct", "--no-direct-bind"]
    for pattern in source.include or []:
        cmd += ["--include", pattern]
    for pattern in source.exclude or []:
        cmd += ["--exclude", pattern]
    if source.endpoint:
        cmd += ["--endpoint-url", source.endpoint]
    if source.region:
        cmd += ["--region", source.region]
    if ds.spec.warm.bandwidth_bytes:
        cmd += ["--bandwidth-limit", str(ds.spec.warm.bandwidth_bytes)]
    cmd += ["--parallelism", str(ds.spec.warm.parallelism), "--foreground",
            "--stats-addr", f"0.0.0.0:{settings.stats_port}"]
    return cmd


def worker_tolerations(ds: Dataset, settings: OperatorSettings) -> list[Manifest]:
    """GPU nodes are commonly tainted with the GPU resource name; tolerate that by default."""
    default = [{"key": settings.gpu_resource, "operator": "Exists"}]
    extra = [t.model_dump(by_alias=True, exclude_none=True)
             for t in ds.spec.placement.tolerations or []]
    return default + [t for t in extra if t not in default]


def _add_quantity(a: str, b_bytes: int) -> str:
    return str(quantity_bytes(a) + b_bytes)


def _worker_container(ds: Dataset, settings: OperatorSettings, with_secret: bool) -> Manifest:
    secret = names.worker_name(ds.namespace, ds.name)
    env: list[Manifest] = [
        # Mount records go where the CSI node plugin looks for them, with an address it can reach.
        {"name": "DATAHOARD_RUN_DIR", "value": str(names.run_dir(settings.host_root))},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "DATAHOARD_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    # How the worker's source authenticates (cache_worker/sources.py reads this): only
    # NodeIdentity may use the default credential chain, so only it may reach instance metadata.
    mode = ds.spec.source.credentials_mode
    env.append({"name": CREDENTIALS_ENV, "value": CREDENTIALS_VALUES[mode]})
    if mode != "NodeIdentity":
        env.append({"name": "AWS_EC2_METADATA_DISABLED", "value": "true"})
    # The Dataset's snapshot and peers that hold it, from a ConfigMap (operator/snapshots.py).
    env += worker_env(ds)
    if with_secret:
        keys = secret_keys(ds)
        for key in keys.all:
            ref = {"name": secret, "key": key}
            if key not in keys.required:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    requests = {"cpu": settings.worker_cpu_request, "memory": settings.worker_memory_request}
    limits = {"memory": settings.worker_memory_limit}
    if ds.spec.cache.medium == "Memory":
        # tmpfs pages are charged to the pod's memory cgroup: reserve the cache on top.
        extra = ds.spec.cache.capacity_bytes
        requests["memory"] = _add_quantity(settings.worker_memory_request, extra)
        limits["memory"] = _add_quantity(settings.worker_memory_limit, extra)
    mnt_root = str(settings.host_root / "mnt")
    cache = str(names.cache_dir(ds.namespace, ds.name, settings.host_root))
    container: Manifest = {
        "name": WORKER_CONTAINER,
        "image": settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": worker_command(ds, settings),
        "ports": [{"name": "stats", "containerPort": settings.stats_port, "protocol": "TCP"}],
        # Ready = the FUSE view is live; that is when the node may be labelled for training pods.
        # No liveness probe: restarting a busy FUSE server would break every reader on the node.
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "stats"},
            "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3,
        },
        "resources": {"requests": requests, "limits": limits},
        # FUSE mounts, and propagating them to the host, need a privileged container.
        "securityContext": {"privileged": True},
        "volumeMounts": [
            {"name": "mnt", "mountPath": mnt_root, "mountPropagation": "Bidirectional"},
            {"name": "cache", "mountPath": cache},
            {"name": "run", "mountPath": str(names.run_dir(settings.host_root))},
            {"name": "consumers", "readOnly": True,
             "mountPath": str(names.consumers_dir(ds.namespace, ds.name, settings.host_root))},
        ],
        "env": env,
        # A worker that cannot start (source unreachable, credentials refused) says why in its
        # termination message; the log's tail stands in when it died before writing one. The
        # operator copies it into WorkersReady (status.worker_failure).
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return container


def worker_daemonset(ds: Dataset, nodes: list[str], settings: OperatorSettings,
                     credentials: str | None) -> Manifest:
    """One cache worker on each selected node, pinned by node name.

    A DaemonSet (not bare pods) so that kubelet restarts and rolling updates come for free; the
    node list lives in a required nodeAffinity on ``metadata.name`` so that the operator, which
    owns placement, changes it with one patch. Caches live on hostPath keyed by Dataset, so a
    rollout or a node that leaves and returns keeps its cached data. ``credentials`` is the
    :func:`.credentials.credentials_hash` of the Secret copy, or None for anonymous access.
    """
    key = dataset_key(ds)
    cache_volume: Manifest
    if ds.spec.cache.medium == "Memory":
        cache_volume = {"name": "cache", "emptyDir": {"medium": "Memory",
                                                       "sizeLimit": ds.spec.cache.capacity}}
    else:
        cache_volume = {"name": "cache", "hostPath": {
            "path": str(names.cache_dir(ds.namespace, ds.name, settings.host_root)),
            "type": "DirectoryOrCreate"}}
    pod_spec: Manifest = {
        # One term per node: terms are ORed, and a metadata.name field selector takes exactly
        # one value (the same shape the DaemonSet controller itself writes into its pods).
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                for node in sorted(nodes)]}}},
        "tolerations": worker_tolerations(ds, settings),
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
        "containers": [_worker_container(ds, settings, credentials is not None)],
        "volumes": [
            {"name": "mnt", "hostPath": {"path": str(settings.host_root / "mnt"),
                                         "type": "DirectoryOrCreate"}},
            cache_volume,
            {"name": "run", "hostPath": {"path": str(names.run_dir(settings.host_root)),
                                         "type": "DirectoryOrCreate"}},
            # This Dataset's pod records only: no worker sees another tenant's pods.
            {"name": "consumers", "hostPath": {
                "path": str(names.consumers_dir(ds.namespace, ds.name, settings.host_root)),
                "type": "DirectoryOrCreate"}},
        ],
        # FUSE names a reader by its pid in the worker's pid namespace: without the host's, every
        # pod's pid is 0 and the per-pod hit ratio cannot attribute anything (consumers.py).
        "hostPID": True,
    }
    if settings.worker_service_account:
        pod_spec["serviceAccountName"] = settings.worker_service_account
    template_annotations = {DATASET_ANNOTATION: f"{ds.namespace}/{ds.name}"}
    if credentials is not None:
        template_annotations[CREDENTIALS_ANNOTATION] = credentials
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata(ds, key, "cache-worker", settings.namespace),
        "spec": {
            "selector": {"matchLabels": {DATASET_LABEL: key, COMPONENT_LABEL: "cache-worker"}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(ds, "cache-worker"),
                             "annotations": template_annotations},
                "spec": pod_spec,
            },
        },
    }
