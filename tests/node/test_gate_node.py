"""The warm gate on a real node (issue 15, part 4; tests/cluster/test_gate.py is the same against
envtest with workers' stats played by the test): examples/pytorchjob-warm-gate.yaml, adapted only
by image and names, is applied for a Dataset that is still warming. Its pod stays SchedulingGated
while the real worker's cache is below the example's 80%, the operator removes the gate once the
worker reports 80%, the real scheduler places the pod and the job Succeeds; a Dataset whose
capacity can never hold 80% gives the pod a Warning Event and the gate stays.

Runs before test_user_path.py (file order): that module's last test uninstalls the chart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.support.faults import Fault, FaultProxy
from tests.support.nodekube import (HOST_IP, REPO, Kube, eventually, local_image, master_only, pod_events,
                                    run_pytorchjob)

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

NS = "warm-gate"
GATE = "datahoard.io/warm"
#: Objects the store holds back (tests.support.faults): each GET waits until the test has seen the
#: pod gated below the threshold with its Event, else 25 s and a 503 SlowDown, which the worker
#: retries (5 attempts: about two minutes of window, however late the worker reports). Two of the
#: six directories, about a third of the bytes, so the cache stays under 80% meanwhile. A
#: bandwidth limit was not enough: on a loaded machine the worker reported its first bytes at
#: 94%; a hold released after 20 s was not either: one run's worker reported only after 40 s.
HELD = ("/n00000004/", "/n00000005/")
EXAMPLE = REPO / "examples" / "pytorchjob-warm-gate.yaml"


def dataset_manifest(endpoint: str, name: str, capacity: str = "200Gi") -> str:
    """examples/dataset.yaml with the test's S3 endpoint, a name and a capacity."""
    text = (REPO / "examples" / "dataset.yaml").read_text()
    body = yaml.safe_load(text.replace("http://minio.minio:9000", endpoint))
    assert body["spec"]["warm"]["policy"] == "Eager" and body["spec"]["cache"]["capacity"] == "200Gi"
    body["metadata"]["name"] = name
    body["spec"]["cache"]["capacity"] = capacity
    return yaml.safe_dump(body)


def gated_job(name: str, claim: str) -> str:
    """The example PyTorchJob (Master only: there is no cluster DNS for a Worker's init
    container), renamed and pointed at ``claim``."""
    text = master_only(local_image(EXAMPLE.read_text()))
    assert "name: train-when-warm" in text and "claimName: imagenet" in text
    return text.replace("name: train-when-warm", f"name: {name}").replace("claimName: imagenet",
                                                                         f"claimName: {claim}")


def gates(kube: Kube, pod: str) -> list[str] | None:
    """The pod's scheduling gates, None while the pod does not exist (its uid comes first, so a
    pod with no gates left gives [])."""
    out = kube("get", "pod", "-n", NS, pod, "--ignore-not-found", "-o",
               "jsonpath={.metadata.uid} {.spec.schedulingGates[*].name}")
    if not out.strip():
        return None
    return out.split()[1:]


def node_cached(kube: Kube, dataset: str) -> tuple[int, int]:
    """(the most any ready node has cached, the Dataset's total bytes), from its status."""
    status = kube.json("dataset", "-n", NS, dataset).get("status") or {}
    cached = [int(n.get("cachedBytes") or 0) for n in status.get("nodes") or [] if n.get("ready")]
    return max(cached, default=0), int(status.get("totalBytes") or 0)


@pytest.fixture(scope="module")
def namespace(gpu_node: Kube, training_operator: Kube, bridge_s3, dataset_bucket) -> Iterator[Kube]:
    kube = gpu_node
    kube("create", "namespace", NS)
    kube("apply", "-n", NS, "-f", str(REPO / "examples" / "s3-secret.yaml"))
    yield kube
    kube("delete", "pytorchjob", "--all", "-n", NS, "--wait=true", check=False, timeout=180)
    kube("delete", "dataset", "--all", "-n", NS, "--wait=true", check=False, timeout=300)
    kube("delete", "namespace", NS, "--wait=true", check=False, timeout=300)


@pytest.fixture
def slow_store(bridge_s3) -> Iterator[tuple[FaultProxy, threading.Event]]:
    """The store behind a proxy on the pod bridge that holds GETs of :data:`HELD` until the
    event is set."""
    proxy = FaultProxy(bridge_s3.endpoint, host=HOST_IP)
    release = threading.Event()
    for path in HELD:
        proxy.add(Fault(path_contains=path, hold=release, hold_for=25, status=503, s3_code="SlowDown",
                        times=10_000))
    yield proxy, release
    release.set()
    proxy.close()


