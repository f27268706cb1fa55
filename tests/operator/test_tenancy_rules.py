"""Tenants never share objects, identities or nodes they should not (issue 13, items 2 and 4 and
the operator's "Also broken" items): the pure rules. The same rules run for real against an API
server in tests/cluster/test_operator_tenancy.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from datahoard import names
from datahoard.api import Dataset
from datahoard.operator import cleanup_job, ownership, placement, policy, workers
from datahoard.operator.config import OperatorSettings

SETTINGS = OperatorSettings(namespace="datahoard-system", host_root=Path("/var/lib/datahoard"))
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def dataset(namespace: str = "ml", name: str = "data", uid: str = "uid-1", **source) -> Dataset:
    return Dataset.from_body({"metadata": {"namespace": namespace, "name": name, "uid": uid},
                              "spec": {"source": {"uri": "s3://bucket/x", **source}}})


# -- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [(("team-x", "data"), ("team", "x-data")),
                                  (("a-b", "c-d"), ("a", "b-c-d")),
                                  (("x" * 63, "y" * 253), ("x" * 63, "y" * 252 + "z"))])
def test_names_are_injective(a: tuple[str, str], b: tuple[str, str]) -> None:
    for fn in (names.worker_name, names.pv_name, names.node_label):
        assert fn(*a) != fn(*b), fn.__name__
    assert cleanup_job.cleanup_job_name(dataset(*a), "n") != cleanup_job.cleanup_job_name(dataset(*b), "n")


def test_names_fit_their_limits() -> None:
    ns, name = "n" * 63, "d" * 253
    worker = names.worker_name(ns, name)
    assert len(worker) <= 63 and DNS_LABEL.fullmatch(worker)
    assert len(names.pv_name(ns, name)) <= 253
    assert len(cleanup_job.cleanup_job_name(dataset(ns, name), "node")) <= 63
    assert names.worker_name("ml", "imagenet").startswith("dh-ml-imagenet-")


# -- ownership -------------------------------------------------------------------------------

def obj(kind: str, name: str, annotations: dict | None = None, **extra) -> dict:
    return {"kind": kind, "metadata": {"name": name, "annotations": annotations or {}, **extra}}


def test_only_objects_with_this_uid_are_ours() -> None:
    ds = dataset()
    mine = workers.worker_daemonset(ds, ["n"], SETTINGS, None)
    assert ownership.verdict(mine, ds) == "ours"
    other = dataset("team", "x-data", uid="uid-2")
    assert ownership.verdict(mine, other) == "foreign"
    bare = obj("DaemonSet", names.worker_name("ml", "data"))
    assert ownership.verdict(bare, ds) == "foreign"
    assert "no datahoard.io/dataset-uid annotation" in ownership.conflict_message(bare, ds)
    assert "Dataset ml/data (uid uid-1)" in ownership.conflict_message(mine, other)


def test_legacy_objects_are_recognised_only_at_their_legacy_name() -> None:
    ds = dataset("team-x", "data")
    legacy = names.legacy_worker_name("team-x", "data")
    old = obj("DaemonSet", legacy, {ownership.DATASET_ANNOTATION: "team-x/data"})
    assert ownership.verdict(old, ds, legacy) == "legacy"
    # The colliding Dataset of the old naming scheme cannot claim it.
    twin = dataset("team", "x-data", uid="uid-2")
    assert names.legacy_worker_name("team", "x-data") == legacy
    assert ownership.verdict(old, twin, legacy) == "foreign"
    assert ownership.verdict(old, ds) == "foreign"  # not at a legacy name: no proof
    pv = obj("PersistentVolume", names.legacy_pv_name("team-x", "data"),
             {ownership.DATASET_ANNOTATION: "team-x/data"})
    pv["spec"] = {"claimRef": {"namespace": "team", "name": "x-data"}}  # the other one took it
    assert ownership.verdict(pv, ds, names.legacy_pv_name("team-x", "data")) == "foreign"
    pvc = obj("PersistentVolumeClaim", "data", ownerReferences=[{"uid": "uid-1"}])
    assert ownership.verdict(pvc, ds) == "ours"


# -- credentials -----------------------------------------------------------------------------

def env_of(ds: Dataset, creds: str | None = None) -> dict[str, str]:
    container = workers.worker_daemonset(ds, ["n"], SETTINGS, creds)["spec"]["template"][
        "spec"]["containers"][0]
    return {e["name"]: e.get("value", "<secret>") for e in container["env"]}


def test_without_a_secret_workers_are_anonymous_and_cannot_reach_metadata() -> None:
    env = env_of(dataset())
    assert env["DATAHOARD_SOURCE_CREDENTIALS"] == "anonymous"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    secret = env_of(dataset(secretRef={"name": "creds"}), "hash")
    assert secret["DATAHOARD_SOURCE_CREDENTIALS"] == "secret"
    assert secret["AWS_EC2_METADATA_DISABLED"] == "true"
    node = env_of(dataset(credentials="NodeIdentity"))
    assert node["DATAHOARD_SOURCE_CREDENTIALS"] == "node-identity"
    assert "AWS_EC2_METADATA_DISABLED" not in node


def test_node_identity_is_refused_unless_the_admin_allows_it() -> None:
    ds = dataset(credentials="NodeIdentity")
    refusal = policy.check(ds, SETTINGS)
    assert refusal and refusal.reason == "NodeIdentityForbidden"
    allowed = OperatorSettings(allow_node_identity=True)
    assert policy.check(ds, allowed) is None


# -- endpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["169.254.169.254", "fe80::1", "fe80::1%eth0", "fd00:ec2::254",
                                     "::ffff:169.254.169.254"])
def test_link_local_addresses(address: str) -> None:
    assert policy.link_local(address)
    # The schema takes no IPv6 literal in an endpoint; a host name can still resolve to one.
    refusal = policy.endpoint_refusal("http://imds.example", resolver=lambda h: [address])
    assert refusal and address in refusal


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254", "http://169.254.170.2:80/x"])
def test_link_local_endpoints_are_refused(endpoint: str) -> None:
    refusal = policy.check(dataset(endpoint=endpoint), SETTINGS, resolver=lambda h: [])
    assert refusal and refusal.reason == "EndpointForbidden", endpoint
    assert policy.check(dataset(endpoint=endpoint),
                        OperatorSettings(allow_link_local_endpoints=True)) is None


def test_a_host_name_resolving_to_link_local_is_refused() -> None:
    ds = dataset(endpoint="http://metadata.example.com")
    refusal = policy.check(ds, SETTINGS, resolver=lambda h: ["10.0.0.1", "169.254.169.254"])
    assert refusal and "resolves to link-local 169.254.169.254" in refusal.message
    assert policy.check(ds, SETTINGS, resolver=lambda h: ["10.0.0.1"]) is None
    # A name that does not resolve here (.invalid never does) is not refused: the worker will
    # fail to reach it and say so, and its NetworkPolicy denies link-local egress anyway.
    assert policy.endpoint_refusal("http://169.254.169.254.invalid:80",
                                   resolver=policy.resolve) is None


def test_namespaces_outside_the_served_list_are_refused() -> None:
    only = OperatorSettings(dataset_namespaces=["ml"])
    assert policy.check(dataset("ml"), only) is None
    refusal = policy.check(dataset("other"), only)
    assert refusal and refusal.reason == "NamespaceNotServed"


# -- placement -------------------------------------------------------------------------------

def node(name: str, labels: dict | None = None, taints: list | None = None, **allocatable) -> dict:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"nvidia.com/gpu": "1", **allocatable}}}


def test_control_plane_nodes_are_kept_out_whatever_the_spec_tolerates() -> None:
    ds = Dataset.from_body({"metadata": {"namespace": "ml", "name": "d"}, "spec": {
        "source": {"uri": "s3://bucket/x"},
        "placement": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                      "tolerations": [{"operator": "Exists"}]}}})
    cp = node("cp", {"node-role.kubernetes.io/control-plane": ""},
              [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}])
    tols = workers.worker_tolerations(ds, SETTINGS)
    from datahoard.operator.converge import node_policy_of

    pol = node_policy_of(SETTINGS)
    assert placement.pick_nodes([cp], ds, "nvidia.com/gpu", tols) == ["cp"]  # no policy
    assert placement.pick_nodes([cp], ds, "nvidia.com/gpu", tols, policy=pol) == []
    assert placement.refused([cp], ds, "nvidia.com/gpu", tols, pol) == [
        "cp: label node-role.kubernetes.io/control-plane (no workers on such nodes here)"]
    # A taint alone is enough to keep a node out, however broad the tolerations.
    tainted = node("t", {"node-role.kubernetes.io/control-plane": ""},
                   [{"key": "dedicated-cp", "effect": "NoExecute"}])
    taint_pol = placement.NodePolicy(forbidden_taints=("dedicated-cp",))
    assert placement.pick_nodes([tainted], ds, "nvidia.com/gpu", tols) == ["t"]
    assert placement.pick_nodes([tainted], ds, "nvidia.com/gpu", tols, policy=taint_pol) == []


def test_capacity_is_bounded_by_what_the_node_has() -> None:
    ds = Dataset.from_body({"metadata": {"namespace": "ml", "name": "d"}, "spec": {
        "source": {"uri": "s3://bucket/x"}, "cache": {"capacity": "1000Pi"}}})
    pol = placement.NodePolicy(capacity_resource="ephemeral-storage")
    big = node("big", **{"ephemeral-storage": "2000Pi"})
    small = node("small", **{"ephemeral-storage": "500Gi", "memory": "64Gi"})
    unknown = node("unknown")  # reports no ephemeral-storage: no bound can be checked
    picked = placement.pick_nodes([big, small, unknown], ds, "nvidia.com/gpu", [], policy=pol)
    assert picked == ["big", "unknown"]
    (why,) = placement.refused([big, small, unknown], ds, "nvidia.com/gpu", [], pol)
    assert why == "small: allocatable ephemeral-storage 500.0Gi < spec.cache.capacity 1000Pi"
    mem = Dataset.from_body({"metadata": {"namespace": "ml", "name": "d"}, "spec": {
        "source": {"uri": "s3://bucket/x"}, "cache": {"medium": "Memory", "capacity": "100Gi"}}})
    assert placement.pick_nodes([small], mem, "nvidia.com/gpu", [], policy=pol) == []
