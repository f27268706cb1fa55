"""BackingTable bookkeeping across restarts, without the kernel: a connection with
passthrough not agreed never issues an ioctl, so these run anywhere. The kernel side (one id
per inode, ids reused after SIGKILL) is in test_fusell.py."""

from __future__ import annotations

from pathlib import Path

from datahoard.cache_worker.fusell.connection import Connection
from datahoard.cache_worker.fusell.iomode import CACHING
from datahoard.cache_worker.fusell.passthrough import BackingTable
from datahoard.cache_worker.fusell.passthrough_log import _REC, read_log
from datahoard.cache_worker.fusell.state import InitState


def _conn() -> Connection:
    return Connection(-1, InitState(passthrough=False))


def test_a_restarted_table_knows_open_handles_and_never_reuses_one(tmp_path: Path):
    path = tmp_path / "table"
    t = BackingTable(path, _conn())
    a, b = t.open(7, None), t.open(7, None)
    t.open(8, None)
    t.release(7, a.fh)
    t2 = BackingTable(path, _conn())  # the first process died without closing anything
    assert t2.mode(7) == (None, 0, 1) and t2.is_open(8)
    c = t2.open(7, None)
    assert c.fh not in (a.fh, b.fh) and c.kind == CACHING


def test_a_release_resent_after_a_restart_is_counted_once(tmp_path: Path):
    path = tmp_path / "table"
    t = BackingTable(path, _conn())
    a, b = t.open(7, None), t.open(7, None)
    t.release(7, a.fh)
    t2 = BackingTable(path, _conn())
    t2.release(7, a.fh)  # the kernel resends the RELEASE the dead process had answered
    assert t2.mode(7) == (None, 0, 1)
    t2.release(7, b.fh)
    assert t2.mode(7) == (None, 0, 0) and not t2.is_open(7)


def test_a_torn_last_record_reads_as_never_written(tmp_path: Path):
    """A process killed while storing a record leaves its op byte zero (stored last): that
    record and anything after it are not part of the log."""
    path = tmp_path / "table"
    t = BackingTable(path, _conn())
    a = t.open(7, None)
    t.close()
    data = bytearray(path.read_bytes())
    end = len(read_log(path)) * _REC.size
    release = _REC.pack(2, 0, 7, a.fh, 0)  # "r a.fh"
    data[end + 1:end + _REC.size] = release[1:]  # torn: all but the op byte
    data[end + _REC.size:end + 2 * _REC.size] = release  # and a whole one behind it
    path.write_bytes(bytes(data))
    t2 = BackingTable(path, _conn())
    assert t2.mode(7) == (None, 0, 1)
    assert t2.open(9, None).fh > a.fh


def test_the_log_is_compacted_when_full(tmp_path: Path):
    path = tmp_path / "table"
    t = BackingTable(path, _conn())
    keep = t.open(3, None)
    for _ in range(BackingTable.SIZE // 32):
        t.release(5, t.open(5, None).fh)
    assert len(read_log(path)) < 100
    t2 = BackingTable(path, _conn())
    assert t2.mode(3) == (None, 0, 1) and t2.mode(5) == (None, 0, 0)
    assert t2.open(3, None).fh > keep.fh
