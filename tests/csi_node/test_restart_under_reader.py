"""Worker restarts that no reader sees (issue 17), measured: readers keep reading a published
volume while the cache worker is SIGKILLed, or stopped for an upgrade, and comes back.

The worker runs as its pod does (``datahoard mount --foreground`` with the node's run dir), and
the CSI node plugin hosts the node's FUSE keeper, which holds the FUSE connection while no
worker runs. Each 'container' (its own mount namespace, HostToContainer or no propagation, as
runc sets them up) runs a DataLoader-like reader: open a random file, read it whole, check its
SHA-256, close, again; a third reader keeps every file open from before the first restart and
reads through those descriptors throughout. Every attempt is logged with its outcome.

Guaranteed, and asserted: no failed read and no wrong byte, for SIGKILLs
(``DATAHOARD_RESTART_CYCLES``, 2 in CI, 10 in ``make reliability``) and graceful stops
(``DATAHOARD_GRACEFUL_CYCLES``, 1 in CI, 3 in ``make reliability``); descriptors opened before a
restart keep reading. Measured and recorded for bench/RESULTS.md: the stall each reader sees
per restart (from the last read before it to the first read after it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datahoard import names
from tests.support.csi import PodWorker
from tests.support.polling import eventually
from tests.support.results import record

pytestmark = pytest.mark.integration

CONTEXT = {names.CTX_NAMESPACE: "ml", names.CTX_NAME: "imagenet"}

_READER = r"""
import hashlib, json, os, random, sys, time
root, expected, log, stop = sys.argv[1], json.load(open(sys.argv[2])), open(sys.argv[3], "a", buffering=1), sys.argv[4]
keys, rng = sorted(expected), random.Random(sys.argv[3])
while not os.path.exists(stop):
    key, start = rng.choice(keys), time.monotonic()
    try:
        with open(os.path.join(root, key), "rb") as f:
            data = f.read()
        entry = {"ok": True, "wrong": hashlib.sha256(data).hexdigest() != expected[key]}
    except OSError as exc:
        entry = {"ok": False, "errno": exc.errno}
    end = time.monotonic()
    log.write(json.dumps({**entry, "start": start, "end": end, "key": key}) + "\n")
    if not entry["ok"]:
        time.sleep(0.01)  # a loader that logs and retries, rather than spinning
"""


class Reader:
    """A container whose process reads the volume in a loop and logs every attempt."""

    def __init__(self, node, target: str, propagation: str, name: str, expected: Path) -> None:
        self.dir = node.root / "containers" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = node.root / f"{name}.log"
        self.stop_file = node.root / f"{name}.stop"
        self.propagation = propagation
        setup = (
            f"mount --bind {target} {self.dir} && mount --make-{propagation} {self.dir} && "
            f"exec {sys.executable} -c '{_READER}' {self.dir} {expected} {self.log} {self.stop_file}"
        )
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", setup])
        node.procs.append(self.proc)

    def entries(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.endswith("}")]

    def succeeded_after(self, moment: float) -> bool:
        return any(e["ok"] and e["start"] > moment for e in self.entries())

    def stop(self) -> None:
        self.stop_file.touch()
        self.proc.wait(30)


_HELD_READER = r"""
import hashlib, json, os, random, sys, time
root, expected, log, stop = sys.argv[1], json.load(open(sys.argv[2])), open(sys.argv[3], "a", buffering=1), sys.argv[4]
fds = {key: os.open(os.path.join(root, key), os.O_RDONLY) for key in sorted(expected)}
rng = random.Random(1)
while not os.path.exists(stop):
    key, start = rng.choice(sorted(fds)), time.monotonic()
    try:
        data = os.pread(fds[key], 1 << 24, 0)
        entry = {"ok": True, "wrong": hashlib.sha256(data).hexdigest() != expected[key]}
    except OSError as exc:
        entry = {"ok": False, "errno": exc.errno}
    log.write(json.dumps({**entry, "start": start, "end": time.monotonic(), "key": key}) + "\n")
    if not entry["ok"]:
        time.sleep(0.01)
