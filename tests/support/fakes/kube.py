"""The Kubernetes API in memory, behind the operator's :class:`~operator.kube.Kube` wrapper:
the same methods, the same dicts out, the same errors, as ``test_kube_contract.py`` checks
against a real kube-apiserver (envtest).

What it keeps from the API server:

* every object gets a ``uid``, a ``creationTimestamp`` and a ``resourceVersion`` that changes
  on every write that changes it (a no-op server-side apply or merge patch leaves it); a write
  carrying a stale ``metadata.resourceVersion`` is a 409 Conflict;
* create of an existing name is 409 (``create`` returns False), delete of a missing one 404
  (success), delete pinned to a uid the name no longer has 409 (success, not ours);
* server-side apply by one field manager: the fields of the last apply that the new one drops
  are removed, the rest merged; patch of a pod pinned to another uid is 422 on metadata.uid;
* a namespaced object in a namespace that does not exist is 404; deleting an object that has
  finalizers only marks it (``deletionTimestamp``) until they are removed. No admission
  plugins: like the test API server (tests/cluster/envtest.py disables ServiceAccount and
  StorageObjectInUseProtection), PVCs and PVs get no protection finalizers;
* an API failure is one ``kopf.TemporaryError`` with the wrapper's message.

Test-side helpers (:meth:`FakeKube.add`, ``get``, ``update``, ``remove``, ``fail_next``)
stand in for kubectl and for an API server that stops answering.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import threading
import uuid
from typing import Any

import kopf

Obj = dict[str, Any]

NAMESPACED = {"Pod", "Secret", "DaemonSet", "PersistentVolumeClaim", "Job", "ConfigMap",
              "NetworkPolicy"}
_API_VERSIONS = {"Pod": "v1", "Secret": "v1", "Node": "v1", "PersistentVolume": "v1",
                 "PersistentVolumeClaim": "v1", "Namespace": "v1", "DaemonSet": "apps/v1",
                 "Job": "batch/v1", "ConfigMap": "v1", "NetworkPolicy": "networking.k8s.io/v1"}


class ApiError(Exception):
    """What the API server answered; raised inside, surfaced as the wrapper surfaces it."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): dicts merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _strategic(base: Any, patch: Any) -> Any:
    """Strategic merge patch, for what the operator sends: lists of named items (schedulingGates,
    containers...) merge by ``name``, and ``{"$patch": "delete", "name": n}`` removes one."""
    if isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch) and (
            isinstance(base, list)):
        out = [dict(i) for i in base]
        for item in patch:
            if item.get("$patch") == "delete":
                out = [i for i in out if i.get("name") != item["name"]]
                continue
            for i, existing in enumerate(out):
                if existing.get("name") == item["name"]:
                    out[i] = _strategic(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _strategic(out.get(key), value)
    return out


def _drop_unapplied(obj: Any, before: Any, now: Any) -> Any:
    """Remove from ``obj`` what the previous apply (``before``) set and this one (``now``) does not."""
    if not isinstance(obj, dict) or not isinstance(before, dict):
        return obj
    out = dict(obj)
    for key, value in before.items():
        if not isinstance(now, dict) or key not in now:
            out.pop(key, None)
        else:
            out[key] = _drop_unapplied(out.get(key), value, now[key])
    return out


def _selects(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, _, value = term.partition("=")
            if labels.get(key.rstrip("=")) != value.lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeKube:
    """The :class:`Kube` interface over an in-memory API server; thread-safe."""

    #: The kinds each method of the real Kube dispatches on (anything else: KeyError for read,
    #: ValueError for the writes). Kept equal to Kube's by test_the_fake_takes_the_kinds_kube_takes.
    READ_KINDS = ("PersistentVolume", "PersistentVolumeClaim", "DaemonSet", "Secret", "ConfigMap",
                  "NetworkPolicy")
    APPLY_KINDS = ("DaemonSet", "Secret", "ConfigMap", "NetworkPolicy")
    CREATE_KINDS = ("PersistentVolume", "PersistentVolumeClaim", "Job")
    DELETE_KINDS = ("PersistentVolume", "PersistentVolumeClaim", "DaemonSet", "Secret", "ConfigMap",
                    "NetworkPolicy", "Pod")

    def __init__(self, namespaces: tuple[str, ...] = ("default",)) -> None:
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._applied: dict[tuple[str, str, str], Obj] = {}
        self._versions = itertools.count(1000)
        self._lock = threading.RLock()
        self._unreachable = 0
        #: Every call of the Kube interface, as (method, kind or name), for tests that need
        #: to see that something was *not* written.
        self.calls: list[tuple[str, str]] = []
        for ns in namespaces:
            self.add({"kind": "Namespace", "metadata": {"name": ns}})

    # -- the test side (what kubectl or another controller would do) ---------------------------
    def add(self, obj: Obj) -> Obj:
        """Create ``obj`` as a user would (kubectl create); returns it as stored."""
        with self._lock:
            return copy.deepcopy(self._create(copy.deepcopy(obj)))

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """The stored object, everything in it (Secret data too), or None."""
        with self._lock:
            found = self._objects.get(self._key(kind, name, namespace))
            return copy.deepcopy(found)

    def all(self, kind: str) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for (k, _, _), o in sorted(self._objects.items()) if k == kind]

    def remove_finalizers(self, kind: str, name: str, namespace: str | None = None) -> None:
        """What the controller owning a finalizer does once it is done."""
        with self._lock:
            key = self._key(kind, name, namespace)
            obj = self._objects[key]
            obj["metadata"].pop("finalizers", None)
            if obj["metadata"].get("deletionTimestamp"):
                del self._objects[key]
                self._applied.pop(key, None)

    def update(self, kind: str, name: str, namespace: str | None, patch: Obj) -> None:
        """Merge-patch a stored object as a user would (kubectl patch --type merge)."""
        with self._lock:
            key = self._key(kind, name, namespace)
            self._replace(key, self._objects[key], _merge(self._objects[key], patch))

    def remove(self, kind: str, name: str, namespace: str | None = None) -> None:
        """The object goes, as when its controller deletes it (a pod exiting, say)."""
        with self._lock:
            key = self._key(kind, name, namespace)
            self._objects.pop(key, None)
            self._applied.pop(key, None)

    def fail_next(self, times: int = 1) -> None:
        """The next ``times`` calls find the API server unreachable."""
        with self._lock:
            self._unreachable += times

    # -- the Kube interface ----------------------------------------------------------------------
    def nodes_with_label(self, key: str) -> list[str]:
        with self._call("nodes_with_label", key):
            return sorted(o["metadata"]["name"] for o in self._kind("Node")
                          if _selects(key, o["metadata"].get("labels") or {}))

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        with self._call("read_secret_data", name):
            found = self._objects.get(self._key("Secret", name, namespace))
            return None if found is None else dict(found.get("data") or {})

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        with self._call("list_pods", selector):
            return [copy.deepcopy(o) for o in self._kind("Pod", namespace)
                    if _selects(selector, o["metadata"].get("labels") or {})]

    def pods_using_claim(self, namespace: str, claim: str) -> list[str]:
        with self._call("pods_using_claim", claim):
            users = []
            for pod in self._kind("Pod", namespace):
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                if any((v.get("persistentVolumeClaim") or {}).get("claimName") == claim
                       for v in (pod.get("spec") or {}).get("volumes") or []):
                    users.append(pod["metadata"]["name"])
            return sorted(users)

    def read(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        if kind not in self.READ_KINDS:
            raise KeyError(kind)
        with self._call("read", kind):
            found = self._objects.get(self._key(kind, name, namespace))
            if found is None:
                return None
            out = copy.deepcopy(found)
            if kind == "Secret":
                out.pop("data", None)  # as Kube: values are never needed for an ownership check
            return out

    def apply(self, manifest: Obj) -> None:
        kind = manifest["kind"]
        if kind not in self.APPLY_KINDS:
            raise ValueError(f"apply() does not handle {kind}")
        with self._call("apply", kind):
            meta = manifest["metadata"]
            key = self._key(kind, meta["name"], meta.get("namespace"))
            current = self._objects.get(key)
            if current is None:
                self._create(copy.deepcopy(manifest))
            else:
                self._check_version(current, manifest)
                base = _drop_unapplied(current, self._applied.get(key), manifest)
                self._replace(key, current, _merge(base, _without_version(manifest)))
            self._applied[key] = copy.deepcopy(_without_version(manifest))

    def create(self, manifest: Obj) -> bool:
        kind = manifest["kind"]
        if kind not in self.CREATE_KINDS:
            raise ValueError(f"create() does not handle {kind}")
        with self._call("create", kind):
            meta = manifest["metadata"]
            if self._key(kind, meta["name"], meta.get("namespace")) in self._objects:
                return False
            self._create(copy.deepcopy(manifest))
            return True

    def delete(self, kind: str, name: str, namespace: str | None = None, uid: str | None = None) -> None:
        if kind not in self.DELETE_KINDS:
            raise ValueError(f"delete() does not handle {kind}")
        with self._call("delete", kind):
            key = self._key(kind, name, namespace)
            found = self._objects.get(key)
            if found is None or (uid and found["metadata"]["uid"] != uid):
                return  # 404, or 409 on the uid precondition: not ours, success either way
            if found["metadata"].get("finalizers"):
                if not found["metadata"].get("deletionTimestamp"):
                    found["metadata"]["deletionTimestamp"] = _now()
                    self._bump(found)
                return
            del self._objects[key]
            self._applied.pop(key, None)

    def patch_node(self, name: str, patch: Obj) -> None:
        with self._call("patch_node", name):
            key = self._key("Node", name, None)
            current = self._objects.get(key)
            if current is None:
                return
            self._check_version(current, patch)
            self._replace(key, current, _merge(current, _without_version(patch)))

    def patch_pod(self, namespace: str, name: str, patch: Obj) -> bool:
        with self._call("patch_pod", name):
            key = self._key("Pod", name, namespace)
            current = self._objects.get(key)
            if current is None:
                return False
            uid = (patch.get("metadata") or {}).get("uid")
            if uid and uid != current["metadata"]["uid"]:
                return False  # 422 Invalid on metadata.uid: another pod of that name now
            self._check_version(current, patch)
            self._replace(key, current, _strategic(current, _without_version(patch)))
            return True

    # -- inside ----------------------------------------------------------------------------------
    def _call(self, method: str, what: str):
        fake = self

        class _Call:
            def __enter__(self) -> None:
                fake._lock.acquire()
                fake.calls.append((method, what))
                if fake._unreachable:
                    fake._unreachable -= 1
                    fake._lock.release()
                    raise kopf.TemporaryError(
                        f"Kubernetes API unreachable during {method}: [Errno 111] Connection refused",
                        delay=10.0)

            def __exit__(self, exc_type, exc, tb) -> None:
                fake._lock.release()
                if isinstance(exc, ApiError):
                    raise kopf.TemporaryError(
                        f"Kubernetes API {method} failed: {exc.status} {exc.reason}: {exc.message}",
                        delay=10.0) from exc

        return _Call()

    @staticmethod
    def _key(kind: str, name: str, namespace: str | None) -> tuple[str, str, str]:
        return kind, (namespace or "") if kind in NAMESPACED else "", name

    def _kind(self, kind: str, namespace: str | None = None) -> list[Obj]:
        return [o for (k, ns, _), o in sorted(self._objects.items())
                if k == kind and (namespace is None or ns == namespace)]

    def _bump(self, obj: Obj) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def _create(self, obj: Obj) -> Obj:
        kind, meta = obj["kind"], obj.setdefault("metadata", {})
        key = self._key(kind, meta["name"], meta.get("namespace"))
        if kind in NAMESPACED:
            if not meta.get("namespace"):
                raise ApiError(400, "Bad Request", "the namespace of the object does not match")
            if self._key("Namespace", meta["namespace"], None) not in self._objects:
                raise ApiError(404, "Not Found", f'namespaces "{meta["namespace"]}" not found')
        else:
            meta.pop("namespace", None)
        if key in self._objects:
            raise ApiError(409, "Conflict", f'{kind.lower()}s "{meta["name"]}" already exists')
        obj.setdefault("apiVersion", _API_VERSIONS.get(kind, "v1"))
        meta.pop("resourceVersion", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        self._bump(obj)
        self._objects[key] = obj
        return obj

    def _check_version(self, current: Obj, incoming: Obj) -> None:
        wanted = (incoming.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            kind, name = current["kind"], current["metadata"]["name"]
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {kind.lower()}s "{name}": the object '
                           "has been modified; please apply your changes to the latest version and try again")

    def _replace(self, key: tuple[str, str, str], current: Obj, new: Obj) -> None:
        # Identity and bookkeeping are the server's, whatever the patch said.
        new["metadata"] = {**new.get("metadata", {}),
                           **{k: current["metadata"][k] for k in
                              ("uid", "creationTimestamp", "resourceVersion", "name")
                              if k in current["metadata"]}}
        if "namespace" in current["metadata"]:
            new["metadata"]["namespace"] = current["metadata"]["namespace"]
        if new == current:
            return  # a no-op write does not change resourceVersion
        self._bump(new)
        self._objects[key] = new


def _without_version(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    (out.get("metadata") or {}).pop("resourceVersion", None)
    return out
