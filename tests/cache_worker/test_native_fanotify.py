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

from datahoard.cache_worker import direct_opens, open_watch
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


# -- a direct tree's files: any filesystem's handle, sized by a table of handle keys -----------

def _handle_event(handle_type: int, handle: bytes, pid: int) -> bytes:
    """One record for an open of a file on a local filesystem (ext4: inode and generation)."""
    info = open_watch._FID_INFO.pack(1, 0, open_watch._FID_INFO.size + len(handle), 7, 9, len(handle),
                                     handle_type) + handle
    size = open_watch._EVENT.size + len(info)
    return open_watch._EVENT.pack(size, 3, 0, open_watch._EVENT.size, 0x20, -1, pid) + info


def _table_of(handles: dict[tuple[int, bytes], int]) -> direct_opens.HandleSizes:
    return direct_opens.HandleSizes.of_keys({direct_opens.handle_key(t, h): size for (t, h), size in handles.items()})


def test_the_c_and_python_keys_of_a_handle_are_the_same():
    lib = fastopen.load()
    assert lib is not None, f"the native part must be built by make: {fastopen.unavailable}"
    for handle_type, handle in [(1, struct.pack("=II", 12, 3)), (1, struct.pack("=III", 5, 77, 1)),
                                (0x81, bytes(range(20))), (-1, b"\xff" * 128), (2, b"")]:
        assert fastopen.handle_key(lib, handle_type, handle) == direct_opens.handle_key(handle_type, handle)
    assert direct_opens.handle_key(1, b"ab") != direct_opens.handle_key(2, b"ab")  # the type counts


def test_opens_of_a_tree_count_the_same_in_c_and_in_python():
    """ext4-like (8 bytes) and tmpfs-like (12 bytes) handles, one not in the table (a file
    relinked since: ``extra``), one unknown: C sizes what the sorted table holds and hands the
    rest back by key, as the Python parser does."""
    lib = fastopen.load()
    assert lib is not None, f"the native part must be built by make: {fastopen.unavailable}"
    handles = {(1, struct.pack("=II", 1000 + i, 4)): 10_000 + i for i in range(30)}
    handles.update({(1, struct.pack("=III", 9, 500 + i, 0)): 70_000 + i for i in range(5)})
    table = _table_of(handles)
    relinked = (1, struct.pack("=II", 4242, 1))
    table.extra[direct_opens.handle_key(*relinked)] = 555
    opened = [*handles, relinked, (1, struct.pack("=II", 1, 1))]
    records = [_handle_event(*opened[i % len(opened)], pid=50 + i % 4) for i in range(1_000)]

    expected: dict[int, int] = {}
    for i in range(1_000):
        handle = opened[i % len(opened)]
        expected[50 + i % 4] = expected.get(50 + i % 4, 0) + handles.get(handle, 555 if handle == relinked else 0)

    seen: dict[int, int] = {}
    watch = OpenWatch("/", lambda nbytes, pid: seen.__setitem__(pid, seen.get(pid, 0) + nbytes),
                      dirs=lambda: [], sizes=table.sizes_of, key_of=direct_opens.handle_key)
    watch._count_ids(b"".join(records))
    assert seen == expected

    got = _through_socket(records, fastopen.TableCounter(lib, table.keys, table.sizes))
    native = dict(got.bytes_by_pid)
    sizes = table.sizes_of({key for key, _ in got.unknown})
    for key, pid in got.unknown:
        native[pid] = native.get(pid, 0) + sizes.get(key, 0)
    assert native == expected
    assert got.events == 1_000
    assert {key for key, _ in got.unknown} == {direct_opens.handle_key(*relinked),
                                               direct_opens.handle_key(1, struct.pack("=II", 1, 1))}


def test_a_table_of_real_files_keys_links_of_one_file_alike(tmp_path):
    """``name_to_handle_at`` of files on this machine's disk: two hard links (a tree entry and
    its cache file) are one key, two files are two, and a file relinked later is learnt."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 20)
    os.link(a, tmp_path / "a-link")
    table = direct_opens.HandleSizes.of_files([(str(a), 10), (str(tmp_path / "a-link"), 10), (str(b), 20)])
    assert len(table.keys) == 2 and list(table.keys) == sorted(table.keys)
    handles = direct_opens._Handles()
    key_a = direct_opens.handle_key(*handles.of(str(a)))
    assert key_a == direct_opens.handle_key(*handles.of(str(tmp_path / "a-link")))
    c = tmp_path / "c"
    c.write_bytes(b"z")
    key_c = direct_opens.handle_key(*handles.of(str(c)))
    assert table.sizes_of({key_a, key_c}) == {key_a: 10}
    table.learn(str(c), 1)
    assert table.sizes_of({key_a, key_c}) == {key_a: 10, key_c: 1}


def test_a_tree_that_cannot_be_watched_is_served_uncounted_and_says_why(tmp_path):
    """Past ``MAX_DIR_MARKS`` directories (each mark pins a directory in the kernel) the tree
    is not watched at all, and never through a filesystem mark (that would count every open of
    the cache's disk): ``how`` is what ``datahoard status`` shows."""
    from datahoard.cache_worker.fs import MAX_DIR_MARKS

    opens = direct_opens.DirectOpens(lambda nbytes, pid: None)
    opens.start(str(tmp_path), [], ["", *(f"d{i}" for i in range(MAX_DIR_MARKS))])
    assert opens.how == f"not counted: more than {MAX_DIR_MARKS:,} directories to mark"
    assert opens._watch is None
    missing = tmp_path / "gone"
    opens.start(str(tmp_path), [(str(missing), 1)], [""])  # a file that cannot be named
    assert opens.how.startswith("not counted: ") and "name_to_handle_at" in opens.how
    assert opens._watch is None
