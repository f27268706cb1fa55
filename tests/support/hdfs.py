"""A real single-node HDFS for the HDFS source tests: Apache Hadoop's MiniDFSCluster (one
NameNode, one DataNode, WebHDFS and permissions on), from the published Maven artifacts, fetched
and compiled once by tests/hdfs/build-minicluster.sh into ``~/.cache/datahoard-tools`` (override:
``DATAHOARD_TOOLS_DIR`` or ``TOOLS_DIR``), and a WebHDFS client that writes test data into it.
The session fixtures that start it are in tests/hdfs/conftest.py.

The cluster is set up to make the interesting cases cheap: ``dfs.ls.limit`` is tiny so a
directory of a few hundred files needs dozens of listing batches, and ``dfs.blocksize`` is the
1 MiB minimum so a 20 MiB file spans many blocks (and the DataNode redirects per range).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import urllib3

REPO = Path(__file__).resolve().parents[2]
#: tests/hdfs: build-minicluster.sh and the MiniHdfs sources.
HERE = REPO / "tests" / "hdfs"
#: The Makefile's TOOLS_DIR, where `make hdfs-minicluster` put the cluster before pytest started.
TOOLS_DIR = Path(os.environ.get("DATAHOARD_TOOLS_DIR") or os.environ.get("TOOLS_DIR")
                 or Path.home() / ".cache" / "datahoard-tools")
#: Entries per LISTSTATUS_BATCH response in the test cluster (Hadoop's default is 1000).
LS_LIMIT = 5
BLOCK_SIZE = 1 << 20
START_TIMEOUT = 120

JAVA_MISSING = (
    None if shutil.which("java") and shutil.which("javac")
    else "needs a JDK (java and javac on PATH) to run Hadoop's MiniDFSCluster"
)


@dataclass
class HdfsCluster:
    http: str  # NameNode WebHDFS host:port
    rpc: str  # NameNode RPC host:port (not HTTP)
    superuser: str
    process: subprocess.Popen
    log: Path

    def uri(self, path: str = "/") -> str:
        return f"hdfs://{self.http}{path}"


class WebHdfsClient:
    """Writes test data through WebHDFS (the two-step CREATE via the DataNode) as the superuser."""

    def __init__(self, cluster: HdfsCluster) -> None:
        self.base = f"http://{cluster.http}/webhdfs/v1"
        self.user = cluster.superuser
        self.http = urllib3.PoolManager(maxsize=16, retries=False, timeout=30)

    def _call(self, method: str, path: str, op: str, body: bytes | None = None, *,
              user: str | None = None, **params) -> urllib3.BaseHTTPResponse:
        fields = {"op": op, "user.name": user or self.user, **{k: str(v) for k, v in params.items()}}
        url = f"{self.base}{quote(path, safe='/')}?{urlencode(fields)}"
        response = self.http.request(method, url, redirect=False)
        if response.status == 307:
            location = response.headers["Location"]
            response = self.http.request(method, location, body=body or b"", redirect=False,
                                         headers={"Content-Type": "application/octet-stream"})
        if response.status >= 300:
            raise AssertionError(f"WebHDFS {op} {path}: HTTP {response.status}: {response.data[:300]!r}")
        return response

    def mkdirs(self, path: str, permission: str = "755") -> None:
        self._call("PUT", path, "MKDIRS", permission=permission)

    def put(self, path: str, data: bytes, permission: str = "644") -> None:
        self._call("PUT", path, "CREATE", data, overwrite="true", permission=permission)

    def put_many(self, files: dict[str, bytes]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: self.put(*item), files.items()))

    def chown(self, path: str, owner: str, group: str | None = None) -> None:
        self._call("PUT", path, "SETOWNER", owner=owner, **({"group": group} if group else {}))

    def chmod(self, path: str, permission: str) -> None:
        self._call("PUT", path, "SETPERMISSION", permission=permission)

    def delete(self, path: str) -> None:
        self._call("DELETE", path, "DELETE", recursive="true")

    def status(self, path: str) -> dict:
        return json.loads(self._call("GET", path, "GETFILESTATUS").data)["FileStatus"]


def _build_classpath() -> str:
    result = subprocess.run(
        [str(HERE / "build-minicluster.sh"), str(TOOLS_DIR)],
        capture_output=True, text=True, timeout=1200,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the test HDFS failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def start_cluster(base: Path, *settings: str) -> HdfsCluster:
    classpath = _build_classpath()
    log = base / "minihdfs.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                "java", "-Xmx768m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.net.preferIPv4Stack=true", "-cp", classpath, "MiniHdfs", str(base / "data"),
                f"dfs.ls.limit={LS_LIMIT}", f"dfs.blocksize={BLOCK_SIZE}", *settings,
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
        )
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    line = ready[0] if ready else ""
    if not line.startswith("READY "):
        stop_cluster(process)
        raise RuntimeError(f"MiniHdfs did not start in {START_TIMEOUT} s; its log {log}:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    _, http, rpc, superuser = line.split()
    return HdfsCluster(http=http, rpc=rpc, superuser=superuser, process=process, log=log)


def stop_cluster(process: subprocess.Popen) -> None:
    """Closing stdin asks MiniHdfs to shut down; SIGTERM, then SIGKILL, if it does not."""
    try:
        process.stdin.close()
    except OSError:
        pass
    for action in (None, process.terminate, process.kill):
        if action:
            action()
        try:
            process.wait(15)
            return
        except subprocess.TimeoutExpired:
            continue
