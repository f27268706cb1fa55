"""One file per object (store.py): the layout, its crash rule, eviction that never pulls a
backing file from under a reader, backing_fd() and its recorded whole-object verification, a
disk that fills during the layout, and the migration of the older one-file-per-chunk layout.
All on real files (a real tmpfs for ENOSPC, a real SIGKILLed process for the crash)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from datahoard.cache_worker.store import CacheFull, ChunkId, ChunkStore

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 256 * KiB


def chunks_of(oid: str, body: bytes, csize: int = CHUNK) -> list[ChunkId]:
    return [ChunkId(oid, i, i * csize, len(body)) for i in range(-(-len(body) // csize))]


def put_all(store: ChunkStore, oid: str, body: bytes, csize: int = CHUNK, only=None) -> list[ChunkId]:
    chunks = chunks_of(oid, body, csize)
    for c in chunks:
        if only is None or c.index in only:
            store.put(c, body[c.offset:c.offset + csize])
    return chunks


def rchar() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_an_object_is_one_file_with_its_chunks_at_their_offsets(tmp_path):
    store = ChunkStore(tmp_path, capacity=1 << 30)
    body = os.urandom(5 * CHUNK + 1234)
    oid = "a" * 40
    chunks = put_all(store, oid, body, only={1, 3})  # an incomplete object: a sparse file
    path = store.path(oid)
    assert sorted(p.name for p in (tmp_path / "data").rglob("*") if p.is_file()) == [oid]
    st = os.stat(path)
    assert st.st_size == 4 * CHUNK and st.st_blocks * 512 < 3 * CHUNK  # holes where 0 and 2 go
    assert path.read_bytes()[CHUNK:2 * CHUNK] == body[CHUNK:2 * CHUNK]
    assert store.backing_fd(oid, chunks) is None  # not whole yet
    put_all(store, oid, body, only={0, 2, 4, 5})
    assert path.read_bytes() == body
    fd = store.backing_fd(oid, chunks)
    assert fd is not None
    try:
        assert os.pread(fd, len(body), 0) == body
        assert os.get_inheritable(fd) is False and os.fstat(fd).st_ino == st.st_ino
    finally:
        os.close(fd)
    for c in chunks:
        assert store.read(c, 7, 100) == body[c.offset + 7:c.offset + 107]
    assert store.used_bytes == len(body)
    store.close()
    again = ChunkStore(tmp_path, capacity=1 << 30)
    assert again.read(chunks[5], 0, 1234) == body[5 * CHUNK:]
    assert again.used_bytes == len(body)


_FILLER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from datahoard.cache_worker.store import ChunkId, ChunkStore
    root, csize = Path(sys.argv[1]), int(sys.argv[2])
    store = ChunkStore(root, capacity=1 << 30)
    n = 0
    while True:  # objects of 8 chunks whose bytes say where they are, until killed
        oid = f"{n:040x}"
        for i in range(8):
            store.put(ChunkId(oid, i, i * csize, 8 * csize), (b"%s:%d;" % (oid.encode(), i)) * (csize // 48))
            if n == 0 and i == 2:
                print("filling", flush=True)
        n += 1
""")


