"""Published targets, kept in a small JSON file so the plugin's restart loses nothing.

The bind mounts themselves live in the kernel and survive the plugin; what would be lost is
the knowledge of *which view* each target shows, and that is what the repairer needs to re-bind
a target after a worker restart. kubelet does not repeat NodePublish for running pods, so
without this file a plugin restart would leave broken targets unrepaired forever.

The file holds no secrets (NodePublish secrets are never stored). Writes are atomic (temporary
file, fsync, rename), so a crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Bumped when the record layout changes incompatibly; a file with another version is ignored
#: (with a warning) rather than misread.
STATE_VERSION = 1


@dataclass(frozen=True)
class PublishedTarget:
    """One NodePublishVolume that succeeded and has not been unpublished."""

    volume_id: str
    target_path: str
    view_path: str
    access_mode: int
    readonly: bool
    mount_flags: tuple[str, ...] = ()
    published_at: float = field(default_factory=time.time)

    def same_publish(self, other: PublishedTarget) -> bool:
        """Whether *other* asks for exactly this publish (the spec's idempotency test)."""
        return (
            self.volume_id == other.volume_id
            and self.view_path == other.view_path
            and self.access_mode == other.access_mode
            and self.readonly == other.readonly
            and self.mount_flags == other.mount_flags
        )

    @classmethod
    def from_json(cls, data: dict) -> PublishedTarget:
        data = dict(data)
        data["mount_flags"] = tuple(data.get("mount_flags", ()))
        return cls(**data)


class StateStore:
    """Thread-safe map target_path -> :class:`PublishedTarget`, mirrored to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._targets: dict[str, PublishedTarget] = self._load()

    def _load(self) -> dict[str, PublishedTarget]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}
        if data.get("version") != STATE_VERSION:
            log.warning("ignoring state file %s with version %r", self.path, data.get("version"))
            return {}
        targets = {}
        for item in data.get("targets", []):
            try:
                record = PublishedTarget.from_json(item)
            except TypeError as exc:
                log.warning("ignoring malformed record in %s: %s", self.path, exc)
                continue
            targets[record.target_path] = record
        log.info("loaded %d published target(s) from %s", len(targets), self.path)
        return targets

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": STATE_VERSION,
            "targets": [asdict(t) for t in sorted(self._targets.values(), key=lambda t: t.target_path)],
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get(self, target_path: str) -> PublishedTarget | None:
        with self._lock:
            return self._targets.get(target_path)

    def put(self, record: PublishedTarget) -> None:
        with self._lock:
            self._targets[record.target_path] = record
            self._save()

    def remove(self, target_path: str) -> None:
        with self._lock:
            if self._targets.pop(target_path, None) is not None:
                self._save()

    def all(self) -> list[PublishedTarget]:
        with self._lock:
            return list(self._targets.values())

    def for_volume(self, volume_id: str) -> list[PublishedTarget]:
        with self._lock:
            return [t for t in self._targets.values() if t.volume_id == volume_id]
