"""The remote store of the benchmark: MinIO in its own network namespace, behind a capped, slow link.

    host (readers, FUSE daemons)                       namespace dhb-<pid>
    127.0.0.1:P --latproxy (+RTT)--> veth 10.77.N.1 <==tbf==> veth 10.77.N.2:9000  MinIO

1. a network namespace and a veth pair; ``tc tbf`` on both ends caps the bandwidth each way
   (this kernel has tbf but no netem);
2. MinIO, single drive, serving from a directory on local disk, inside the namespace;
3. ``latproxy`` (bench/latproxy, our own 100-line Go proxy) on the host adds the round trip:
   every client talks to ``127.0.0.1:P``. Uploads go straight to the namespace address, before
   the cap is applied, so creating the data set does not eat the benchmark's time.

Everything is torn down in ``close()``, also after a failure half way through ``start()``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "benchadmin"
SECRET_KEY = "benchadmin-secret"
BUCKET = "bench"


def _sh(*cmd: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    if netns:
        cmd = ("ip", "netns", "exec", netns, *cmd)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LinkSpec:
    rtt_ms: float = 10.0
    #: Bits per second each way; 0 = uncapped.
    rate_bits: int = 1_000_000_000


class RemoteStore:
    def __init__(self, tools_dir: Path, work: Path, link: LinkSpec) -> None:
        self.minio_bin = tools_dir / "minio" / "minio"
        self.proxy_bin = tools_dir / "latproxy" / "latproxy"
        self.work = work
        self.link = link
        tag = os.getpid() % 100000
        self.netns = f"dhb-{tag}"
        self.veth_host, self.veth_ns = f"dhb{tag}h", f"dhb{tag}n"
        subnet = 10 + os.getpid() % 200
        self.host_ip, self.ns_ip = f"10.77.{subnet}.1", f"10.77.{subnet}.2"
        self.direct_endpoint = f"http://{self.ns_ip}:9000"
        self.endpoint = ""
        self._procs: list[subprocess.Popen] = []
        self._netns_made = False
        self._veth_made = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._start_network()
            self._start_minio()
            self._start_proxy()
        except BaseException:
            self.close()
            raise

    def _start_network(self) -> None:
        _sh("ip", "netns", "add", self.netns)
        self._netns_made = True
        _sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        self._veth_made = True
        _sh("ip", "link", "set", self.veth_ns, "netns", self.netns)
        _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth_host)
        _sh("ip", "link", "set", self.veth_host, "up")
        _sh("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.veth_ns, netns=self.netns)
        _sh("ip", "link", "set", self.veth_ns, "up", netns=self.netns)
        _sh("ip", "link", "set", "lo", "up", netns=self.netns)

    def apply_bandwidth_cap(self) -> None:
        """``tc tbf`` on both ends of the veth; burst sized for ~1 ms at the rate (min 64 KB)."""
        rate = self.link.rate_bits
        if not rate:
            return
        burst = max(64_000, rate // 8 // 1000)
        spec = ["root", "tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"]
        _sh("tc", "qdisc", "replace", "dev", self.veth_host, *spec)
        _sh("tc", "qdisc", "replace", "dev", self.veth_ns, *spec, netns=self.netns)

    def _start_minio(self) -> None:
        data = self.work / "minio-data"
        data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY,
                   MINIO_BROWSER="off", MINIO_UPDATE="off")
        log = open(self.work / "minio.log", "wb")
        self._procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns, str(self.minio_bin), "server", "--quiet",
             "--address", f"{self.ns_ip}:9000", str(data)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._procs[-1].poll() is not None:
                raise RuntimeError(f"MinIO exited; see {self.work / 'minio.log'}")
            try:
                urllib.request.urlopen(f"{self.direct_endpoint}/minio/health/live", timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("MinIO did not become healthy in 60 s")
        self.client(direct=True).create_bucket(Bucket=BUCKET)

    def _start_proxy(self) -> None:
        port = free_port()
        log = open(self.work / "latproxy.log", "wb")
        self._procs.append(subprocess.Popen(
            [str(self.proxy_bin), "-listen", f"127.0.0.1:{port}", "-upstream", f"{self.ns_ip}:9000",
             "-rtt", f"{self.link.rtt_ms}ms"],
            stdout=log, stderr=subprocess.STDOUT,
        ))
        self.endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("latproxy did not start")

    def close(self) -> None:
        for proc in reversed(self._procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._veth_made:
            _sh("ip", "link", "del", self.veth_host, check=False)
            self._veth_made = False
        if self._netns_made:
            _sh("ip", "netns", "del", self.netns, check=False)
            self._netns_made = False
        shutil.rmtree(self.work / "minio-data", ignore_errors=True)

    # -- clients -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Credentials for every S3 client of the run (boto3, datahoard, rclone via flags)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, direct: bool = False, pool: int = 10):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.direct_endpoint if direct else self.endpoint,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=Config(max_pool_connections=pool, retries={"max_attempts": 5, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def measured_rtt_ms(self, samples: int = 30) -> dict:
        """Round trip of a tiny request through the proxy, against the same request direct."""
        out = {}
        for name, direct in (("proxied", False), ("direct", True)):
            s3 = self.client(direct=direct)
            s3.head_bucket(Bucket=BUCKET)
            times = []
            for _ in range(samples):
                t = time.perf_counter()
                s3.head_bucket(Bucket=BUCKET)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            out[name] = round(times[len(times) // 2], 2)
        return out
