"""kopf handlers: parse, call :mod:`.reconcile` or :mod:`.finalize`, write ``status``, post Events.
Nothing else.

Run with ``kopf run --all-namespaces --standalone -m datahoard.operator.handlers`` (the chart
does). Datasets are reconciled by one timer per object: kopf starts it as soon as it sees the
Dataset (no initial delay), including every existing Dataset after an operator restart, so
creation, spec changes, node changes and restarts all go through the same level-triggered pass
(at most ``DATAHOARD_INTERVAL`` seconds apart). Deletion is a real delete handler, because it
must block behind a finalizer until the volume is unused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from datahoard import names

from . import metrics, refresh
from .config import OperatorSettings
from .kube import Kube, load_client
from .conditions import DELETION_BLOCKED, PROBLEMS, RECONCILED, SPEC_VALID, Conditions
from .finalize import Blocked, finalize
from .reconcile import reconcile

#: Read once at import: the timer interval is fixed when the handler is registered.
CONFIG = OperatorSettings()
RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own names for kopf's bookkeeping, so it is clear who put them on the object.
    settings.persistence.finalizer = f"{names.GROUP}/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration")
    # Events are for people: ours, not one per log line.
    settings.posting.level = logging.WARNING
    # Notice a dead or restarted API server within a minute instead of hanging on a stream.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # kopf re-opens a watch stream after its retries run out, so an outage of any length is
    # survived; capping each wait at 10 s (instead of 21 s) resumes work soon after it ends.
    settings.networking.error_backoffs = (1, 2, 3, 5, 10, 10, 10, 10)
    # A Dataset deleted mid-reconcile waits for that pass to end before its finalizer goes; poll
    # for that every 2 s rather than kopf's default 60 s.
    settings.background.cancellation_polling = 2
    # The client logs whole response bodies at DEBUG, Secrets included: never let it.
    logging.getLogger("kubernetes.client.rest").setLevel(logging.INFO)
    memo.kube = Kube(load_client())
    memo.config = CONFIG
    try:
        metrics.serve(CONFIG.metrics_port)
    except OSError as exc:  # the Datasets matter more than the operator's own metrics
        logging.getLogger(__name__).error(
            "cannot serve /metrics on port %s (%s): running without; set DATAHOARD_METRICS_PORT "
            "(chart: operator.metricsPort) to a free port, or 0", CONFIG.metrics_port, exc)


@kopf.on.probe(id="ok")
def alive(**_: Any) -> bool:
    return True


def _post_transitions(body: kopf.Body, old: list[Mapping[str, Any]], new: list[Mapping[str, Any]],
                      old_phase: str | None, new_phase: str | None) -> None:
    """A Warning Event when a problem condition appears (or changes reason); one on every phase
    change (Warning into Degraded or Failed, Normal otherwise)."""
    before = {c.get("type"): c for c in old}
    for cond in new:
        prev = before.get(cond.get("type")) or {}
        if (cond.get("status") == "False" and cond.get("reason") in PROBLEMS
                and (prev.get("status") != "False" or prev.get("reason") != cond.get("reason"))):
            kopf.warn(body, reason=cond.get("reason", "Problem"), message=cond.get("message", ""))
    if new_phase != old_phase and new_phase:
        kopf.event(body, type="Warning" if new_phase in ("Degraded", "Failed") else "Normal",
                   reason=new_phase, message=f"Dataset is {new_phase} (was {old_phase or 'new'})")


@kopf.index("v1", "nodes")
def node_index(name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
               **_: Any) -> dict[str, dict[str, Any]]:
    """What placement needs of every Node, kept current by kopf's watch (one per operator,
    instead of one full node list per Dataset per pass)."""
    return {name: {
        "metadata": {"name": name, "labels": dict(meta.get("labels") or {}),
                     "deletionTimestamp": meta.get("deletionTimestamp")},
        "spec": {"taints": list(spec.get("taints") or []),
                 "unschedulable": spec.get("unschedulable", False)},
        "status": {"allocatable": dict(status.get("allocatable") or {})},
    }}


@kopf.timer(*RESOURCE, id="reconcile", interval=CONFIG.interval)
async def reconcile_timer(body: kopf.Body, status: kopf.Status, patch: kopf.Patch,
                          memo: kopf.Memo, node_index: kopf.Index, **_: Any) -> None:
    """Converge workers, labels and volumes, then write sizes, ratios, phase and conditions."""
    if body.get("metadata", {}).get("deletionTimestamp"):
        return  # the delete handler owns the object now; do not re-create what it removes
    nodes = [node for store in node_index.values() for node in store]
    old_conditions = list(status.get("conditions") or [])
    ds_key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    try:
        new = await reconcile(body, nodes, memo.kube, memo.config)
    except Exception as exc:
        metrics.RECONCILE_ERRORS.labels(type(exc).__name__).inc()
        if not isinstance(exc, kopf.TemporaryError):
            raise
        # Say so where people look (`kubectl describe`), then let kopf retry after the delay.
        conds = Conditions(old_conditions, body["metadata"].get("generation", 0))
        conds.set(RECONCILED, False, "APIError", str(exc))
        patch.status["conditions"] = conds.items
        raise
    conds = Conditions(new.get("conditions") or [], body["metadata"].get("generation", 0))
    conds.set(RECONCILED, True, "Reconciled", "workers, labels and volumes match the spec")
    # An invalid spec was not reconciled (nothing was touched); a Dataset Failed because its
    # workers fail was.
    if not any(c.get("type") == SPEC_VALID and c.get("status") == "False" for c in new.get("conditions") or []):
        new["conditions"] = conds.items
    for key, value in new.items():
        patch.status[key] = value
    metrics.DATASETS.set(ds_key, new.get("phase"))
    _post_transitions(body, old_conditions, new.get("conditions") or [], status.get("phase"),
                      new.get("phase"))
    for type_, reason, message in refresh.events(status.get("refresh"), new.get("refresh")):
        kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.delete(*RESOURCE, id="cleanup")
async def cleanup(body: kopf.Body, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch,
                  memo: kopf.Memo, **_: Any) -> None:
    """Wait until nothing uses the volume, then remove what the Dataset made."""
    key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    try:
        await asyncio.to_thread(finalize, body, memo.kube, memo.config)
        metrics.DATASETS.set(key, None)
    except Blocked as exc:
        metrics.DATASETS.set(key, "Terminating")
        conds = Conditions(list(status.get("conditions") or []), meta.get("generation", 0))
        conds.set(DELETION_BLOCKED, True, exc.reason, exc.message)
        patch.status["phase"] = "Terminating"
        patch.status["conditions"] = conds.items
        raise kopf.TemporaryError(exc.message, delay=memo.config.delete_poll) from exc


# The warm gate's handlers (pods gated by datahoard.io/warm) register themselves on import.
from . import gate_handlers  # noqa: E402,F401