def test_a_fill_killed_mid_write_leaves_no_record_of_a_torn_range(tmp_path):
    """SIGKILL a process filling objects chunk by chunk with pwrite: every chunk the record
    lists reads back right in the next process, the rest is refetched (put again)."""
    csize = 48 * 4096
    child = subprocess.Popen([sys.executable, "-c", _FILLER, str(tmp_path), str(csize)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "filling\n"
    time.sleep(0.7)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = ChunkStore(tmp_path, capacity=1 << 30)
    names = [n for (n,) in sqlite3.connect(tmp_path / "chunks.db").execute("SELECT name FROM chunks")]
    assert len(names) >= 3
    for name in names:
        oid, _, index = name.rpartition(".")
        chunk = ChunkId(oid, int(index), int(index) * csize, 8 * csize)
        expected = (b"%s:%s;" % (oid.encode(), index.encode())) * (csize // 48)
        assert store.read(chunk, 0, csize) == expected, name
    last = max(n.rpartition(".")[0] for n in names)
    for i in range(8):  # the object being filled when it died completes with fresh puts
        store.put(ChunkId(last, i, i * csize, 8 * csize), (b"%s:%d;" % (last.encode(), i)) * (csize // 48))
    fd = store.backing_fd(last, [ChunkId(last, i, i * csize, 8 * csize) for i in range(8)])
    assert fd is not None
    os.close(fd)


def test_a_torn_range_without_a_record_is_not_served_and_is_written_again(tmp_path):
    store = ChunkStore(tmp_path, capacity=1 << 30)
    body = os.urandom(3 * CHUNK)
    oid = "b" * 40
    chunks = put_all(store, oid, body, only={0})
    store.close()
    with open(store.path(oid), "r+b") as f:  # what a crash between pwrite and record leaves
        f.seek(CHUNK)
        f.write(b"torn" * 1000)
    again = ChunkStore(tmp_path, capacity=1 << 30)
    assert again.read(chunks[1], 0, 10) is None and not again.contains(chunks[1])
    assert again.read(chunks[0], 0, CHUNK) == body[:CHUNK]
    put_all(again, oid, body, only={1, 2})
    assert again.read(chunks[1], 0, CHUNK) == body[CHUNK:2 * CHUNK]


def test_evicting_a_complete_object_unlinks_it_and_an_open_backing_fd_still_reads_it(tmp_path):
    store = ChunkStore(tmp_path, capacity=4 * CHUNK)
    body = os.urandom(4 * CHUNK)
    oid = "c" * 40
    chunks = put_all(store, oid, body)
    fd = store.backing_fd(oid, chunks)
    assert fd is not None
    try:
        ino = os.fstat(fd).st_ino
        store.put(ChunkId("d" * 40, 0), os.urandom(CHUNK))  # evicts the least recently used chunk
        assert not store.path(oid).exists()  # the whole object went, by unlink
        assert not any(store.contains(c) for c in chunks) and store.used_bytes == CHUNK
        assert os.fstat(fd).st_ino == ino and os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(body), 0) == body  # the kernel's reader keeps the right bytes
    finally:
        os.close(fd)
    assert store.backing_fd(oid, chunks) is None


def test_evicting_chunks_of_an_incomplete_object_punches_holes(tmp_path):
    store = ChunkStore(tmp_path, capacity=4 * CHUNK)
    body = os.urandom(6 * CHUNK)
    oid = "e" * 40
    chunks = put_all(store, oid, body, only={0, 1, 2, 3})
    path = store.path(oid)
    ino, blocks = os.stat(path).st_ino, os.stat(path).st_blocks
    assert store.read(chunks[0], 0, 1) == body[:1]  # chunk 1 is now the least recently used
    time.sleep(0.01)
    for c in chunks[2:4]:
        store.read(c, 0, 1)
    put_all(store, oid, body, only={4})  # room for it: chunk 1 goes
    st = os.stat(path)
    assert st.st_ino == ino and not store.contains(chunks[1])
    assert st.st_blocks <= blocks  # chunk 4 took the blocks chunk 1 gave back
    with open(path, "rb") as f:
        f.seek(CHUNK)
        assert f.read(CHUNK) == bytes(CHUNK)  # a hole
    for c in (chunks[0], chunks[2], chunks[3], chunks[4]):
        assert store.read(c, 0, CHUNK) == body[c.offset:c.offset + CHUNK]
    # The last chunk of an incomplete object goes by unlink.
    small = ChunkStore(tmp_path / "other", capacity=CHUNK)
    put_all(small, oid, body, only={0})
    put_all(small, "f" * 40, body, only={0})
    assert not small.path(oid).exists()


@pytest.mark.parametrize("how", ["overwritten", "truncated", "replaced"])
def test_a_backing_file_changed_after_verification_is_refused_and_refetched(tmp_path, how):
    store = ChunkStore(tmp_path, capacity=1 << 30)
    body = os.urandom(3 * CHUNK + 99)
    oid = "1" * 40
    chunks = put_all(store, oid, body)
    fd = store.backing_fd(oid, chunks)
    assert fd is not None
    os.close(fd)
    path = store.path(oid)
    if how == "overwritten":
        with open(path, "r+b") as f:
            f.seek(CHUNK + 5)
            f.write(b"\0\1\2\3")
    elif how == "truncated":
        os.truncate(path, 2 * CHUNK)
    else:
        other = tmp_path / "other"
        other.write_bytes(os.urandom(len(body)))
        os.replace(other, path)
    assert store.backing_fd(oid, chunks) is None  # never handed to the kernel
    assert not all(store.contains(c) for c in chunks)  # dropped (whole: it was complete)
    assert not path.exists()
    put_all(store, oid, body)  # refetched
    fd = store.backing_fd(oid, chunks)
    assert fd is not None and os.pread(fd, len(body), 0) == body
    os.close(fd)


def test_whole_object_verification_is_trusted_across_restarts_until_the_file_or_boot_changes(tmp_path):
    body = os.urandom(32 * MiB)
    oid = "2" * 40
    csize = 8 * MiB
    store = ChunkStore(tmp_path, capacity=1 << 30)
    chunks = put_all(store, oid, body, csize)
    store.close()

    def first_backing_fd_reads() -> int:
        """Bytes a new process's first backing_fd() reads to vouch for the object."""
        s = ChunkStore(tmp_path, capacity=1 << 30)
        before = rchar()
        fd = s.backing_fd(oid, chunks)
        read = rchar() - before
        assert fd is not None and os.pread(fd, 100, 5 * MiB) == body[5 * MiB:5 * MiB + 100]
        os.close(fd)
        s.close()
        return read

    assert first_backing_fd_reads() >= len(body)  # nothing recorded: every chunk CRC-checked
    assert first_backing_fd_reads() < MiB  # the recorded verification: signature and boot match
    os.utime(ChunkStore(tmp_path, 1 << 30).path(oid))  # changes the ctime (and so the signature)
    assert first_backing_fd_reads() >= len(body)
    assert first_backing_fd_reads() < MiB
    with sqlite3.connect(tmp_path / "chunks.db") as db:  # as recorded before a reboot
        (mark,) = db.execute("SELECT verified FROM objects WHERE oid = ?", (oid,)).fetchone()
        db.execute("UPDATE objects SET verified = ? WHERE oid = ?",
                   (mark.rsplit(":", 1)[0] + ":another-boot", oid))
    assert first_backing_fd_reads() >= len(body)
    assert first_backing_fd_reads() < MiB


@pytest.fixture
def small_tmpfs(tmp_path):
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.integration  # mounts a tmpfs: needs root
def test_a_disk_that_fills_during_the_layout_is_cache_full_and_serves_nothing_wrong(small_tmpfs):
    store = ChunkStore(small_tmpfs / "chunks", capacity=1 << 30)
    body = os.urandom(16 * CHUNK)
    oid = "3" * 40
    chunks = chunks_of(oid, body)
    stored = []
    with pytest.raises(CacheFull, match="full"):
        for c in chunks:  # 4 MiB of object and 4 MiB of filler do not fit in 8 MiB
            store.put(c, body[c.offset:c.offset + CHUNK])
            stored.append(c)
            if c.index == 3:
                filler = small_tmpfs / "filler"
                subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    assert store.problem and "full" in store.problem
    for c in chunks:  # every chunk the store still lists is right; the torn one is not listed
        got = store.read(c, 0, CHUNK)
        assert got is None or got == body[c.offset:c.offset + CHUNK], c
    assert store.backing_fd(oid, chunks) is None
    (small_tmpfs / "filler").unlink()
    time.sleep(1.1)  # _FULL_RETRY_SECONDS: fills are tried again
    for c in chunks:
        if not store.contains(c):
            store.put(c, body[c.offset:c.offset + CHUNK])
    fd = store.backing_fd(oid, chunks)
    assert fd is not None and os.pread(fd, len(body), 0) == body
    os.close(fd)


def test_an_old_one_file_per_chunk_cache_is_migrated_at_start(tmp_path, caplog):
    """Chunk files ``<id>.<index>`` and a record without ``pos``: chunk 0 files are renamed to
    the object's file, later chunks dropped (and said so)."""
    data = tmp_path / "data"
    small, large = "4" * 40, "5" * 40
    bodies = {f"{small}.0": os.urandom(5000), f"{large}.0": os.urandom(CHUNK), f"{large}.1": os.urandom(CHUNK)}
    db = sqlite3.connect(tmp_path / "chunks.db")
    db.executescript("CREATE TABLE chunks (name TEXT PRIMARY KEY, size INTEGER NOT NULL, crc INTEGER NOT NULL,"
                     " used REAL NOT NULL) WITHOUT ROWID;"
                     "CREATE TABLE pins (name TEXT NOT NULL, tree TEXT NOT NULL, path TEXT NOT NULL,"
                     " PRIMARY KEY (name, tree)) WITHOUT ROWID;")
    for name, body in bodies.items():
        (data / name[:2]).mkdir(parents=True, exist_ok=True)
        (data / name[:2] / name).write_bytes(body)
        db.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (name, len(body), zlib.crc32(body), 1.0))
    db.commit()
    db.close()
    with caplog.at_level("WARNING"):
        store = ChunkStore(tmp_path, capacity=1 << 30)
    assert "1 chunks" in caplog.text and "dropped" in caplog.text, caplog.text
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == [small, large]
    assert store.read(ChunkId(small, 0), 0, 5000) == bodies[f"{small}.0"]
    fd = store.backing_fd(small, [ChunkId(small, 0)])
    assert fd is not None and os.read(fd, 6000) == bodies[f"{small}.0"]
    os.close(fd)
    large_chunks = [ChunkId(large, i, i * CHUNK, 2 * CHUNK) for i in range(2)]
    assert store.read(large_chunks[0], 0, CHUNK) == bodies[f"{large}.0"]
    assert not store.contains(large_chunks[1]) and store.backing_fd(large, large_chunks) is None
    store.put(large_chunks[1], bodies[f"{large}.1"])
    fd = store.backing_fd(large, large_chunks)
    assert fd is not None and os.pread(fd, 2 * CHUNK, 0) == bodies[f"{large}.0"] + bodies[f"{large}.1"]
    os.close(fd)
    assert store.used_bytes == 5000 + 2 * CHUNK


def test_a_checked_twin_becomes_the_real_object_by_rename_not_by_copy(tmp_path):
    store = ChunkStore(tmp_path, capacity=1 << 30)
    body = os.urandom(3 * CHUNK)
    real, twin = "6" * 40, "6" * 40 + "-unverified"
    twins = put_all(store, twin, body)
    ino = os.stat(store.path(twin)).st_ino
    assert store.adopt(twin, real)
    assert os.stat(store.path(real)).st_ino == ino and not store.path(twin).exists()
    chunks = chunks_of(real, body)
    assert not any(store.contains(c) for c in twins) and store.used_bytes == len(body)
    fd = store.backing_fd(real, chunks)
    assert fd is not None and os.pread(fd, len(body), 0) == body
    os.close(fd)
    store.close()
    again = ChunkStore(tmp_path, capacity=1 << 30)
    assert [again.read(c, 0, CHUNK) for c in chunks] == [body[c.offset:c.offset + CHUNK] for c in chunks]
    # Not when some of the real object is here already: then its chunks are copied (verify.py).
    put_all(again, twin, body)
    assert not again.adopt(twin, real) and again.path(twin).exists()


def test_reads_racing_punches_never_return_punched_zeros(tmp_path):
    """One thread reads chunks of an incomplete object while another fills and evicts (punches)
    them over and over: every read is the right bytes or None (read through), never zeros."""
    import threading

    csize = 64 * KiB
    store = ChunkStore(tmp_path, capacity=3 * csize)
    body = os.urandom(8 * csize)
    oid = "7" * 40
    chunks = chunks_of(oid, body, csize)
    stop = threading.Event()
    wrong: list[int] = []
    served = [0]

    def reader() -> None:
        while not stop.is_set():
            for c in chunks:
                got = store.read(c, 0, csize)
                if got is not None:
                    served[0] += 1
                    if got != body[c.offset:c.offset + csize]:
                        wrong.append(c.index)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(300):
            for c in chunks[:7]:  # the last chunk never comes: the object stays incomplete
                if not store.contains(c):
                    store.put(c, body[c.offset:c.offset + csize])
    finally:
        stop.set()
        thread.join()
    assert wrong == [] and served[0] > 0
    assert os.stat(store.path(oid)).st_blocks * 512 <= 4 * csize  # punched, not just forgotten
