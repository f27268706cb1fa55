"""Pod records: which pods a Dataset is published to on this node, written by the CSI node
plugin and read by that Dataset's worker (for its per-pod hit ratio).

The worker sees a reader's pod UID (its cgroup) but not the pod's namespace and name; kubelet
hands those to the plugin on NodePublishVolume (``podInfoOnMount: true``). So each publish
leaves one small file, ``<names.consumers_dir(ns, name)>/<sha256 of the target>[:16].json``
holding ``{"uid", "namespace", "name", "target"}``, and unpublish removes it (the file is named
by the target because the unpublish request names nothing else). This module is that file
contract, once: the plugin writes through :func:`write` and :func:`forget`, the worker reads
through :func:`read_all`; neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PodRecord:
    uid: str
    namespace: str
    name: str


def record_path(directory: Path, target: str) -> Path:
    return directory / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}.json"


def write(directory: Path, target: str, pod: PodRecord) -> Path:
    """Record ``pod`` as published at ``target``, atomically (a reader never sees half a file).
    OSError if the directory cannot be made or written."""
    path = record_path(directory, target)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pod.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"uid": pod.uid, "namespace": pod.namespace, "name": pod.name, "target": target}, out)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def forget(directory: Path, target: str) -> None:
    """Remove the record of the publish at ``target``; none is fine (unpublish is idempotent)."""
    record_path(directory, target).unlink(missing_ok=True)


def read_all(directory: Path) -> list[PodRecord]:
    """Every whole record in ``directory``; files being written or not records are skipped (the
    next read sees them whole), a missing directory is no records."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue
        try:
            data = json.loads(Path(entry.path).read_text())
            out.append(PodRecord(str(data["uid"]), str(data["namespace"]), str(data["name"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
