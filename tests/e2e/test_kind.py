"""The kind e2e (e2e/run.sh) when Docker and kind are here, and, everywhere, the parts of it that
need no Docker engine: the scripts parse (bash -n, shellcheck), the kind config and manifests
are well formed, and the manifests are accepted by a real API server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "e2e"
SCRIPTS = [E2E / "run.sh", REPO / "tests" / "tools" / "build-helm.sh",
           REPO / "tests" / "tools" / "check-image-buildah.sh"]


def docker_missing() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker engine is reachable (`docker info` fails; only the client is installed)"
    kind = shutil.which("kind") or shutil.which("go")
    if kind is None:
        return "kind is not installed (and no Go toolchain to install it)"
    return None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck() -> None:
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_kind_config_passes_dev_fuse_to_every_worker() -> None:
    config = yaml.safe_load((E2E / "kind-config.yaml").read_text())
    workers = [n for n in config["nodes"] if n["role"] == "worker"]
    assert len(workers) >= 2
    for node in workers:
        assert {"hostPath": "/dev/fuse", "containerPath": "/dev/fuse"} in node["extraMounts"]


def test_e2e_matches_the_examples() -> None:
    """run.sh and the S3 manifests serve what examples/dataset.yaml and s3-secret.yaml expect."""
    dataset = yaml.safe_load((REPO / "examples" / "dataset.yaml").read_text())
    source = dataset["spec"]["source"]
    service = next(d for d in yaml.safe_load_all((E2E / "s3.yaml").read_text()) if d["kind"] == "Service")
    assert source["endpoint"] == (f"http://{service['metadata']['name']}."
                                  f"{service['metadata']['namespace']}:{service['spec']['ports'][0]['port']}")
    seed = next(d for d in yaml.safe_load_all((E2E / "seed.yaml").read_text()) if d["kind"] == "ConfigMap")
    script = seed["data"]["seed.py"]
    bucket, _, prefix = source["uri"].removeprefix("s3://").partition("/")
    assert f'Bucket="{bucket}"' in script and f'f"{prefix}n' in script
    secret = yaml.safe_load((REPO / "examples" / "s3-secret.yaml").read_text())["stringData"]
    assert f'aws_access_key_id="{secret["AWS_ACCESS_KEY_ID"]}"' in script
    run = (E2E / "run.sh").read_text()
    job = next(d for d in yaml.safe_load_all((E2E / "seed.yaml").read_text()) if d["kind"] == "Job")
    files = next(e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
                 if e["name"] == "FILES")
    assert f"FILES={files}" in run
    from datahoard import names
    assert 'LABEL="dataset.datahoard.io/${NS}.${DATASET}"' in run
    assert names.node_label("ml", "imagenet") == "dataset.datahoard.io/ml.imagenet"
    import hashlib

    digest = hashlib.sha256(b"ml/imagenet").hexdigest()[:12]
    assert 'DIGEST=$(printf \'%s\' "$NS/$DATASET" | sha256sum | cut -c1-12)' in run
    assert names.worker_name("ml", "imagenet") == f"dh-ml-imagenet-{digest}"
    assert names.pv_name("ml", "imagenet") == f"datahoard-ml-imagenet-{digest}"


def test_workflow_runs_the_e2e() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "e2e.yaml").read_text())
    steps = workflow["jobs"]["kind"]["steps"]
    assert any(s.get("run") == "make e2e" for s in steps)
    make = subprocess.run(["make", "-n", "e2e"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "e2e/run.sh" in make.stdout


def _reader(example: str) -> str:
    job = yaml.safe_load((REPO / "examples" / example).read_text())
    if job["kind"] == "PyTorchJob":
        pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    else:
        pod = job["spec"]["template"]["spec"]
    return pod["containers"][0]["command"][2]


@pytest.mark.parametrize("example", ["job.yaml", "pytorchjob.yaml"])
def test_synthetic_files_verify_with_the_examples_reader(tmp_path: Path, example: str) -> None:
    """The seed's file format and the examples' readers agree (and a corrupted file is caught)."""
    seed = next(d for d in yaml.safe_load_all((E2E / "seed.yaml").read_text()) if d["kind"] == "ConfigMap")
    reader = _reader(example)
    root = tmp_path / "data"

    class FakeS3:
        def create_bucket(self, **_): pass

        def put_object(self, Bucket, Key, Body):  # noqa: N803
            if Key.startswith("imagenet/train/") and Key.endswith(".JPEG"):
                path = root / Key.removeprefix("imagenet/train/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(Body)

    import boto3
    original = boto3.client
    boto3.client = lambda *a, **k: FakeS3()
    try:
        env = {"FILES": "12", "ENDPOINT": "http://unused"}
        os.environ.update(env)
        exec(compile(seed["data"]["seed.py"], "seed.py", "exec"), {})
    finally:
        boto3.client = original
        for key in ("FILES", "ENDPOINT"):
            os.environ.pop(key, None)
    assert '"/data"' in reader
    code = reader.replace('"/data"', repr(str(root)))
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ok.returncode == 0 and "verified 12 files" in ok.stdout, ok.stderr
    victim = sorted(root.rglob("*.JPEG"))[3]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bad.returncode != 0 and "1 files with wrong contents" in bad.stderr


@pytest.mark.e2e
@pytest.mark.timeout(3600)
def test_kind_e2e() -> None:
    missing = docker_missing()
    if missing:
        pytest.skip(f"kind e2e: {missing}")
    subprocess.run(["make", "-s", "e2e"], cwd=REPO, check=True, timeout=3600)


@pytest.mark.e2e
@pytest.mark.node
@pytest.mark.timeout(3600)
def test_e2e_on_the_local_cluster() -> None:
    """e2e/run.sh, the script GitHub Actions runs on kind, on the real one-node cluster
    (E2E_PROVIDER=local: tests/node/cluster.sh, no Docker), with the training operator built
    from its Go module. It brings the cluster up and takes it down, leaving nothing behind."""
    from tests.support.nodekube import CLUSTER_SH, TOOLS_DIR, missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        pytest.skip(f"e2e on the local cluster: {missing}")
    env = {**os.environ, "TOOLS_DIR": str(TOOLS_DIR), "E2E_TRAINING_OPERATOR": "1"}
    if subprocess.run([str(CLUSTER_SH), "status"], env=env, timeout=60).returncode == 0:
        pytest.skip("the one-node cluster is up already (make cluster, or the node tier): "
                    "run.sh would meet its Helm release; take it down with make cluster-down")
    result = subprocess.run(["make", "-s", "e2e", "E2E_PROVIDER=local", f"PY={sys.executable}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=3500)
    print(result.stderr[-6000:])
    assert result.returncode == 0, f"e2e/run.sh (local) failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}"
    assert "e2e passed" in result.stderr
    assert subprocess.run([str(CLUSTER_SH), "status"], env=env, timeout=60).returncode != 0, \
        "run.sh left the cluster it started up"


def test_pytorchjob_ranks_meet_at_the_end(tmp_path: Path) -> None:
    """The PyTorchJob's master waits for its worker (so the worker's init container can still
    resolve it), as with torch.distributed; both verify the files."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.JPEG").write_bytes(b"plain file\n")
    code = _reader("pytorchjob.yaml").replace('"/data"', repr(str(root)))
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    master = subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": "0"},
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        assert master.poll() is None, "the master must wait for the worker"
        worker = subprocess.run([sys.executable, "-c", code], env={**env, "RANK": "1"},
                                capture_output=True, text=True, timeout=60)
        assert worker.returncode == 0 and "rank 1" in worker.stdout and "verified 1 files" in worker.stdout
        out, _ = master.communicate(timeout=30)
        assert master.returncode == 0 and "rank 0" in out and "verified 1 files" in out
    finally:
        if master.poll() is None:
            master.kill()