def test_the_example_pytorchjob_waits_for_warmth_then_runs(namespace: Kube, slow_store) -> None:
    kube = namespace
    proxy, release = slow_store
    job, pod = "train-when-warm", "train-when-warm-master-0"
    # Dataset and job together, as a person would apply them: the job's pod is created while
    # nothing is cached yet.
    kube.apply(dataset_manifest(proxy.endpoint, "imagenet"), namespace=NS)
    eventually(lambda: kube.apply(gated_job(job, "imagenet"), namespace=NS), 120, "the PyTorchJob accepted",
               interval=5)
    eventually(lambda: gates(kube, pod) == [GATE], 120, f"pod {pod} created with the warm gate")

    # Watch gate and warming together until the gate goes: (gated, cached, total) samples, the
    # pod read first, so a gated pod was gated when the cache held at most the bytes sampled.
    samples: list[tuple[bool, int, int]] = []
    waiting_while_gated = False
    deadline = time.monotonic() + 300
    while True:
        seen = kube.json("pod", "-n", NS, pod)
        cached, total = node_cached(kube, "imagenet")
        gated = GATE in [g["name"] for g in seen["spec"].get("schedulingGates") or []]
        samples.append((gated, cached, total))
        if gated and 0 < cached < 0.8 * total and not release.is_set():
            # Seen gated while partly warm; once the pod's Event says why it waits (Events have
            # one-second timestamps, so their order is shown here, not by sorting them), the
            # rest of the data may come.
            waiting_while_gated = "WarmGateWaiting" in [r for _, r, _ in pod_events(kube, NS, pod)]
            if waiting_while_gated:
                release.set()
        if not gated:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"the gate was not removed within 300 s; last samples {samples[-5:]}, "
                                 f"events {pod_events(kube, NS, pod)}")
        scheduled = [c for c in seen["status"].get("conditions") or [] if c["type"] == "PodScheduled"]
        assert seen["status"]["phase"] == "Pending" and not seen["spec"].get("nodeName"), seen["status"]
        assert [c.get("reason") for c in scheduled] == ["SchedulingGated"], seen["status"]
        time.sleep(1)
    released_at = node_cached(kube, "imagenet")
    print("gated while (cached/total):", [f"{c}/{t}" for g, c, t in samples if g][::5],
          "released at", released_at)
    # Seen gated while the worker had some but less than 80% of the data, and released only at 80%.
    assert any(g and 0 < c < 0.8 * t for g, c, t in samples), samples
    assert proxy.injected > 0   # the held objects were asked for, and held
    cached, total = released_at
    assert total > 0 and cached >= 0.8 * total, (released_at, samples[-3:])

    events = pod_events(kube, NS, pod)
    reasons = [r for _, r, _ in events]
    assert "WarmGateWaiting" in reasons and "WarmGateReleased" in reasons, events
    assert waiting_while_gated, "no WarmGateWaiting Event while the pod was gated below 80%"
    released = [(t, m) for t, r, m in events if r == "WarmGateReleased"][0]
    assert released == ("Normal", "scheduling gate datahoard.io/warm removed: imagenet cached to 80% or "
                                  f"more on 1 node(s) the pod may land on (e.g. {kube.node})"), released
    assert not [e for e in events if e[1] == "WarmGateBlocked"], events

    logs = run_pytorchjob(kube, gated_job(job, "imagenet"), job, NS, timeout=300)
    assert logs.strip() == "60 files", logs   # the example's stand-in for training: os.walk of /data
    assert kube("get", "pod", "-n", NS, pod, "-o", "jsonpath={.spec.nodeName}") == kube.node


def test_a_dataset_that_can_never_be_warm_enough_says_so_on_the_pod(namespace: Kube, bridge_s3) -> None:
    """The cache holds 1 MiB of the 6.2 MiB dataset and the example asks for 80%: the pod stays
    gated with a Warning Event that says what to change."""
    kube = namespace
    job, pod = "train-on-tiny", "train-on-tiny-master-0"
    kube.apply(dataset_manifest(bridge_s3.endpoint, "tiny", capacity="1Mi"), namespace=NS)
    eventually(lambda: node_cached(kube, "tiny")[1] > 0, 300, "Dataset tiny to list its source")
    try:
        eventually(lambda: kube.apply(gated_job(job, "tiny"), namespace=NS), 120, "the PyTorchJob accepted",
                   interval=5)
        blocked = eventually(lambda: [(t, m) for t, r, m in pod_events(kube, NS, pod) if r == "WarmGateBlocked"],
                             120, f"a WarmGateBlocked Event on {pod}")
        total = node_cached(kube, "tiny")[1]
        print("WarmGateBlocked:", blocked)
        kind, message = blocked[0]
        assert kind == "Warning", blocked
        assert message.startswith("Dataset tiny: spec.cache.capacity 1Mi holds at most "
                                  f"{100 * (1 << 20) / total:.1f}% of its "), message
        assert message.endswith("and the pod asks for 80% (datahoard.io/warm-threshold): raise the capacity "
                                "or lower the threshold"), message
        assert gates(kube, pod) == [GATE]
        assert kube("get", "pod", "-n", NS, pod, "-o", "jsonpath={.status.phase}") == "Pending"
    finally:
        kube("delete", "pytorchjob", job, "-n", NS, "--wait=true", check=False, timeout=180)
        kube("delete", "dataset", "tiny", "-n", NS, "--wait=true", check=False, timeout=300)
