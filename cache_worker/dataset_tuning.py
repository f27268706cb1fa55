"""The knobs of the read path (:class:`Tuning`): chunk geometry, read-ahead, warming's width and
bandwidth, the whole-object check's limit, and how long and how many reads may wait on the
source. Apart from ``dataset.py`` because the CLI and the worker's configuration build a
``Tuning`` without needing the cache itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Tuning:
    #: Objects up to this size are fetched and stored whole: one request, one file, and the
    #: unit the kernel page cache accounting (see fs.py) relies on.
    whole_file_max: int = 8 * MiB
    #: Larger objects are fetched in chunks of this size: big enough for S3 throughput, small
    #: enough that a random 4 KiB read costs one modest request.
    chunk_size: int = 8 * MiB
    #: Chunks fetched ahead of a sequential reader of a large file.
    readahead_chunks: int = 4
    #: Parallel fetches while warming.
    warm_parallelism: int = 16
    #: Bytes/s cap on warming traffic; None for no cap. Application reads are never capped.
    warm_bandwidth: float | None = None
    #: Large objects up to this size are fetched and checked whole before any byte of them is
    #: served (see verify.py); larger ones are served as their chunks arrive and checked once
    #: every chunk is cached. 1 GiB: shards are read whole anyway, and a random read into a
    #: bigger file must not fetch all of it.
    check_whole_max: int = 1 << 30
    #: Seconds a read through the view waits for the source before it fails (EIO): a store
    #: that went silent must not hold the reader, or a libfuse thread, for the many minutes
    #: its fetch's retries may last.
    read_wait: float = 120.0
    #: Reads that may wait on the source at once; the view runs this many libfuse threads plus
    #: a reserve that never waits on the source.
    max_waiting_reads: int = 64
    #: Fetches whose readers gave up that may still run before new misses fail fast.
    max_abandoned_fetches: int = 16


def read_limits_from_env(environ: Mapping[str, str]) -> dict:
    """``DATAHOARD_READ_WAIT`` (seconds, default 120) and ``DATAHOARD_MAX_WAITING_READS``
    (default 64), as :class:`Tuning` keyword arguments."""
    limits: dict = {}
    if environ.get("DATAHOARD_READ_WAIT"):
        limits["read_wait"] = float(environ["DATAHOARD_READ_WAIT"])
    if environ.get("DATAHOARD_MAX_WAITING_READS"):
        limits["max_waiting_reads"] = max(1, int(environ["DATAHOARD_MAX_WAITING_READS"]))
    return limits

