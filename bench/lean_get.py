"""Requests/s and client CPU per request of the lean S3 GET path, against a local S3 server.

    python -m bench.lean_get [--endpoint URL] [--seconds 10] [--threads 8] [--size 4096]

With no ``--endpoint`` a moto server is started (moto's own CPU then shares the machine, so
compare CPU per request more than requests/s across runs); give a MinIO endpoint (credentials
from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) for a server that is not the bottleneck. Each
request is one :meth:`S3Source.fetch` of a small ranged, ETag-pinned object: the retry policy,
signing and the urllib3 transport, the whole per-chunk cost of the worker's hot path.
The numbers kept in ``cache_worker/s3_get.py``'s docstring come from here.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

from datahoard.cache_worker.s3 import S3Options, S3Source


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    server = None
    if args.endpoint is None:
        from tests.support.s3server import start_moto

        server = start_moto()
        args.endpoint = server.endpoint
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=args.endpoint, region_name="us-east-1")
        bucket = "lean-get-bench"
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        s3.put_object(Bucket=bucket, Key="obj", Body=os.urandom(args.size))
        source = S3Source(f"s3://{bucket}/", S3Options(endpoint_url=args.endpoint, region="us-east-1"))
        assert source._getter is not None, "not the lean path"
        obj = source.stat("obj")
        half = args.size // 2
        for _ in range(50):  # warm the pool
            source.fetch(obj, 1, half)
        count = [0] * args.threads
        stop = time.monotonic() + args.seconds

        def run(n: int) -> None:
            while time.monotonic() < stop:
                source.fetch(obj, 1, half)
                count[n] += 1

        cpu, wall = _cpu(), time.monotonic()
        threads = [threading.Thread(target=run, args=(n,)) for n in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu, wall = _cpu() - cpu, time.monotonic() - wall
        total = sum(count)
        print(f"{total} GETs in {wall:.1f} s: {total / wall:.0f} requests/s, "
              f"{cpu / total * 1e6:.0f} us client CPU per request ({args.threads} threads)")
        source.close()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
