"""Which pods a Dataset is published to on this node, for its worker's per-pod hit ratio.

The worker sees a reader's pod UID (its cgroup) but not the pod's namespace and name; kubelet
hands those to this plugin on NodePublishVolume because the CSIDriver says ``podInfoOnMount:
true`` (``csi.storage.k8s.io/pod.*`` in volume_context). So each publish leaves one record
(the file contract is :mod:`datahoard.pod_records`) and NodeUnpublishVolume removes it.

The directory is per Dataset and mounted into that Dataset's worker alone, so one tenant's pods
are never visible to another Dataset's worker. A record that cannot be written is logged and the
publish goes on: attribution is worth less than a pod that starts. The worker keeps a name once
read, so a pod's bytes keep their name after it is unpublished.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from datahoard import names, pod_records

log = logging.getLogger(__name__)

POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"

# What a kubelet sends (RFC 1123 names, UUIDs or a static pod's hash); anything else is not a pod.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$|^[0-9a-f]{32}$")


def record(host_root: Path, namespace: str, name: str, target: str, context: Mapping[str, str]) -> Path | None:
    """Record the pod of a publish of Dataset ``namespace/name`` at ``target`` (atomically);
    None when volume_context carries no (valid) pod, e.g. a CSIDriver without podInfoOnMount."""
    pod = {"uid": context.get(POD_UID, ""), "namespace": context.get(POD_NAMESPACE, ""),
           "name": context.get(POD_NAME, "")}
    if not (_UID.match(pod["uid"]) and _NAME.match(pod["namespace"]) and _NAME.match(pod["name"])):
        if any(pod.values()):
            log.warning("publish of %s/%s at %s: pod info in volume_context is not a pod (%s); its reads "
                        "will be shown by UID", namespace, name, target, pod)
        return None
    directory = names.consumers_dir(namespace, name, host_root)
    try:
        return pod_records.write(directory, target, pod_records.PodRecord(pod["uid"], pod["namespace"], pod["name"]))
    except OSError as exc:
        log.warning("cannot record pod %s/%s for %s/%s in %s: %s (its reads will be shown by UID)",
                    pod["namespace"], pod["name"], namespace, name, directory, exc)
        return None


def forget(host_root: Path, namespace: str, name: str, target: str) -> None:
    """Remove the record of the publish at ``target`` (none is fine: unpublish is idempotent)."""
    try:
        pod_records.forget(names.consumers_dir(namespace, name, host_root), target)
    except OSError as exc:
        log.warning("cannot remove the pod record of %s/%s at %s: %s", namespace, name, target, exc)
