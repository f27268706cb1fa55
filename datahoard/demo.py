"""``make demo``: the whole standalone path on one machine, in about a minute.

1. start a local S3 server (moto, over HTTP) and upload a small synthetic image dataset;
2. ``datahoard mount`` it;
3. read every file twice, like two training epochs, printing ``datahoard status`` after each:
   the hit ratio is near 0 after the first epoch and climbs towards 1 with the second;
4. unmount and stop the server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLASSES = 10
FILES_PER_CLASS = 40
FILE_SIZE = 110_000  # about an ImageNet JPEG
SHARD_SIZE = 48 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_s3() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the local S3 server did not start")


def _upload(endpoint: str) -> int:
    import boto3
    from rich.progress import track

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="datasets")
    keys = [f"imagenet-mini/train/n{c:08d}/img_{i:04d}.JPEG" for c in range(CLASSES) for i in range(FILES_PER_CLASS)]
    for key in track(keys, description="uploading a synthetic dataset"):
        s3.put_object(Bucket="datasets", Key=key, Body=os.urandom(FILE_SIZE))
    s3.put_object(Bucket="datasets", Key="imagenet-mini/train/shard-000.tar", Body=os.urandom(SHARD_SIZE))
    return len(keys) * FILE_SIZE + SHARD_SIZE


def _datahoard(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "datahoard.cli", *args], check=True)


def _served(mountpoint: Path) -> tuple[int, int]:
    from datahoard import runtime

    stats = runtime.fetch_stats(runtime.lookup(mountpoint).stats_url)
    return stats.served_from_cache_bytes, stats.served_from_source_bytes


def _epoch(root: Path, number: int) -> None:
    start = time.monotonic()
    count = size = 0
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            with open(os.path.join(dirpath, name), "rb") as f:
                size += len(f.read())
            count += 1
    elapsed = time.monotonic() - start
    print(f"\nepoch {number}: read {count} files, {size / 1e6:.1f} MB in {elapsed:.2f} s "
          f"({count / elapsed:.0f} files/s)")


def main() -> int:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    work = Path(tempfile.mkdtemp(prefix="datahoard-demo-"))
    mountpoint, cache = work / "imagenet-mini", work / "cache"
    server, endpoint = _start_s3()
    mounted = False
    try:
        total = _upload(endpoint)
        print(f"uploaded {total / 1e6:.1f} MB to s3://datasets/imagenet-mini/train/ at {endpoint}")
        extra = [] if os.geteuid() == 0 else ["--no-allow-other"]
        _datahoard("mount", "s3://datasets/imagenet-mini/train/", str(mountpoint),
                   "--endpoint-url", endpoint, "--cache-dir", str(cache), "--capacity", "1Gi", *extra)
        mounted = True
        before = (0, 0)
        for epoch in (1, 2):
            _epoch(mountpoint, epoch)
            _datahoard("status", str(mountpoint))
            after = _served(mountpoint)
            cache_bytes, source_bytes = after[0] - before[0], after[1] - before[1]
            print(f"epoch {epoch} hit ratio: {cache_bytes / max(1, cache_bytes + source_bytes):.3f} "
                  "(bytes from cache / bytes read in this epoch; `status` shows the whole mount)")
            before = after
        return 0
    finally:
        if mounted:
            _datahoard("umount", str(mountpoint))
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        print("\ncleaned up: unmounted, S3 server stopped, cache removed")


if __name__ == "__main__":
    sys.exit(main())
