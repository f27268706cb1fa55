"""What INIT negotiated, kept so that a process resuming a connection knows it without INIT.

The kernel sends FUSE_INIT once per connection. A process that takes over a ``/dev/fuse``
descriptor (after a crash or a handover) never sees it, yet must answer within what was agreed
(``max_write``, whether passthrough was accepted, the protocol minor that fixes struct sizes).
The first process writes this next to the descriptor it hands over; the next one reads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from . import abi


@dataclass
class InitState:
    major: int = abi.KERNEL_VERSION
    minor: int = abi.KERNEL_MINOR_VERSION
    flags: int = 0  # agreed flags, flags2 folded in as bits 32+
    max_readahead: int = 0
    max_write: int = 128 * 1024
    max_pages: int = 256
    max_background: int = 64
    congestion_threshold: int = 48
    time_gran: int = 1
    passthrough: bool = False
    max_stack_depth: int = 0
    kernel_minor: int = 0
    kernel_flags: int = 0

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InitState":
        return cls(**json.loads(text))
