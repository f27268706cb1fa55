"""The benchmark's data: generated on local disk (the local-disk copy), then uploaded to MinIO.

Layout under the bucket (and under ``local/``):

* ``imagenet/train/n<class>/<class>_<i>.JPEG``: ~110 KB files (uniform 60–160 KB, mean 110 KB,
  like ImageNet's JPEGs), random bytes so nothing compresses;
* ``shards/shard-<i>.tar``: multi-GB files read sequentially;
* ``random/blob.bin``: one large file for random 4 KB–1 MB reads.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


@dataclass(frozen=True)
class Scale:
    classes: int
    files_per_class: int
    shards: int
    shard_bytes: int
    random_bytes: int
    random_reads: int
    #: rclone, s3fs and serial boto3 read this many ImageNet files (a shuffled sample), so that
    #: their slow cold epochs fit the run; rates are per second, so they stay comparable.
    peer_files: int
    serial_files: int
    #: boto3 with the readers' concurrency (and with 16, the store's bandwidth) reads this many.
    boto3_files: int
    readers: int
    epoch_cap: float
    #: Warm epochs are run this many times and the best kept (see run.Bench.epoch).
    warm_repeats: int
    metadata_sizes: tuple[int, ...]


FULL = Scale(classes=100, files_per_class=200, shards=2, shard_bytes=1536 * MiB, random_bytes=1024 * MiB,
             random_reads=2000, peer_files=3000, serial_files=500, boto3_files=6000, readers=8, epoch_cap=90.0, warm_repeats=3,
             metadata_sizes=(10_000, 100_000, 1_000_000))
QUICK = Scale(classes=10, files_per_class=40, shards=1, shard_bytes=64 * MiB, random_bytes=64 * MiB,
              random_reads=200, peer_files=200, serial_files=60, boto3_files=400, readers=4, epoch_cap=30.0, warm_repeats=2,
              metadata_sizes=(10_000, 20_000))


def imagenet_paths(scale: Scale) -> list[str]:
    return [f"imagenet/train/n{c:08d}/n{c:08d}_{i:05d}.JPEG"
            for c in range(scale.classes) for i in range(scale.files_per_class)]


def shard_paths(scale: Scale) -> list[str]:
    return [f"shards/shard-{i:03d}.tar" for i in range(scale.shards)]


RANDOM_PATH = "random/blob.bin"


def generate(root: Path, scale: Scale, seed: int = 1) -> int:
    """Write the local copy; returns its size in bytes."""
    rng = random.Random(seed)
    total = 0
    for rel in imagenet_paths(scale):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(60_000, 160_000)
        path.write_bytes(os.urandom(size))
        total += size
    # Big files repeat one random 16 MiB block at shifting offsets: fast to write, incompressible
    # enough for MinIO (it does not compress by default anyway) and distinct per chunk.
    block = os.urandom(16 * MiB)
    for rel, size in [(p, scale.shard_bytes) for p in shard_paths(scale)] + [(RANDOM_PATH, scale.random_bytes)]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            written = 0
            while written < size:
                shift = rng.randrange(len(block))
                piece = (block[shift:] + block[:shift])[: min(len(block), size - written)]
                f.write(piece)
                written += len(piece)
        total += size
    return total


def upload(root: Path, client, bucket: str, scale: Scale) -> None:
    from boto3.s3.transfer import TransferConfig

    small = imagenet_paths(scale)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda rel: client.upload_file(str(root / rel), bucket, rel), small))
    cfg = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=8)
    for rel in shard_paths(scale) + [RANDOM_PATH]:
        client.upload_file(str(root / rel), bucket, rel, Config=cfg)
