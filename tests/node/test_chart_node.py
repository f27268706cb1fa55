"""The chart installed for real (`helm install --wait`) into the one-node cluster: the operator runs
as a pod and talks to the API server; the CSI node plugin runs as a DaemonSet pod and the real
kubelet has registered it (pluginregistration.v1, csiNode.registration=kubelet)."""

from __future__ import annotations

import pytest

from tests.support.nodekube import SYSTEM_NS, Kube, eventually

pytestmark = [pytest.mark.node, pytest.mark.timeout(1800)]


def test_node_is_real_and_ready(node_cluster: Kube) -> None:
    node = node_cluster.json("node", node_cluster.node)
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.")
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", ready


def test_operator_runs_as_a_pod_and_reaches_the_api_server(release: Kube) -> None:
    kube = release
    pods = kube.json("pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running", pods
    assert pods[0]["spec"]["nodeName"] == kube.node
    assert pods[0]["spec"]["containers"][0]["image"] == "localhost/datahoard:dev"
    # In-cluster config: the kubernetes Service's address, from the pod's own environment.
    env = kube("exec", "-n", SYSTEM_NS, pods[0]["metadata"]["name"], "--", "printenv",
               "KUBERNETES_SERVICE_HOST")
    assert env.strip() == "10.96.0.1"
    # Reaching the API server, proved by the operator's answer to a Dataset whose Secret is
    # missing: a condition that says which Secret to create (one of the bad inputs).
    kube("create", "namespace", "nosecret")
    try:
        kube.apply(DATASET_WITHOUT_SECRET, namespace="nosecret")
        cond = eventually(lambda: [c for c in kube.json("dataset", "-n", "nosecret", "orphan")
                                   .get("status", {}).get("conditions", []) if c["reason"] == "SecretNotFound"],
                          120, "the operator to report the missing Secret")
        assert cond[0]["status"] == "False" and "Secret nosecret/absent not found" in cond[0]["message"], cond
    finally:
        kube("delete", "namespace", "nosecret", "--wait=true", timeout=180)


DATASET_WITHOUT_SECRET = """
apiVersion: datahoard.io/v1alpha1
kind: Dataset
metadata: {name: orphan}
spec:
  source: {uri: "s3://datasets/imagenet/train/", endpoint: "http://10.244.0.1:1", secretRef: {name: absent}}
"""


def test_csi_plugin_runs_and_is_registered_with_the_kubelet(release: Kube) -> None:
    kube = release
    ds = kube.json("ds", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=csi-node")["items"][0]
    assert ds["status"]["numberReady"] == ds["status"]["desiredNumberScheduled"] == 1, ds["status"]
    containers = [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]]
    assert containers == ["csi-node"], containers   # registration: kubelet; no livenessprobe sidecar
    # The kubelet's liveness probe is answered by the plugin itself (--health-port).
    pod = kube.json("pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=csi-node")["items"][0]
    plugin = pod["spec"]["containers"][0]
    assert plugin["livenessProbe"]["httpGet"]["path"] == "/healthz", plugin
    assert any(a.startswith("--health-port=") for a in plugin["args"]), plugin["args"]
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, status
    port = plugin["ports"][0]["containerPort"]
    answer = kube("exec", "-n", SYSTEM_NS, pod["metadata"]["name"], "-c", "csi-node", "--", "python", "-c",
                  f"import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:{port}/healthz', "
                  "timeout=10); print(r.status)")
    assert answer.strip() == "200", answer
    drivers = eventually(lambda: kube("get", "csinode", kube.node, "-o",
                                      "jsonpath={.spec.drivers[*].name}").split(),
                         120, "the kubelet to list the driver in its CSINode")
    assert "csi.datahoard.io" in drivers, drivers
