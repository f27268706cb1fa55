"""The only module that calls the Kubernetes API.

It owns idempotency and the retry policy: creating something that exists (409) and deleting
something that is gone (404) are successes, and every other API failure -- including an
unreachable API server -- becomes one :class:`kopf.TemporaryError`, so handlers retry later
instead of crashing. Objects go in and come out as plain camelCase dicts (what builders make and
what tests compare), never as the client's generated model classes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import kopf
import kubernetes
import urllib3
from kubernetes.client import ApiException

FIELD_MANAGER = "datahoard-operator"
#: Retry delay after an API failure: short enough to recover quickly from an API server
#: restart, long enough not to hammer one that is overloaded.
RETRY_DELAY = 10.0
#: Client-side timeout for one request (connect, read); the default is to wait forever.
REQUEST_TIMEOUT = (5, 30)

T = TypeVar("T")
Obj = dict[str, Any]


def _api_call(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn API failures into TemporaryError, with the operation named in the message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise kopf.TemporaryError(
                f"Kubernetes API {fn.__name__} failed: {exc.status} {exc.reason}: "
                f"{_message(exc)}", delay=RETRY_DELAY) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise kopf.TemporaryError(f"Kubernetes API unreachable during {fn.__name__}: {exc}",
                                      delay=RETRY_DELAY) from exc

    return wrapper


def _message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")


def load_client() -> kubernetes.client.ApiClient:
    """In a pod: its ServiceAccount; elsewhere: $KUBECONFIG / ~/.kube/config (as kopf does)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


