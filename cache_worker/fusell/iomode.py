"""The io mode of an inode as :class:`~.passthrough.BackingTable` counts it (rule 1 of
passthrough.py): the kind of each open handle, and the backing id the inode uses. Kept apart
because both the table's decisions and the replay of its log (passthrough_log.py) build it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PASSTHROUGH, CACHING, DIRECT = "P", "C", "D"


@dataclass(slots=True)
class Inode:
    backing_id: int | None = None
    fhs: dict[int, str] = field(default_factory=dict)  # fh -> kind
    passthrough: int = 0
    caching: int = 0

    def add(self, fh: int, kind: str) -> None:
        self.fhs[fh] = kind
        if kind == PASSTHROUGH:
            self.passthrough += 1
        elif kind == CACHING:
            self.caching += 1

    def remove(self, fh: int) -> None:
        kind = self.fhs.pop(fh, None)
        if kind == PASSTHROUGH:
            self.passthrough -= 1
        elif kind == CACHING:
            self.caching -= 1
