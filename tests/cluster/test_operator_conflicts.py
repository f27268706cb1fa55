"""Conflicting writes (guarantee 5 of the reliability issue): two operators at once (a rollout
gone wrong: the chart runs one replica with Recreate, but nothing stops a second copy), a user
rewriting the spec as fast as kubectl allows, and another controller adding and removing its
own finalizer on the same Dataset. The operator must converge on the last spec, create no
duplicate object, and neither lose its finalizer nor remove anyone else's."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from datahoard import names
from tests.support.cluster import Cluster
from tests.support.kubelet import Kubelet, OperatorProcess
from tests.support.polling import eventually

pytestmark = pytest.mark.cluster
SYSTEM = names.SYSTEM_NAMESPACE
OURS = f"{names.GROUP}/cleanup"
THEIRS = "backup.example.com/protect"


def capacity_of(cluster: Cluster, namespace: str, name: str) -> str | None:
    ds = cluster.daemonset(namespace, name)
    if ds is None:
        return None
    cmd = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    return cmd[cmd.index("--capacity") + 1]


def test_conflicting_writers_converge_with_no_duplicates_and_no_lost_finalizer(
        cluster: Cluster, operator: OperatorProcess, kubelet: Kubelet, operator_kubeconfig: Path,
        operator_env: dict[str, str], node_names: dict[str, str], namespace: str, tmp_path: Path) -> None:
    second = OperatorProcess(operator_kubeconfig, tmp_path / "operator-2.log", operator_env)
    second.start()
    try:
        names_ = [f"race-{i}" for i in range(3)]
        for name in names_:
            cluster.apply_dataset(namespace, name, {"source": {"uri": f"s3://bucket/{name}/"}})

        def other_controller() -> None:
            # Another controller's finalizer, added by JSON patch while both operators add theirs.
            for name in names_:
                cluster.plane.kubectl("patch", "dataset", name, "-n", namespace, "--type=json", "-p",
                                      f'[{{"op":"add","path":"/metadata/finalizers/-","value":"{THEIRS}"}}]')

        def user() -> None:
            # The spec rewritten again and again; the last write must win everywhere.
            for gib in range(11, 21):
                for name in names_:
                    cluster.apply_dataset(namespace, name, {"source": {"uri": f"s3://bucket/{name}/"},
                                                            "cache": {"capacity": f"{gib}Gi"}})

        eventually(lambda: all(cluster.dataset(namespace, n)["metadata"].get("finalizers") for n in names_),
                   what="the operators' finalizers")
        writers = [threading.Thread(target=other_controller), threading.Thread(target=user)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()

        workers = {}
        for name in names_:
            eventually(lambda n=name: capacity_of(cluster, namespace, n) == "20Gi", timeout=120,
                       what=f"{name}'s workers to follow the last spec")
            # The DaemonSet controller and kubelet's part: one ready worker, so the volume is made.
            workers[name] = kubelet.start_pod(cluster.daemonset(namespace, name), node_names["gpu-a"])
            kubelet.set_status(SYSTEM, workers[name], ready=True)
        for name in names_:
            eventually(lambda n=name: cluster.owned(namespace, n)["PersistentVolumeClaim"] == [n],
                       what=f"{name}'s volume")
            dataset = cluster.dataset(namespace, name)
            assert dataset is not None
            eventually(lambda n=name: cluster.status(namespace, n).get("observedGeneration")
                       == cluster.dataset(namespace, n)["metadata"]["generation"],
                       what=f"{name}'s status to describe the last spec")
            finalizers = cluster.dataset(namespace, name)["metadata"]["finalizers"]
            assert sorted(finalizers) == sorted([OURS, THEIRS]), finalizers
            owned = cluster.owned(namespace, name)
            assert owned["DaemonSet"] == [names.worker_name(namespace, name)]
            assert owned["PersistentVolumeClaim"] == [name]
            assert len(owned["PersistentVolume"]) == 1
        assert operator.alive() and second.alive()

        # Deletion: our cleanup runs and our finalizer goes; the other controller's stays, so
        # the Dataset waits for it and nothing of ours is left behind meanwhile.
        for name in names_:
            cluster.plane.kubectl("delete", "dataset", name, "-n", namespace, "--wait=false")
        for name in names_:
            eventually(lambda n=name: cluster.daemonset(namespace, n) is None, what=f"{name}'s workers removed")
            cluster.core.delete_namespaced_pod(workers[name], SYSTEM, grace_period_seconds=0)
        for name in names_:
            eventually(lambda n=name: cluster.dataset(namespace, n)["metadata"]["finalizers"] == [THEIRS],
                       timeout=120, what=f"{name}'s cleanup to finish")
            owned = cluster.owned(namespace, name)
            assert owned["DaemonSet"] == [] and owned["PersistentVolumeClaim"] == [] and owned["PersistentVolume"] == []
            cluster.plane.kubectl("patch", "dataset", name, "-n", namespace, "--type=json", "-p",
                                  '[{"op":"remove","path":"/metadata/finalizers/0"}]')
        for name in names_:
            eventually(lambda n=name: cluster.dataset(namespace, n) is None, what=f"{name} to go")
    finally:
        second.stop()
        tail = [line[:400] for line in second.output().splitlines()[-40:]]
        print("---- second operator log (tail) ----\n" + "\n".join(tail))
