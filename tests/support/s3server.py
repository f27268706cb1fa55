"""A real S3 server for tests: moto in server mode, over HTTP on a loopback port.

The tests talk to it as the worker does, through botocore and our urllib3 transport, so
signing, ranges, ETags and errors cross a real socket. The session-wide server and a bucket per
test are fixtures in tests/conftest.py; a test that needs a server of its own (other settings,
one it can stop) calls :func:`start_moto`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import boto3

from tests.support.ports import free_port


#: A cold ``python -m moto.server`` imports a lot; a loaded 2-core machine needs seconds.
START_TIMEOUT = 30.0


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def client(self, **creds):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **creds)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_moto(env: dict[str, str] | None = None) -> S3Server:
    """Start moto's server with ``env`` added to ours; return once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return S3Server(endpoint, process)
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("moto server exited at start") from None
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"moto server did not start in {START_TIMEOUT:g} s")
