"""Why a worker pod does not come up, in one short line, from what the kubelet put in its status.

A worker that cannot list its source (endpoint refused or blackholed, credentials rejected)
exits, and the kubelet restarts it with a growing back-off: without this, the Dataset only
said "<node>: worker not ready" and the reason was in the worker's log alone. The worker writes
its fatal error to its termination message (datahoard/cli.py, ``DATAHOARD_TERMINATION_LOG``);
with ``terminationMessagePolicy: FallbackToLogsOnError`` the kubelet uses the log's tail when
the worker died before writing one (a traceback). Either way the useful line is the last one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Longest text one node contributes to a condition: a condition lists up to ten nodes, and
#: Events are read in one line of ``kubectl describe``.
MAX_CHARS = 300
#: What the worker's CLI puts before an error on stderr (a log-tail fallback still carries it).
_CLI_PREFIX = "datahoard: error: "
#: Waiting reasons that are progress, not a problem.
_STARTING = {"ContainerCreating", "PodInitializing", "CrashLoopBackOff"}


def _trim(text: str, limit: int = MAX_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def last_line(message: str) -> str:
    """The line that says why: the last non-empty one, without the CLI's prefix."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    at = line.find(_CLI_PREFIX)
    return line[at + len(_CLI_PREFIX):] if at >= 0 else line


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"


def _container(pod: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") == name), statuses[0] if statuses else None)


def _memory_limit(pod: Mapping[str, Any], name: str) -> str:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == name:
            return str(((c.get("resources") or {}).get("limits") or {}).get("memory", "unknown"))
    return "unknown"


def worker_failure(pod: Mapping[str, Any], container: str = "worker") -> str | None:
    """Why ``container`` in ``pod`` is not running well, or None when nothing says it failed.

    A container that exited (now, or before its last restart) gives its termination message's
    last line, or its exit reason and code and where to read its log; one the kubelet cannot
    start (image pull, a missing Secret key) gives the kubelet's reason and message. A worker
    still starting, running and ready, stopped cleanly (exit 0) or being deleted gives None.
    """
    status = _container(pod, container)
    if status is None or status.get("ready") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None  # a pod on its way out (a rollout, a node drained) stops as it should
    state, last = status.get("state") or {}, status.get("lastState") or {}
    restarts = int(status.get("restartCount") or 0)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") and waiting["reason"] not in _STARTING:
        return _trim(f"worker cannot start: {waiting['reason']}: {waiting.get('message') or ''}".rstrip(": "))
    ended = state.get("terminated") or last.get("terminated")
    if not ended or ended.get("exitCode") == 0:
        return None  # exit 0 is a clean stop (its view was unmounted), not a failure
    why = last_line(ended.get("message") or "")
    if ended.get("reason") == "OOMKilled":
        # The log's tail says nothing about it; the limit is what to change.
        limit = _memory_limit(pod, container)
        why = (f"worker killed for memory (OOMKilled at its limit {limit}); raise "
               "worker.resources.limits.memory in the chart's values")
    elif not why:
        meta = pod.get("metadata") or {}
        code, reason = ended.get("exitCode"), ended.get("reason") or "Error"
        why = (f"worker exited ({reason}, code {code}); see kubectl logs -n "
               f"{meta.get('namespace', '')} {meta.get('name', '')} --previous")
    after = f" (worker restarted {_times(restarts)})" if restarts else " (worker exited)"
    return _trim(why, MAX_CHARS - len(after)) + after