"""


class HeldReader(Reader):
    """A container that opened every file before the restarts and reads through those descriptors."""

    def __init__(self, node, target: str, name: str, expected: Path) -> None:
        self.dir = node.root / "containers" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = node.root / f"{name}.log"
        self.stop_file = node.root / f"{name}.stop"
        self.propagation = "held-descriptors"
        setup = (f"mount --bind {target} {self.dir} && mount --make-rslave {self.dir} && "
                 f"exec {sys.executable} -c '{_HELD_READER}' {self.dir} {expected} {self.log} {self.stop_file}")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", setup])
        node.procs.append(self.proc)


def stall(entries: list[dict], moment: float) -> float:
    """Seconds without a delivered read around a restart: from the last read that ended before
    it to the first that ended after it."""
    before = [e["end"] for e in entries if e["ok"] and e["end"] <= moment]
    after = [e["end"] for e in entries if e["ok"] and e["end"] > moment]
    return min(after) - (max(before) if before else moment)


def test_readers_never_see_a_worker_restart(keeper_plugin, node, s3, bucket, s3_server, tmp_path):
    client = keeper_plugin.client
    kills = int(os.environ.get("DATAHOARD_RESTART_CYCLES", "2"))
    graceful = int(os.environ.get("DATAHOARD_GRACEFUL_CYCLES", "1"))
    files = {f"train/c{i % 10}/img{i:04d}.jpg": os.urandom(32_768 + 97 * i) for i in range(150)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key="imagenet/" + key, Body=body)
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in files.items()}))

    worker = PodWorker(node, f"s3://{bucket}/imagenet/", node.view_path(), node.root / "cache", s3_server.endpoint,
                       log_dir=tmp_path, keeper_socket=keeper_plugin.keeper_socket)
    worker.start()
    readers: list[Reader] = []
    try:
        target = node.target()
        client.publish(target, context=CONTEXT)
        readers = [
            Reader(node, target, "rslave", "host-to-container", expected),  # mountPropagation: HostToContainer
            Reader(node, target, "rprivate", "no-propagation", expected),  # mountPropagation: None
            HeldReader(node, target, "held", expected),
        ]
        begun = time.monotonic()
        eventually(lambda: all(r.succeeded_after(begun) for r in readers), what="the readers to start reading")
        restarts: list[tuple[str, float, float]] = []
        for how in ["kill"] * kills + ["graceful"] * graceful:
            time.sleep(1.0)  # steady reading before the restart
            moment = time.monotonic()
            worker.kill() if how == "kill" else worker.stop()
            worker.start()  # as the kubelet would, without its restart back-off
            restarts.append((how, moment, time.monotonic() - moment))
            eventually(lambda: all(r.succeeded_after(moment) for r in readers), timeout=60,
                       what="every reader to read again after the restart")
        time.sleep(1.0)
        stats = subprocess.run([sys.executable, "-m", "datahoard.cli", "status", "--json", str(worker.view)],
                               env=worker.env, capture_output=True, text=True, timeout=30)
    finally:
        for r in readers:
            r.stop()
        worker.cleanup()

    fuse = json.loads(stats.stdout)["fuse"]
    assert fuse["handover"] and fuse["resumed"], fuse
    report: dict = {"kills": kills, "graceful": graceful, "files": len(files),
                    "worker_restart_s": [round(r[2], 3) for r in restarts], "readers": {}}
    for r in readers:
        entries = r.entries()
        assert not [e for e in entries if e["ok"] and e["wrong"]], f"{r.propagation}: wrong bytes were read"
        failed = [e for e in entries if not e["ok"]]
        assert not failed, f"{r.propagation}: {len(failed)} reads failed: " + str(
            sorted({errno.errorcode.get(e["errno"], str(e["errno"])) for e in failed})) + (
            f" at {sorted({round(e['start'] - begun, 1) for e in failed})[:30]} s; restarts at "
            f"{[round(m - begun, 1) for _, m, _ in restarts]} s; the workers said:\n{worker.problems()}")
        stalls = {how: [stall(entries, moment) for h, moment, _ in restarts if h == how] for how in ("kill", "graceful")}
        report["readers"][r.propagation] = {
            "reads_ok": len(entries),
            "reads_failed": 0,
            **{f"{how}_stall_s": {"median": round(statistics.median(v), 3), "max": round(max(v), 3)}
               for how, v in stalls.items() if v},
        }
    record("restart_under_reader", report)
    print(json.dumps(report, indent=1))
