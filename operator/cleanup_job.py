"""The Job that removes a deleted Dataset's cache, mount and pod-record directories from a node.

Only the finalize pass uses it, after the workers are gone; it is a node-side pod like the
workers but runs once and shares nothing else with them. Pure builder, golden-tested in
``tests/operator/``.
"""

from __future__ import annotations

import hashlib

from datahoard import names
from datahoard.api import Dataset

from .config import OperatorSettings
from .labels import Manifest, dataset_key, labels, metadata


def cleanup_job_name(ds: Dataset, node: str) -> str:
    digest = hashlib.sha256(f"{ds.namespace}/{ds.name}/{node}".encode()).hexdigest()[:10]
    return f"{dataset_key(ds)[:45].rstrip('-')}-clean-{digest}"


def cleanup_job(ds: Dataset, node: str, settings: OperatorSettings) -> Manifest:
    """A one-shot pod on ``node`` that removes the Dataset's cache, mount and pod-record directories.

    Runs after the workers are gone. A worker that crashed can leave a dead FUSE mount behind, so
    the script lazily unmounts first; Bidirectional propagation makes that unmount reach the host.
    """
    mnt = names.mount_dir(ds.namespace, ds.name, settings.host_root)
    cache = names.cache_dir(ds.namespace, ds.name, settings.host_root)
    consumers = names.consumers_dir(ds.namespace, ds.name, settings.host_root)
    script = (f'umount -l "{mnt}" 2>/dev/null; rm -rf -- "{cache}" "{consumers}"; rmdir -- "{mnt}" 2>/dev/null; '
              "exit 0")
    root = str(settings.host_root)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(ds, cleanup_job_name(ds, node), "cleanup", settings.namespace),
        "spec": {
            "backoffLimit": 3,
            # Jobs delete themselves a while after finishing; nothing else owns them.
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": labels(ds, "cleanup")},
                "spec": {
                    "nodeName": node,
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "cleanup",
                        "image": settings.worker_image,
                        "imagePullPolicy": settings.image_pull_policy,
                        "command": ["sh", "-c", script],
                        "securityContext": {"privileged": True},
                        "volumeMounts": [{"name": "root", "mountPath": root,
                                          "mountPropagation": "Bidirectional"}],
                    }],
                    "volumes": [{"name": "root", "hostPath": {"path": root, "type": "Directory"}}],
                },
            },
        },
    }
