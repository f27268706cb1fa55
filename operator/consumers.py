"""``status.consumers``: the pods that read the most through a Dataset, all nodes together.

Each worker reports served bytes per consumer (its top 20 by bytes and an ``other`` sum,
cache_worker/consumers.py); the operator adds them up by (namespace, pod) over the workers that
answered this collection and keeps the top :data:`TOP` by bytes. ``other`` is not a consumer and
is left out (it mixes different pods on different nodes). When no worker answered, the last list
is kept (``status.stale`` says the figures are old), as every other figure is.

Workers save per-consumer counts with their other counters, so a restart continues them; a
new cache directory (a ``Memory`` cache's tmpfs goes with its pod) starts them afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datahoard.stats import WorkerStats

#: Consumers shown in status.
TOP = 5
OTHER = "other"


def consumers_status(stats: Mapping[str, WorkerStats | str], old: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The top :data:`TOP` consumers by bytes, each ``{namespace, pod, bytes, hitRatio}``."""
    good = [s for s in stats.values() if isinstance(s, WorkerStats)]
    if not good:
        return list(old.get("consumers") or [])
    totals: dict[tuple[str, str], list[int]] = {}
    for st in good:
        for c in st.consumers:
            if c.pod == OTHER and not c.namespace:
                continue
            sums = totals.setdefault((c.namespace, c.pod), [0, 0])
            sums[0] += c.served_from_cache_bytes
            sums[1] += c.served_bytes
    ranked = sorted(totals.items(), key=lambda item: (-item[1][1], item[0]))[:TOP]
    return [{"namespace": ns, "pod": pod, "bytes": served,
             "hitRatio": f"{cache / served:.3f}"}
            for (ns, pod), (cache, served) in ranked if served]
