"""Ownership checks against the live cluster, for one pass: what may be written or deleted.

:mod:`.ownership` decides on one object (pure); :class:`Owned` reads the object first and
remembers every refusal for the ObjectsOwned condition. Converge, the snapshot step and
finalize all go through it, so none of them writes or deletes another tenant's object.
:func:`volume_name` is here because which PV is a Dataset's depends on who owns the PVC and PV
that already exist.
"""

from __future__ import annotations

from typing import Any

from datahoard import names
from datahoard.api import Dataset

from . import ownership
from .kube import Kube


class Owned:
    """Ownership checks for one pass: every write and delete of a named object goes through
    :meth:`mine` first, and every refusal is remembered for the ObjectsOwned condition."""

    def __init__(self, ds: Dataset, kube: Kube) -> None:
        self.ds, self.kube = ds, kube
        self.conflicts: list[str] = []

    def mine(self, kind: str, name: str, namespace: str | None, legacy: str | None = None
             ) -> tuple[bool, dict[str, Any] | None]:
        """(may we write ``name``, the object as it is now or None). A foreign object is
        recorded as a conflict and must be left alone."""
        obj = self.kube.read(kind, name, namespace)
        if obj is None or ownership.verdict(obj, self.ds, legacy) != "foreign":
            return True, obj
        self.conflicts.append(ownership.conflict_message(obj, self.ds))
        return False, obj

    def delete(self, kind: str, name: str, namespace: str | None, legacy: str | None = None,
               quiet: bool = False) -> bool:
        """Delete ``name`` only if it is ours (or legacy-ours at ``legacy``), pinned to its uid.
        ``quiet``: a foreign object here is no conflict (a legacy name someone else holds)."""
        obj = self.kube.read(kind, name, namespace)
        if obj is None:
            return True
        if ownership.verdict(obj, self.ds, legacy) == "foreign":
            if not quiet:
                self.conflicts.append(ownership.conflict_message(obj, self.ds))
            return False
        self.kube.delete(kind, name, namespace, uid=obj["metadata"].get("uid"))
        return True


def volume_name(ds: Dataset, kube: Kube) -> str:
    """The PV this Dataset's PVC uses: the new name, or the 0.1.x one a PVC of this Dataset is
    already bound to (a PVC's volumeName is immutable, so upgrades keep it until deletion)."""
    pvc = kube.read("PersistentVolumeClaim", ds.name, ds.namespace)
    legacy = names.legacy_pv_name(ds.namespace, ds.name)
    if pvc is not None and ownership.verdict(pvc, ds) == "ours" and (
            (pvc.get("spec") or {}).get("volumeName") == legacy):
        pv = kube.read("PersistentVolume", legacy)
        if pv is not None and ownership.verdict(pv, ds, legacy) != "foreign":
            return legacy
    return names.pv_name(ds.namespace, ds.name)
