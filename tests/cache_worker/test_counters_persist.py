"""Counters survive worker restarts: a clean unmount and a SIGKILL, with real mounts against the
S3 server; the file's rules (atomic, damaged file set aside, recent window) on plain data."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from datahoard.cache_worker.counters import RECENT_WINDOW, Counters, CounterSaver
from tests.support.mounts import unmount
from tests.support.polling import eventually


def put(s3, bucket: str, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)


@pytest.mark.integration
def test_counters_continue_after_unmount_and_after_sigkill(s3, bucket, mount_dataset, tmp_path):
    from datahoard import runtime

    a, b = os.urandom(100_000), os.urandom(200_000)
    put(s3, bucket, {"a": a, "b": b})
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    m = mount_dataset(bucket, "ds", cache_dir=cache, mountpoint=mnt)
    assert (mnt / "a").read_bytes() == a  # miss
    assert (mnt / "a").read_bytes() == a  # hit
    before = m.stats()
    assert before.served_from_source_bytes == len(a) and before.served_from_cache_bytes == len(a)
    unmount(m)

    # A clean restart continues exactly where the last run stopped.
    m = mount_dataset(bucket, "ds", cache_dir=cache, mountpoint=mnt)
    again = m.stats()
    assert (again.served_from_cache_bytes, again.served_from_source_bytes, again.hits, again.misses) == (
        before.served_from_cache_bytes, before.served_from_source_bytes, before.hits, before.misses)
    assert again.hit_ratio == pytest.approx(0.5)
    assert (mnt / "b").read_bytes() == b  # miss, counted on top of the old counts
    after_b = m.stats()
    assert after_b.served_from_source_bytes == len(a) + len(b)

    # SIGKILL: what the last save held survives (a save comes every few seconds).
    saved = cache / "counters.json"
    eventually(lambda: json.loads(saved.read_text())["counters"]["served_from_source"] == len(a) + len(b),
             timeout=30, what="the counters to be saved")
    pid = runtime.lookup(mnt).pid
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: not runtime.alive(pid), what="the worker to die")
    # The mount's supervisor starts the next worker, which resumes the held connection.
    eventually(lambda: (r := runtime.lookup(mnt)) is not None and r.pid != pid, timeout=60,
             what="the supervisor to restart the worker")
    revived = m.stats()
    assert revived.fuse.resumed
    assert revived.served_from_source_bytes == len(a) + len(b)
    assert revived.served_from_cache_bytes == len(a)
    # The recent window continues across restarts too: everything above happened within it.
    assert revived.recent.served_bytes == revived.served_bytes
    assert revived.recent.hit_ratio == pytest.approx(revived.hit_ratio)


def test_save_and_load_round_trip(tmp_path):
    c = Counters()
    c.add_read(from_cache=0, from_source=10)
    c.add_read(from_cache=30, from_source=0)
    c.add_error("boom")
    saver = CounterSaver(c, tmp_path / "counters.json", interval=60)
    saver.save()
    assert [p.name for p in tmp_path.iterdir()] == ["counters.json"]  # no temporary file left
    fresh = Counters()
    CounterSaver(fresh, tmp_path / "counters.json", interval=60).load()
    assert (fresh.served_from_cache, fresh.served_from_source, fresh.hits, fresh.misses, fresh.errors) == (
        30, 10, 1, 1, 1)


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "counters": {}}',
                                     '{"format": 1, "counters": {"hits": -5}}'])
def test_an_unreadable_file_is_set_aside_and_counting_starts_from_zero(tmp_path, content, caplog):
    path = tmp_path / "counters.json"
    path.write_text(content)
    c = Counters()
    CounterSaver(c, path, interval=60).load()
    assert (c.hits, c.served_from_cache) == (0, 0)
    assert not path.exists() and (tmp_path / "counters.json.unreadable").read_text() == content
    assert "unreadable" in caplog.text


def test_recent_ratio_covers_the_last_window_only():
    c = Counters()
    t0 = 1_000_000.0
    c._sample(t0)
    c.add_read(from_cache=0, from_source=1000)  # an early epoch: all misses
    c._sample(t0 + 60)
    with c.lock:
        assert c.recent(now=t0 + 60) == (60.0, 0, 1000)  # younger than the window: since start
    c.add_read(from_cache=500, from_source=0)
    c._sample(t0 + RECENT_WINDOW + 60)
    # A window later, the early misses have left the recent figures; the lifetime keeps them.
    window, cache, served = c.recent(now=t0 + RECENT_WINDOW + 60)
    assert (window, cache, served) == (RECENT_WINDOW, 500, 500)
    assert [s[0] for s in c.samples] == [t0 + 60, t0 + RECENT_WINDOW + 60]  # older ones pruned


def test_a_failing_save_is_logged_once_and_serving_goes_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="datahoard.cache_worker.counters")
    c = Counters()
    c.add_read(from_cache=5, from_source=0)
    gone = tmp_path / "gone"
    saver = CounterSaver(c, gone / "counters.json", interval=60)
    saver.save()
    saver.save()  # e.g. a full disk: no exception, one warning
    assert caplog.text.count("cannot save the counters") == 1
    gone.mkdir()
    saver.save()
    assert json.loads((gone / "counters.json").read_text())["counters"]["served_from_cache"] == 5
    assert "saved to" in caplog.text and "again" in caplog.text