class Kube:
    """Typed-API calls used by the operator, on one shared ApiClient."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.networking = kubernetes.client.NetworkingV1Api(client)

    def _dict(self, obj: Any) -> Obj:
        return self.client.sanitize_for_serialization(obj)

    # -- reads ---------------------------------------------------------------------------------

    @_api_call
    def nodes_with_label(self, key: str) -> list[str]:
        nodes = self.core.list_node(label_selector=key, _request_timeout=REQUEST_TIMEOUT).items
        return sorted(n.metadata.name for n in nodes)

    @_api_call
    def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's base64 data, or None when it does not exist."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace,
                                                      _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(secret.data or {})

    @_api_call
    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector,
                                             _request_timeout=REQUEST_TIMEOUT).items
        return [self._dict(p) for p in pods]

    @_api_call
    def pods_using_claim(self, namespace: str, claim: str) -> list[str]:
        """Pods in ``namespace`` that mount ``claim`` and have not finished."""
        users = []
        for pod in self.core.list_namespaced_pod(namespace, _request_timeout=REQUEST_TIMEOUT).items:
            if pod.status and pod.status.phase in ("Succeeded", "Failed"):
                continue
            for vol in pod.spec.volumes or []:
                if vol.persistent_volume_claim and vol.persistent_volume_claim.claim_name == claim:
                    users.append(pod.metadata.name)
                    break
        return sorted(users)

    @_api_call
    def read(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """One object as a dict, or None when it does not exist (ownership checks read it
        before every write and delete)."""
        read = {
            "PersistentVolume": lambda: self.core.read_persistent_volume(
                name, _request_timeout=REQUEST_TIMEOUT),
            "PersistentVolumeClaim": lambda: self.core.read_namespaced_persistent_volume_claim(
                name, namespace, _request_timeout=REQUEST_TIMEOUT),
            "DaemonSet": lambda: self.apps.read_namespaced_daemon_set(
                name, namespace, _request_timeout=REQUEST_TIMEOUT),
            "Secret": lambda: self.core.read_namespaced_secret(
                name, namespace, _request_timeout=REQUEST_TIMEOUT),
            "ConfigMap": lambda: self.core.read_namespaced_config_map(
                name, namespace, _request_timeout=REQUEST_TIMEOUT),
            "NetworkPolicy": lambda: self.networking.read_namespaced_network_policy(
                name, namespace, _request_timeout=REQUEST_TIMEOUT),
        }[kind]
        try:
            obj = read()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        out = self._dict(obj)
        out.setdefault("kind", kind)
        if kind == "Secret":
            out.pop("data", None)  # a Secret's values are never needed for an ownership check
        return out

    # -- writes --------------------------------------------------------------------------------

    @_api_call
    def apply(self, manifest: Obj) -> None:
        """Server-side apply: create or converge, owning exactly the fields we set."""
        kind, meta = manifest["kind"], manifest["metadata"]
        kwargs = dict(field_manager=FIELD_MANAGER, force=True,
                      _content_type="application/apply-patch+yaml",
                      _request_timeout=REQUEST_TIMEOUT)
        if kind == "DaemonSet":
            self.apps.patch_namespaced_daemon_set(meta["name"], meta["namespace"], manifest, **kwargs)
        elif kind == "Secret":
            self.core.patch_namespaced_secret(meta["name"], meta["namespace"], manifest, **kwargs)
        elif kind == "ConfigMap":
            self.core.patch_namespaced_config_map(meta["name"], meta["namespace"], manifest, **kwargs)
        elif kind == "NetworkPolicy":
            self.networking.patch_namespaced_network_policy(meta["name"], meta["namespace"], manifest, **kwargs)
        else:
            raise ValueError(f"apply() does not handle {kind}")

    @_api_call
    def create(self, manifest: Obj) -> bool:
        """Create; an existing object (409) is success. Returns whether it was created now."""
        kind, meta = manifest["kind"], manifest["metadata"]
        try:
            if kind == "PersistentVolume":
                self.core.create_persistent_volume(manifest, _request_timeout=REQUEST_TIMEOUT)
            elif kind == "PersistentVolumeClaim":
                self.core.create_namespaced_persistent_volume_claim(
                    meta["namespace"], manifest, _request_timeout=REQUEST_TIMEOUT)
            elif kind == "Job":
                self.batch.create_namespaced_job(meta["namespace"], manifest,
                                                 _request_timeout=REQUEST_TIMEOUT)
            else:
                raise ValueError(f"create() does not handle {kind}")
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    #: Namespaced kinds delete() takes: (API group client attribute, its delete method).
    _NAMESPACED_DELETE = {
        "PersistentVolumeClaim": ("core", "delete_namespaced_persistent_volume_claim"),
        "DaemonSet": ("apps", "delete_namespaced_daemon_set"),
        "Secret": ("core", "delete_namespaced_secret"),
        "ConfigMap": ("core", "delete_namespaced_config_map"),
        "NetworkPolicy": ("networking", "delete_namespaced_network_policy"),
        "Pod": ("core", "delete_namespaced_pod"),
    }

    @_api_call
    def delete(self, kind: str, name: str, namespace: str | None = None,
               uid: str | None = None) -> None:
        """Delete in the background; an object that is already gone (404) is success.

        With ``uid``, only that very object: a precondition makes the API server refuse (409)
        when the name now belongs to another object, and that is success too (it is not ours)."""
        opts = kubernetes.client.V1DeleteOptions(
            propagation_policy="Background",
            preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None)
        try:
            if kind == "PersistentVolume":  # the one cluster-scoped kind
                self.core.delete_persistent_volume(name, body=opts, _request_timeout=REQUEST_TIMEOUT)
            else:
                api, method = self._NAMESPACED_DELETE.get(kind, (None, ""))
                if api is None:
                    raise ValueError(f"delete() does not handle {kind}")
                getattr(getattr(self, api), method)(name, namespace, body=opts, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404 or (uid and exc.status == 409):
                return
            raise

    @_api_call
    def patch_node(self, name: str, patch: Obj) -> None:
        """Merge-patch a node (labels); a node that is gone needs no label changes."""
        try:
            self.core.patch_node(name, patch, _content_type="application/merge-patch+json",
                                 _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise

    @_api_call
    def patch_pod(self, namespace: str, name: str, patch: Obj) -> bool:
        """Strategic-merge-patch a pod (the warm gate's removal, pinned by metadata.uid in the
        patch). False when the pod is gone (404) or is another pod of that name now (the API
        server refuses the uid as an immutable field: 422 on metadata.uid)."""
        try:
            self.core.patch_namespaced_pod(name, namespace, patch,
                                           _content_type="application/strategic-merge-patch+json",
                                           _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404 or (exc.status == 422 and _refused_field(exc) == "metadata.uid"):
                return False
            raise
        return True


def _refused_field(exc: ApiException) -> str | None:
    """The field an Invalid (422) answer names first, if any."""
    try:
        causes = (json.loads(exc.body).get("details") or {}).get("causes") or []
    except (TypeError, ValueError, AttributeError):
        return None
    return causes[0].get("field") if causes else None
