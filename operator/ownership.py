"""Whose object is this? The operator writes and deletes only objects that prove they are the
Dataset's own, so one tenant's Dataset can never adopt, rewrite or remove another's objects.

Proof is the ``datahoard.io/dataset-uid`` annotation (the Dataset's ``metadata.uid``), which the
operator sets on everything it makes. A name alone proves nothing: names are derived from
``<namespace>/<name>`` (injective, see :mod:`datahoard.names`), but anyone who may create a
DaemonSet in the system namespace, or a PV, can take a name first.

Upgrades: operators before the uid annotation (0.1.x) named objects ``dh-<ns>-<name>`` /
``datahoard-<ns>-<name>`` and annotated them ``datahoard.io/dataset: <ns>/<name>``. Such an
object at exactly its legacy name, with that annotation and no uid, is *legacy-ours*: the
operator may retire it (workers, Secret copy) or keep serving it (a PV a PVC of this Dataset is
already bound to: a PVC's volumeName is immutable). A PV additionally needs its claimRef to name
this Dataset's PVC, since the old names collided and the first Dataset to come took the PV.
Pure functions over plain dicts; :mod:`.owned` does the reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from datahoard import names
from datahoard.api import Dataset

UID_ANNOTATION = f"{names.GROUP}/dataset-uid"
#: ``<namespace>/<name>`` of the owning Dataset (set by every operator version).
DATASET_ANNOTATION = f"{names.GROUP}/dataset"

Verdict = Literal["ours", "legacy", "foreign"]
Obj = Mapping[str, Any]


def _annotations(obj: Obj) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def verdict(obj: Obj, ds: Dataset, legacy_name: str | None = None) -> Verdict:
    """``ours`` (carries this Dataset's uid), ``legacy`` (made for it by a 0.1.x operator, at
    ``legacy_name``) or ``foreign`` (anything else: never written or deleted)."""
    meta = obj.get("metadata") or {}
    notes = _annotations(obj)
    uid = notes.get(UID_ANNOTATION)
    if uid:
        return "ours" if ds.uid and uid == ds.uid else "foreign"
    owner_refs = meta.get("ownerReferences") or []
    if ds.uid and any(ref.get("uid") == ds.uid for ref in owner_refs):
        return "ours"  # a 0.1.x PVC: it carried an ownerReference to the Dataset
    if (legacy_name is not None and meta.get("name") == legacy_name
            and notes.get(DATASET_ANNOTATION) == f"{ds.namespace}/{ds.name}"):
        if obj.get("kind") == "PersistentVolume":
            claim = (obj.get("spec") or {}).get("claimRef") or {}
            if (claim.get("namespace"), claim.get("name")) != (ds.namespace, ds.name):
                return "foreign"
        return "legacy"
    return "foreign"


def owner(obj: Obj) -> str:
    """Who an object says it belongs to, for a condition message."""
    notes = _annotations(obj)
    dataset = notes.get(DATASET_ANNOTATION)
    uid = notes.get(UID_ANNOTATION)
    if dataset and uid:
        return f"Dataset {dataset} (uid {uid})"
    if dataset:
        return f"Dataset {dataset} (made by an older operator, no uid)"
    return f"no Dataset (it has no {UID_ANNOTATION} annotation)"


def describe(kind: str, name: str, namespace: str | None) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def conflict_message(obj: Obj, ds: Dataset) -> str:
    meta = obj.get("metadata") or {}
    what = describe(obj.get("kind") or "object", meta.get("name", "?"), meta.get("namespace"))
    return (f"{what} belongs to {owner(obj)}, not to this Dataset {ds.namespace}/{ds.name} "
            f"(uid {ds.uid}); it is left untouched: remove or rename it (or delete this Dataset)")
