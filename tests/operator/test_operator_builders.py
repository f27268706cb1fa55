"""Builders against golden YAML: the manifests are reviewed once, by a person, in golden/.

Regenerate after an intended change with ``DATAHOARD_UPDATE_GOLDEN=1 pytest tests/operator``
and review the diff like code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from datahoard import names
from datahoard.api import Dataset
from datahoard.operator import cleanup_job, credentials, labels, volumes, workers
from datahoard.operator.config import OperatorSettings

GOLDEN = Path(__file__).with_name("golden")
SETTINGS = OperatorSettings(namespace="datahoard-system", worker_image="example.com/datahoard:1.0",
                            host_root=Path("/var/lib/datahoard"), stats_port=9470)


def dataset(**spec_overrides) -> Dataset:
    spec = {
        "source": {"uri": "s3://datasets/imagenet/train/", "endpoint": "http://minio.minio:9000",
                   "region": "us-east-1", "secretRef": {"name": "s3-creds"},
                   "include": ["**/*.JPEG"], "exclude": ["**/README*"]},
        "cache": {"medium": "Disk", "capacity": "200Gi"},
        "placement": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml",
                                       "effect": "NoSchedule"}]},
        "warm": {"policy": "Eager", "parallelism": 32},
    }
    spec.update(spec_overrides)
    return Dataset.from_body({"metadata": {"namespace": "ml", "name": "imagenet",
                                           "uid": "0000-1111", "generation": 3}, "spec": spec})


CASES = {
    "daemonset-disk": lambda: workers.worker_daemonset(
        dataset(), ["gpu-b", "gpu-a"], SETTINGS, credentials.credentials_hash({"AWS_ACCESS_KEY_ID": "aWQ="})),
    "daemonset-memory-anonymous": lambda: workers.worker_daemonset(
        dataset(source={"uri": "s3://open-data/x"}, cache={"medium": "Memory", "capacity": "8Gi"},
                warm={"policy": "OnDemand"}, placement={}),
        ["gpu-a"], SETTINGS, None),
    "daemonset-hdfs": lambda: workers.worker_daemonset(
        dataset(source={"uri": "hdfs://namenode:9870/data", "secretRef": {"name": "hdfs"}},
                placement={}),
        ["gpu-a"], SETTINGS, credentials.credentials_hash({"DATAHOARD_HDFS_USER": "dHJhaW4="})),
    "secret-copy": lambda: credentials.secret_copy(
        dataset(), {"AWS_SECRET_ACCESS_KEY": "c2VjcmV0", "AWS_ACCESS_KEY_ID": "aWQ="}, SETTINGS),
    "pv": lambda: volumes.persistent_volume(dataset(), SETTINGS),
    "pvc": lambda: volumes.persistent_volume_claim(dataset()),
    "cleanup-job": lambda: cleanup_job.cleanup_job(dataset(), "gpu-a", SETTINGS),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_manifest_matches_golden(name: str) -> None:
    manifest = CASES[name]()
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("DATAHOARD_UPDATE_GOLDEN"):
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert manifest == yaml.safe_load(path.read_text())


def test_worker_command_is_the_cli_contract() -> None:
    cmd = workers.worker_command(dataset(), SETTINGS)
    assert cmd[:4] == ["datahoard", "mount", "s3://datasets/imagenet/train/",
                       "/var/lib/datahoard/mnt/ml/imagenet"]
    assert cmd[cmd.index("--cache-dir") + 1] == "/var/lib/datahoard/cache/ml/imagenet"
    assert cmd[-2:] == ["--stats-addr", "0.0.0.0:9470"]
    assert "--warm" in cmd and "--foreground" in cmd
    assert "--direct" not in cmd


def test_direct_datasets_build_the_tree_and_leave_publishing_to_the_csi_plugin() -> None:
    from datahoard.cli import build_parser

    cmd = workers.worker_command(dataset(cache={"capacity": "1Ti", "direct": True}), SETTINGS)
    args = build_parser().parse_args(cmd[1:])  # the CLI accepts what the operator writes
    assert args.direct and not args.direct_bind


def test_pv_and_node_label_agree() -> None:
    """The PV's nodeAffinity must select exactly what the operator puts on ready nodes."""
    ds = dataset()
    expr = volumes.persistent_volume(ds, SETTINGS)["spec"]["nodeAffinity"]["required"][
        "nodeSelectorTerms"][0]["matchExpressions"][0]
    (key, value), = volumes.node_label_patch(ds, True)["metadata"]["labels"].items()
    assert expr["key"] == key == names.node_label("ml", "imagenet")
    assert value in expr["values"]
    assert volumes.node_label_patch(ds, False)["metadata"]["labels"] == {key: None}


def test_long_names_stay_valid() -> None:
    ds = Dataset.from_body({"metadata": {"namespace": "n" * 63, "name": "d" * 200},
                            "spec": {"source": {"uri": "s3://bucket/x"}}})
    assert len(workers.worker_daemonset(ds, ["a"], SETTINGS, None)["metadata"]["name"]) <= 63
    assert len(cleanup_job.cleanup_job(ds, "node-" + "x" * 200, SETTINGS)["metadata"]["name"]) <= 63
    assert len(labels.labels(ds, "cache-worker")[labels.DATASET_LABEL]) <= 63


def test_credential_rotation_rolls_the_workers() -> None:
    """A changed Secret changes the pod template (env vars are only read at start)."""
    def template(data: dict) -> dict:
        return workers.worker_daemonset(dataset(), ["a"], SETTINGS,
                                         credentials.credentials_hash(data))["spec"]["template"]
    assert template({"AWS_ACCESS_KEY_ID": "b2xk"}) != template({"AWS_ACCESS_KEY_ID": "bmV3"})
    assert template({"AWS_ACCESS_KEY_ID": "b2xk"}) == template({"AWS_ACCESS_KEY_ID": "b2xk"})


def test_warming_bandwidth_reaches_the_worker_as_bytes_per_second() -> None:
    from datahoard.cli import build_parser

    cmd = workers.worker_command(dataset(warm={"policy": "Eager", "bandwidthLimit": "1.5Mi"}), SETTINGS)
    assert cmd[cmd.index("--bandwidth-limit") + 1] == str(3 * 2**19)
    args = build_parser().parse_args(cmd[1:])  # the CLI accepts what the operator writes
    assert args.bandwidth_limit == 3 * 2**19
    assert "--bandwidth-limit" not in workers.worker_command(dataset(), SETTINGS)  # no cap by default
