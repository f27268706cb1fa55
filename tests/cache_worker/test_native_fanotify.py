"""Counting fanotify's open events in C (``NativeOpens.count_fanotify``, fastopen.c) against the
Python parser it stands in for (``OpenWatch._count_ids``): the same records, in the kernel's
layout (struct fanotify_event_metadata, then struct fanotify_event_info_fid and FUSE's handle),
must count the same bytes per process. No kernel: the records come through a unix socket of
datagrams, each read of which returns whole records as a read of the fanotify descriptor does;
the C part reads until it would block (fanotify's descriptor is non-blocking) or, here, until
the sender has closed its end. The kernel's own records, through a real mount:
test_kernel_opens.py."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading

import pytest

from datahoard.cache_worker import open_watch
from datahoard.cache_worker.fusell import fastopen
from datahoard.cache_worker.open_watch import OpenWatch

SIZES = {0x10000 + i: 1_000 + i for i in range(40)}


def _event(nodeid: int, pid: int, *, handle_type: int = 0x81, mask: int = 0x20) -> bytes:
    """One record as the kernel writes it for an open of a FUSE file (fuse_encode_fh: node id
    high, low, generation)."""
    handle = struct.pack("=III", nodeid >> 32, nodeid & 0xFFFFFFFF, 0)
    info = open_watch._FID_INFO.pack(1, 0, open_watch._FID_INFO.size + len(handle), 0, 0, len(handle),
                                     handle_type) + handle
    size = open_watch._EVENT.size + len(info)
    return open_watch._EVENT.pack(size, 3, 0, open_watch._EVENT.size, mask, -1, pid) + info


@pytest.fixture
def native(tmp_path):
    lib = fastopen.load()
    assert lib is not None, f"the native part must be built by make: {fastopen.unavailable}"
    counts = mmap.mmap(-1, 8 * 64)
    opens = fastopen.NativeOpens(lib, -1, counts, 64)
    cache_file = tmp_path / "object"
    cache_file.write_bytes(b"x")
    st = cache_file.stat()
    yield opens, (str(cache_file), st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    opens.close()
    counts.close()


def _arm(opens: fastopen.NativeOpens, file, nodeid: int, size: int) -> None:
    """Armed for reads (backing id -1), as kernel opens arm files; the entry's size is the cache
    file's, which for a whole file is the object's."""
    path, ino, mtime, ctime = file
    assert opens.arm(nodeid, -1, 0, path, (ino, size, mtime, ctime))


def _through_socket(records: list[bytes], count):
    """``count(fd)`` of a socket whose peer sends ``records``, whole ones up to 64 KiB per
    datagram (what one read of the fanotify descriptor can return), then closes."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def send() -> None:
        batches, batch = [], b""
        for record in records:
            if len(batch) + len(record) > 64 * 1024:
                batches.append(batch)
                batch = b""
            batch += record
        with theirs:
            try:
                for batch in batches + [batch]:
                    theirs.sendall(batch)
            except OSError:  # the reader stopped early and closed its end: the counts say so
                pass

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return count(ours.fileno())
    finally:
        ours.close()
        sender.join()


def _python_counts(records: list[bytes]) -> dict[int, int]:
    seen: dict[int, int] = {}
    watch = OpenWatch("/", lambda nbytes, pid: seen.__setitem__(pid, seen.get(pid, 0) + nbytes),
                      dirs=lambda: [], sizes=lambda nodes: {n: SIZES[n] for n in nodes if n in SIZES})
    watch._count_ids(b"".join(records))
    return seen


def _native_counts(opens: fastopen.NativeOpens, records: list[bytes]) -> tuple[dict[int, int], fastopen.FanotifyCount]:
    got = _through_socket(records, opens.count_fanotify)
    seen = dict(got.bytes_by_pid)
    for node, pid in got.unknown:  # what OpenWatch._count_native asks the index for
        seen[pid] = seen.get(pid, 0) + SIZES.get(node, 0)
    return seen, got


def test_armed_and_unarmed_opens_count_what_the_python_parser_counts(native):
    opens, file = native
    armed = list(SIZES)[:25]
    for node in armed:
        _arm(opens, file, node, SIZES[node])
    nodes = list(SIZES)
    records = [_event(nodes[i % len(nodes)], 100 + i % 3) for i in range(300)]
    # Not FUSE's handle (another filesystem's): counted by neither, as the Python parser skips it.
    records.append(_event(nodes[0], 100, handle_type=1))

    seen, got = _native_counts(opens, records)

    assert seen == _python_counts(records)
    assert got.events == 300 and got.overflows == 0 and got.error == 0
    unarmed = {node for node, _ in got.unknown}
    assert unarmed == set(nodes) - set(armed)  # only these needed the index
    assert opens.stats()["kernel_opens_counted"] == 300 - len(got.unknown)


def test_more_events_than_one_call_holds_are_all_counted(native):
    """The C part stops for room in its output (about 1,300 rows a read) and is called again:
    with every id unarmed, each event is one row, and none may be lost between calls."""
    opens, _ = native
    nodes = list(SIZES)
    records = [_event(nodes[i % len(nodes)], 7) for i in range(20_000)]
    seen, got = _native_counts(opens, records)
    assert got.events == 20_000 and len(got.unknown) == 20_000
    assert seen == {7: sum(SIZES[nodes[i % len(nodes)]] for i in range(20_000))}


def test_more_processes_than_the_sums_hold_are_each_counted(native):
    opens, file = native
    node = next(iter(SIZES))
    _arm(opens, file, node, SIZES[node])
    records = [_event(node, pid) for pid in range(1, 201)]  # 200 openers, 64 sums in C
    seen, _ = _native_counts(opens, records)
    assert seen == {pid: SIZES[node] for pid in range(1, 201)}


def test_a_queue_overflow_is_reported(native):
    opens, _ = native
    overflow = open_watch._EVENT.pack(open_watch._EVENT.size, 3, 0, open_watch._EVENT.size,
                                      open_watch._FAN_Q_OVERFLOW, -1, 0)
    _, got = _native_counts(opens, [overflow, _event(next(iter(SIZES)), 5)])
    assert got.overflows == 1 and got.events == 1


def test_a_closed_state_counts_nothing_and_says_so(native):
    """After close (the worker's shutdown) the watch falls back to its own parser: None."""
    opens, _ = native
    opens.close()
    assert _through_socket([_event(next(iter(SIZES)), 5)], opens.count_fanotify) is None
