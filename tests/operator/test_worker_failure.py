"""A worker pod's container status, as the kubelet writes it, into one line for WorkersReady
(operator/failures.py): the worker's own termination message, the log tail the kubelet falls
back to, an OOM kill, a container the kubelet cannot start, and a worker merely starting."""

from __future__ import annotations

from typing import Any

import pytest

from datahoard.operator import failures
from datahoard.operator.status import WorkerPod

REFUSED = ("cannot reach S3 endpoint http://10.0.0.9:9000 for s3://bucket/prefix/: "
           "connection refused")


def pod(state: dict[str, Any], last: dict[str, Any] | None = None, restarts: int = 0,
        ready: bool = False, phase: str = "Running") -> dict[str, Any]:
    """A worker pod in the shape the kubelet reports (one container, named ``worker``)."""
    return {
        "metadata": {"name": "dh-ml-d-x7k2p", "namespace": "datahoard-system"},
        "spec": {"nodeName": "node-1", "containers": [
            {"name": "worker", "resources": {"limits": {"memory": "4Gi"}}}]},
        "status": {
            "phase": phase, "podIP": "10.244.0.7",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "worker", "ready": ready, "restartCount": restarts,
                                   "state": state, "lastState": last or {}}],
        },
    }


def crash_looping(message: str, restarts: int = 3, reason: str = "Error", code: int = 1) -> dict[str, Any]:
    return pod({"waiting": {"reason": "CrashLoopBackOff",
                            "message": "back-off 40s restarting failed container=worker"}},
               {"terminated": {"exitCode": code, "reason": reason, "message": message}}, restarts)


def test_a_crash_looping_worker_says_what_it_wrote() -> None:
    p = WorkerPod.from_pod(crash_looping(REFUSED + "\n"))
    assert not p.ready
    assert p.failure == f"{REFUSED} (worker restarted 3 times)"


def test_the_log_tail_fallback_gives_its_last_line_without_the_cli_prefix() -> None:
    tail = ("2026-12-06 02:31:07 INFO datahoard: listing s3://bucket/prefix/\n"
            f"datahoard: error: {REFUSED}\n\n")
    assert failures.worker_failure(crash_looping(tail, restarts=1)) == (
        f"{REFUSED} (worker restarted 1 time)")


def test_a_worker_that_just_exited_before_its_first_restart() -> None:
    p = pod({"terminated": {"exitCode": 1, "reason": "Error", "message": REFUSED}})
    assert failures.worker_failure(p) == f"{REFUSED} (worker exited)"


def test_a_running_worker_still_listing_after_a_crash_keeps_the_last_reason() -> None:
    # Between two crash-loop rounds the container runs (not ready) for a second or two: the
    # reason must not flip to "not ready" and back, or every round would post a new Event.
    p = pod({"running": {"startedAt": "2026-12-06T02:31:07Z"}},
            {"terminated": {"exitCode": 1, "reason": "Error", "message": REFUSED}}, restarts=2)
    assert failures.worker_failure(p) == f"{REFUSED} (worker restarted 2 times)"


def test_long_messages_are_cut_but_keep_the_restart_count() -> None:
    got = failures.worker_failure(crash_looping("x" * 5000, restarts=12))
    assert got is not None and len(got) <= failures.MAX_CHARS
    assert got.endswith("… (worker restarted 12 times)")


def test_no_message_names_the_exit_and_where_the_log_is() -> None:
    got = failures.worker_failure(crash_looping("", code=2))
    assert got == ("worker exited (Error, code 2); see kubectl logs -n datahoard-system "
                   "dh-ml-d-x7k2p --previous (worker restarted 3 times)")


def test_an_oom_kill_names_the_limit_to_raise() -> None:
    got = failures.worker_failure(crash_looping("INFO fetched 1000 objects", reason="OOMKilled", code=137))
    assert got is not None and "OOMKilled at its limit 4Gi" in got
    assert "worker.resources.limits.memory" in got


@pytest.mark.parametrize("reason, message", [
    ("CreateContainerConfigError", 'couldn\'t find key AWS_SECRET_ACCESS_KEY in Secret datahoard-system/dh-ml-d'),
    ("ImagePullBackOff", 'Back-off pulling image "registry.example/datahoard:0.1.0"'),
])
def test_a_container_the_kubelet_cannot_start(reason: str, message: str) -> None:
    got = failures.worker_failure(pod({"waiting": {"reason": reason, "message": message}}, phase="Pending"))
    assert got == f"worker cannot start: {reason}: {message}"


@pytest.mark.parametrize("state, last, ready", [
    ({"waiting": {"reason": "ContainerCreating"}}, None, False),
    ({"running": {"startedAt": "2026-12-06T02:31:07Z"}}, None, False),
    # Ready again after a crash: the old termination is history, not a problem.
    ({"running": {"startedAt": "2026-12-06T02:31:07Z"}},
     {"terminated": {"exitCode": 1, "reason": "Error", "message": REFUSED}}, True),
])
def test_a_starting_or_ready_worker_has_no_failure(state: dict, last: dict | None, ready: bool) -> None:
    assert WorkerPod.from_pod(pod(state, last, restarts=1 if last else 0, ready=ready)).failure is None


def test_a_clean_exit_or_a_pod_being_deleted_is_no_failure() -> None:
    # A rolling update or a drained node stops the worker on purpose; its exit is no problem.
    clean = pod({"terminated": {"exitCode": 0, "reason": "Completed", "message": ""}})
    assert failures.worker_failure(clean) is None
    deleting = crash_looping(REFUSED)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-06T02:31:07Z"
    assert failures.worker_failure(deleting) is None


def test_a_pod_without_container_statuses_yet() -> None:
    p = pod({})
    del p["status"]["containerStatuses"]
    assert failures.worker_failure(p) is None
