"""What every object the operator makes carries to say whose it is: labels and metadata.

Shared by every builder (workers, credentials, volumes, cleanup, the snapshot ConfigMap and
NetworkPolicy) and by the passes that select those objects again, so that the label a manifest
is written with and the selector it is found by come from one place. Pure, like the builders.
"""

from __future__ import annotations

from typing import Any

from datahoard import names
from datahoard.api import Dataset

from . import ownership

Manifest = dict[str, Any]

DATASET_LABEL = f"{names.GROUP}/dataset"
#: Full "<namespace>/<name>" of the owning Dataset; labels cannot hold a slash or 253 chars.
DATASET_ANNOTATION = ownership.DATASET_ANNOTATION
UID_ANNOTATION = ownership.UID_ANNOTATION
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = {"app.kubernetes.io/name": "datahoard", "app.kubernetes.io/managed-by": "datahoard-operator"}


def dataset_key(ds: Dataset) -> str:
    """Label value naming a Dataset: the worker name is a unique, valid DNS label."""
    return names.worker_name(ds.namespace, ds.name)


def labels(ds: Dataset, component: str) -> dict[str, str]:
    return {**MANAGED_BY, COMPONENT_LABEL: component, DATASET_LABEL: dataset_key(ds)}


def worker_selector(ds: Dataset) -> str:
    return f"{DATASET_LABEL}={dataset_key(ds)},{COMPONENT_LABEL}=cache-worker"


def metadata(ds: Dataset, name: str, component: str, namespace: str | None) -> Manifest:
    meta: Manifest = {
        "name": name,
        "labels": labels(ds, component),
        "annotations": {DATASET_ANNOTATION: f"{ds.namespace}/{ds.name}"},
    }
    if ds.uid:
        # The proof of ownership the operator checks before every write and delete.
        meta["annotations"][UID_ANNOTATION] = ds.uid
    if namespace is not None:
        meta["namespace"] = namespace
    return meta
