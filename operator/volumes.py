"""The volume a Dataset's users mount: its PersistentVolume, the claim bound to it, and the
node label that says where the volume can be mounted.

These are the objects users see and the scheduler reads (the PV's nodeAffinity is the node
label), created once and immutable while bound, unlike the worker DaemonSet that is re-applied
every pass; hence their own module. Pure builders, golden-tested in ``tests/operator/``.
"""

from __future__ import annotations

from datahoard import names
from datahoard.api import Dataset

from .config import OperatorSettings
from .labels import Manifest, metadata


def persistent_volume(ds: Dataset, settings: OperatorSettings) -> Manifest:
    """The one PV of a Dataset: read-only, served by the node plugin, only on labelled nodes."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": metadata(ds, names.pv_name(ds.namespace, ds.name), "volume", None),
        "spec": {
            "capacity": {"storage": ds.spec.cache.capacity},
            "accessModes": ["ReadOnlyMany"],
            "volumeMode": "Filesystem",
            # Retain: the data is the source's, and no provisioner exists to "delete" it.
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            # Pre-bound to the claim, so no other PVC can take it.
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": ds.namespace, "name": ds.name},
            "csi": {
                "driver": names.CSI_DRIVER_NAME,
                "volumeHandle": names.volume_handle(ds.namespace, ds.name),
                "readOnly": True,
                "volumeAttributes": {
                    names.CTX_NAMESPACE: ds.namespace,
                    names.CTX_NAME: ds.name,
                    names.CTX_MOUNT_DIR: str(names.mount_dir(ds.namespace, ds.name,
                                                             settings.host_root)),
                },
            },
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": names.node_label(ds.namespace, ds.name), "operator": "In",
                 "values": ["true"]}]}]}},
        },
    }


def persistent_volume_claim(ds: Dataset, volume: str | None = None) -> Manifest:
    """The claim users mount: named after the Dataset, in its namespace, bound to its PV
    (``volume``: the PV's name when it is not the current one, after an upgrade)."""
    meta = metadata(ds, ds.name, "volume", ds.namespace)
    if ds.uid:
        meta["ownerReferences"] = [{"apiVersion": names.API_VERSION, "kind": names.KIND,
                                    "name": ds.name, "uid": ds.uid}]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "volumeMode": "Filesystem",
            "storageClassName": "",
            "volumeName": volume or names.pv_name(ds.namespace, ds.name),
            "resources": {"requests": {"storage": ds.spec.cache.capacity}},
        },
    }


def node_label_patch(ds: Dataset, ready: bool) -> Manifest:
    """Merge patch that sets (or, with None, removes) the Dataset's label on a node."""
    return {"metadata": {"labels": {names.node_label(ds.namespace, ds.name): "true" if ready else None}}}
