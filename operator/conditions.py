"""The status conditions a reconcile pass sets: their types, which reasons need a person, and
the accumulator one pass writes them through.

Shared by :mod:`.converge`, the status assembly in :mod:`.reconcile` and the kopf handlers
(which set Reconciled and DeletionBlocked, and turn problem reasons into Warning Events), so it
lives apart from all of them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from .status import set_condition

#: Condition types, in the order a person reads them.
SPEC_VALID = "SpecValid"
NODES_SELECTED = "NodesSelected"
CREDENTIALS_READY = "CredentialsReady"
WORKERS_READY = "WorkersReady"
VOLUME_READY = "VolumeReady"
OBJECTS_OWNED = "ObjectsOwned"
DELETION_BLOCKED = "DeletionBlocked"
RECONCILED = "Reconciled"
STATS_CURRENT = "StatsCurrent"
CACHED = "Cached"
#: Condition reasons that need a person: they also become Warning Events (once, on change).
#: Others (waiting for a worker, workers still starting) are normal progress.
PROBLEMS = {"InvalidSpec", "NoMatchingNodes", "SecretNotFound", "SecretKeyMissing", "Degraded",
            "APIError", "NameConflict", "NodeIdentityForbidden", "EndpointForbidden",
            "NamespaceNotServed", "PlacementForbidden", "StaleStats", "AllStale", "CapacityBound",
            "WorkerFailing", "RefreshOff"}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Conditions:
    """Accumulates condition changes against the stored list, for one reconcile."""

    items: list[dict[str, Any]]
    generation: int
    time: str = field(default_factory=now)

    def set(self, type_: str, ok: bool, reason: str, message: str) -> None:
        self.items = set_condition(self.items, type_, ok, reason, message, self.generation, self.time)
