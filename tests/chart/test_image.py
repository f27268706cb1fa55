"""The container image, as far as it can be checked without a Docker engine: the Dockerfile's
shape, the build context, the pinned dependency set (installed for real the way stage 1 installs
it), and the entrypoint's dispatch. The image itself is built by the e2e (e2e/run.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.chart import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
LOCK = REPO / "requirements.lock"


def _buildah_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (buildah with chroot isolation)"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install buildah debootstrap)"
    return None


def pins() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[0-9][\w.+!-]*", version), f"not pinned: {line}"
        out[canonicalize_name(name)] = version
    return out


def test_every_dependency_is_pinned_within_its_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = pins()
    problems = []
    for text in project["dependencies"]:
        req = Requirement(text)
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} is not in {LOCK.name}")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} does not satisfy {req}")
    assert not problems, "\n".join(problems) + f"\nregenerate {LOCK.relative_to(REPO)} (see its header)"


def test_dockerfile_shape() -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert base and re.fullmatch(r"python:3\.1[1-9][\w.-]*", base.group(1)), "pin the base image"
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"], froms  # multi-stage, one base
    assert "--no-deps" in DOCKERFILE and "-r /tmp/requirements.lock" in DOCKERFILE
    assert "pip check" in DOCKERFILE
    # FUSE userspace (and the build stage's compiler) with pinned Debian versions; nothing
    # installed unpinned.
    pinned = set()
    for apt in re.findall(r"apt-get install((?:\\\n|[^\n&])*)", DOCKERFILE):
        words = [w for w in apt.split() if w != "\\" and not w.startswith("-")]
        unpinned = [w for w in words if not re.match(r"^[a-z0-9][\w.+-]*=\S", w)]
        assert not unpinned, f"unpinned: {unpinned}"
        pinned |= {w.split("=")[0] for w in words}
    assert pinned >= {"fuse3", "libfuse3-3", "gcc", "libc6-dev"}, pinned
    assert re.search(r'^ENTRYPOINT \["datahoard-entrypoint"\]$', DOCKERFILE, re.M)
    assert "useradd --uid 65532" in DOCKERFILE  # the uid the chart runs the operator as
    assert not re.search(r":latest\b", DOCKERFILE)


def test_build_context_has_what_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything but an allow-list; each COPY source must be on it."""
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path"
            assert any(src == a or src.startswith(a + "/") for a in allowed), \
                f"COPY {src} is excluded by .dockerignore"
    # Tests, charts, the e2e and local state stay out of the image.
    for path in ("tests", "charts", "e2e", ".venv", ".git", "bench"):
        assert not any(path == a or a.startswith(path + "/") for a in allowed), path


@pytest.mark.parametrize("argv, expected", [
    (["operator", "--liveness=http://0.0.0.0:8080/healthz"],
     "kopf run --standalone --all-namespaces -m datahoard.operator.handlers --liveness=http://0.0.0.0:8080/healthz"),
    (["worker", "s3://b/p", "/mnt/x"], "datahoard mount s3://b/p /mnt/x --foreground"),
    (["csi-node", "--node-id=n1"], "datahoard csi-node --node-id=n1"),
    (["datahoard", "status", "/mnt/x"], "datahoard status /mnt/x"),
    ([], "datahoard --help"),
])
def test_entrypoint_dispatch(tmp_path: Path, argv: list[str], expected: str) -> None:
    for tool in ("kopf", "datahoard"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        stub.chmod(0o755)
    out = subprocess.run([sys.executable, "-m", "datahoard.entrypoint", *argv], capture_output=True,
                         text=True, check=True, env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert out.stdout.strip() == expected


@pytest.mark.chart  # pip fetches every pinned wheel: network, minutes
@pytest.mark.skipif(_buildah_missing() is None,
                    reason="covered by test_dockerfile_builds_and_runs_with_buildah (buildah is installed)")
def test_pinned_set_installs_from_wheels_and_is_whole(tmp_path: Path) -> None:
    """Stage 1 of the Dockerfile, on this machine: wheels only, no resolver, then `pip check`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]

    def run(*args: str) -> None:
        result = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout}\n{result.stderr}"

    run("install", "--no-deps", "--only-binary=:all:", "-r", str(LOCK))
    run("install", "--no-deps", str(REPO))
    run("check")
    subprocess.run([str(venv / "bin" / "python"), "-c",
                    "import datahoard.operator.handlers, datahoard.csi_node.server, "
                    "datahoard.cache_worker.worker"], check=True, cwd=tmp_path, timeout=120,
                   env={**os.environ, "PYTHONPATH": ""})
    assert subprocess.run([str(venv / "bin" / "datahoard"), "--help"], capture_output=True,
                          timeout=60).returncode == 0


@pytest.mark.chart  # builds the image: root, network, minutes
@pytest.mark.skipif(_buildah_missing() is not None, reason=f"image build without Docker: {_buildah_missing()}")
@pytest.mark.timeout(1800)
def test_dockerfile_builds_and_runs_with_buildah(s3_server, s3, bucket) -> None:
    """The Dockerfile as written, built by buildah on a debootstrap'd bookworm + Python 3.11 base
    (the registry base is unreachable here), then each component's entrypoint smoke-tested (the
    operator's as uid 65532), and the cache worker in the image mounting a real S3 bucket through
    /dev/fuse and serving it from its cache. First run ~5 min (base cached in TOOLS_DIR), later
    ~2 min."""
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"train/img_{i}.JPEG", Body=bytes([i]) * 50_000)
    tools = os.environ.get("TOOLS_DIR", str(Path.home() / ".cache" / "datahoard-tools"))
    env = {**os.environ, "S3_ENDPOINT": s3_server.endpoint, "S3_BUCKET": bucket}
    if not os.path.exists("/dev/fuse"):
        env.pop("S3_ENDPOINT")  # the build and entrypoint checks still run
    result = subprocess.run([str(REPO / "tests" / "tools" / "check-image-buildah.sh"), tools],
                            capture_output=True, text=True, timeout=1700, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-5000:]
    if "S3_ENDPOINT" in env:
        assert re.search(r"^hit ratio +1\.000$", result.stderr, re.M), result.stderr[-3000:]
        # A fully cached small-file dataset: the kernel opens files itself (or, before that
        # switch, no file needs passing through); never "off" or a kernel without it.
        assert re.search(r"^passthrough +(yes|no: every file fits|no: the kernel opens files itself)",
                         result.stderr, re.M), result.stderr[-3000:]
