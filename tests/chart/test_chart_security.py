"""The chart's tenant boundaries without a cluster (issue 13): the workers' NetworkPolicy, the
policy values reaching the operator, per-namespace Secret grants and the admission policy that
narrows node patch and PV create. tests/chart/test_chart_cluster.py runs them for real."""

from __future__ import annotations

import pytest
import yaml

from datahoard.operator.config import OperatorSettings
from tests.support.chart import CHART, NAMESPACE

pytestmark = pytest.mark.timeout(1800)


def operator_settings(rendered, monkeypatch) -> OperatorSettings:
    container = rendered.find("Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in OperatorSettings.model_fields:
        monkeypatch.delenv(f"DATAHOARD_{name.upper()}", raising=False)
    for env in container["env"]:
        if env["name"].startswith("DATAHOARD_") and "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    return OperatorSettings()


def test_worker_stats_take_connections_from_the_operator_and_plugin_only(render) -> None:
    policy = render().find("NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "datahoard-operator",
        "app.kubernetes.io/component": "cache-worker"}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9470}]
    components = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]]
    assert components == ["operator", "csi-node"]
    blocks = [b["ipBlock"] for r in spec["egress"] for b in r["to"] if "ipBlock" in b]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]} in blocks
    assert any("fe80::/10" in b.get("except", []) for b in blocks)


def test_network_policy_values(render) -> None:
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    spec = render({"networkPolicy": {"prometheus": [scraper], "denyLinkLocalEgress": False,
                                     "linkLocalAllowed": ["169.254.20.10/32"]},
                   "worker": {"statsPort": 9555}}).find("NetworkPolicy")["spec"]
    assert spec["ingress"][0]["from"][-1] == scraper
    assert spec["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9555}]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    with_dns = render({"networkPolicy": {"linkLocalAllowed": ["169.254.20.10/32"]}})
    egress = with_dns.find("NetworkPolicy")["spec"]["egress"]
    assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in egress[1]["to"]
    assert "NetworkPolicy" not in render({"networkPolicy": {"enabled": False}}).kinds()


def test_policy_values_reach_the_operator(render, monkeypatch) -> None:
    default = operator_settings(render(), monkeypatch)
    assert default.allow_node_identity is False and default.allow_link_local_endpoints is False
    assert "node-role.kubernetes.io/control-plane" in default.forbidden_node_labels
    assert "node-role.kubernetes.io/control-plane" in default.forbidden_taints
    assert default.capacity_resource == "ephemeral-storage" and default.dataset_namespaces == []
    custom = operator_settings(render({
        "policy": {"allowNodeIdentity": True, "allowLinkLocalEndpoints": True,
                   "forbiddenNodeLabels": [], "forbiddenTaints": ["dedicated"],
                   "capacityResource": ""},
        "rbac": {"datasetNamespaces": ["ml", "vision"]}}), monkeypatch)
    assert custom.allow_node_identity and custom.allow_link_local_endpoints
    assert custom.forbidden_node_labels == [] and custom.forbidden_taints == ["dedicated"]
    assert custom.capacity_resource == "" and custom.dataset_namespaces == ["ml", "vision"]


def test_secret_reads_move_into_the_listed_namespaces(render) -> None:
    default = render()
    assert any("secrets" in r["resources"] for r in default.find("ClusterRole")["rules"])
    scoped = render({"rbac": {"datasetNamespaces": ["ml", "vision"]}})
    assert not any("secrets" in r["resources"] for r in scoped.find("ClusterRole")["rules"])
    roles = {d["metadata"]["namespace"]: d for d in scoped.docs if d["kind"] == "Role"
             and d["metadata"]["name"].endswith("-secrets")}
    assert set(roles) == {"ml", "vision"}
    for ns, role in roles.items():
        assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
        binding = next(d for d in scoped.docs
                       if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == ns)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "datahoard-operator",
                                        "namespace": NAMESPACE}]
    # Datasets elsewhere are refused by the operator (it could not read their Secrets).
    system_role = next(d for d in scoped.docs if d["kind"] == "Role"
                       and d["metadata"]["namespace"] == NAMESPACE)
    assert any("secrets" in r["resources"] and "get" in r["verbs"] for r in system_role["rules"])


def test_admission_policy_binds_the_operator_only(render) -> None:
    rendered = render()
    policy = rendered.find("ValidatingAdmissionPolicy")
    (cond,) = policy["spec"]["matchConditions"]
    assert cond["expression"] == (
        f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:datahoard-operator'")
    binding = rendered.find("ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    kinds = render({"rbac": {"admissionPolicy": False}}).kinds()
    assert "ValidatingAdmissionPolicy" not in kinds


@pytest.mark.parametrize("bad, message", [
    ({"policy": {"allowNodeIdentity": "yes"}}, "allowNodeIdentity"),
    ({"rbac": {"datasetNamespaces": ["Not_A_Namespace"]}}, "datasetNamespaces"),
    ({"networkPolicy": {"prometheus": [{}]}}, "prometheus"),
    ({"networkPolicy": {"linkLocalAllowed": ["169.254.169.254/32"]}}, "linkLocalAllowed"),
])
def test_schema_rejects_bad_security_values(helm, tmp_path, bad, message) -> None:
    from tests.support.chart import run_helm, values_file

    result = run_helm(helm, "template", "x", str(CHART), "--values", str(values_file(tmp_path, bad)),
                      check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_values_file_documents_the_security_blocks() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["networkPolicy"]["enabled"] is True
    assert values["policy"]["allowNodeIdentity"] is False
