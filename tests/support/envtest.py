"""A real control plane for cluster-tier tests: etcd + kube-apiserver on free loopback ports.

This is what controller-runtime's envtest does, in Python: no kubelet, scheduler or
controller-manager run, so tests play those parts themselves (create pods, patch their status,
delete what garbage collection would). Binaries come from ``KUBEBUILDER_ASSETS`` when it is set,
otherwise from ``make -s envtest`` (built once from Go modules and cached outside the repo).

Authentication is a static token for an admin in ``system:masters`` and authorization is RBAC,
so the API server enforces the same rules as a real cluster.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "datahoard-envtest-admin"
BINARIES = ("etcd", "kube-apiserver", "kubectl")
#: A cold start of kube-apiserver (CRD/RBAC bootstrap) takes a few seconds; a loaded 2-core CI
#: machine can be much slower, and waiting longer costs nothing when it is fast.
START_TIMEOUT = float(os.environ.get("KUBEBUILDER_CONTROLPLANE_START_TIMEOUT", "120"))


def assets_dir() -> Path:
    """The directory with etcd, kube-apiserver and kubectl (building them if needed)."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env and all((Path(env) / b).exists() for b in BINARIES):
        return Path(env)
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "envtest"], cwd=REPO, check=True,
        stdout=subprocess.PIPE, text=True,
    ).stdout.strip().splitlines()[-1]
    return Path(out)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver in ``workdir``; ``kubeconfig`` works for kubectl and Python clients."""

    assets: Path
    workdir: Path
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_files()
        self.start_etcd()
        self.start_apiserver()

    def _write_files(self) -> None:
        (self.workdir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')
        key = self.workdir / "sa.key"
        if not key.exists():
            # One RSA private key serves as both signing key and verification key.
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                           capture_output=True)
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "envtest",
            "clusters": [{"name": "envtest", "cluster": {"server": self.url,
                                                         "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn("etcd", [
            str(self.assets / "etcd"), "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}", "--unsafe-no-fsync",
        ])

    def start_apiserver(self) -> None:
        self._spawn("kube-apiserver", [
            str(self.assets / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
            "--cert-dir", str(self.workdir / "certs"),
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.port),
            "--service-account-issuer", f"{self.url}/",
            "--service-account-key-file", str(self.workdir / "sa.key"),
            "--service-account-signing-key-file", str(self.workdir / "sa.key"),
            "--service-cluster-ip-range", "10.0.0.0/24",
            "--authorization-mode", "RBAC",
            "--token-auth-file", str(self.workdir / "tokens.csv"),
            "--allow-privileged=true",
            # No controller-manager runs: nothing would create default ServiceAccounts, and
            # nothing would ever remove the PV/PVC protection finalizers.
            "--disable-admission-plugins", "ServiceAccount,StorageObjectInUseProtection",
        ])
        self.wait_ready()

    def wait_ready(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(f"{self.url}/readyz",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                       f"{self.workdir / (name + '.log')}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready after {START_TIMEOUT}s; see "
                                   f"{self.workdir / 'kube-apiserver.log'}")
            time.sleep(0.3)

    def stop_apiserver(self, crash: bool = False) -> None:
        """Stop kube-apiserver; ``crash`` kills it at once (a graceful stop drains for ~20 s)."""
        self._stop("kube-apiserver", crash)

    def _stop(self, name: str, crash: bool = False) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if crash:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        self._stop("kube-apiserver")
        self._stop("etcd")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        """Run the envtest kubectl against this control plane."""
        return subprocess.run(
            [str(self.assets / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, check=check, timeout=60,
        )
