"""The datasets the HDFS tests put into the test cluster, once per session."""

from __future__ import annotations

import os
import random

MiB = 1 << 20
#: Files in /many: with dfs.ls.limit=5 the top directory alone needs 20 listing batches.
MANY_TOP = 100
MANY_SUB = 20
#: Simple-auth users: the owner of the private data and somebody else.
OWNER = "alice"
OTHER = "bob"


def sample_files() -> dict[str, bytes]:
    rng = random.Random(8)
    return {
        "class0/img 1.jpg": rng.randbytes(110_000),
        "class0/img2.jpg": rng.randbytes(90_000),
        "class1/ünïcödé 名前.jpg": rng.randbytes(50_000),
        # More names than one listing batch holds, so the walk resumes after a non-ASCII name;
        # and characters that mean something in a URL.
        **{f"class1/ü{i} ñ.jpg": rng.randbytes(100 + i) for i in range(5)},
        "class1/odd %41 #1?a=b&c+d;e.bin": rng.randbytes(999),
        "deep/a/b/c/d/e/h.bin": rng.randbytes(3_000),
        "empty.txt": b"",
        # 20+ HDFS blocks of 1 MiB, and several of the cache's 8 MiB chunks.
        "shard.bin": os.urandom(20 * MiB + 12345),
    }


def many_files() -> dict[str, bytes]:
    files = {f"f{i:04d}.txt": f"file {i}\n".encode() * (i % 5 + 1) for i in range(MANY_TOP)}
    files.update({f"sub/g{i:03d}.txt": f"sub {i}\n".encode() for i in range(MANY_SUB)})
    return files
