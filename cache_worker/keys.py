"""Which object keys may appear in the view, and where.

Object keys are arbitrary strings; file paths are not. A key that could escape the mount or
name something other than itself (``..``, ``.``, empty segments such as ``a//b``, a leading
``/``, NUL, segments longer than a file name may be), or that is too long to be opened as a path
under a mountpoint or in a direct tree (see ``_KEY_MAX``), is left out of the view, logged and
counted, never rewritten: a rewritten key could collide with a real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

#: Linux NAME_MAX, in bytes.
_NAME_MAX = 255
#: Longest key kept, in bytes. Linux's PATH_MAX is 4096 with the NUL, and a key is opened below
#: a prefix: the mountpoint, or ``CACHE_DIR/direct/<id>/`` for a direct tree. Leaving 1 KiB for
#: that prefix keeps every kept key openable by absolute path in both. S3 keys are at most
#: 1,024 bytes, so only HDFS paths (whose length HDFS does not bound by default) can be longer.
_KEY_MAX = 4096 - 1024


@dataclass(frozen=True, slots=True)
class KeyPath:
    """A key split into directory parts and a leaf; ``leaf`` is None for a directory marker."""

    parents: tuple[str, ...]
    leaf: str | None


def key_to_path(key: str) -> KeyPath | None:
    """Split a relative object key into path parts, or None if it cannot be a safe path.

    A key ending in ``/`` is a directory marker (what consoles create for empty "folders").
    """
    # A character is at most 4 bytes in UTF-8: only long strings need encoding to be measured
    # (the encodes were a third of the time of indexing a million keys).
    if not key or key.startswith("/") or "\x00" in key or (
            len(key) * 4 > _KEY_MAX and len(key.encode("utf-8", "surrogateescape")) > _KEY_MAX):
        return None
    is_dir = key.endswith("/")
    parts = key[:-1].split("/") if is_dir else key.split("/")
    for part in parts:
        if part in ("", ".", "..") or (
                len(part) * 4 > _NAME_MAX and len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX):
            return None
    if is_dir:
        return KeyPath(tuple(parts), None)
    return KeyPath(tuple(parts[:-1]), parts[-1])


def shown(key: str, limit: int = 160) -> str:
    """``key`` quoted for a message, cut in the middle when long: one line must stay readable
    even for a key of several KiB."""
    text = repr(key)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(key.encode('utf-8', 'surrogateescape'))} bytes)"


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob: ``**`` spans directories, ``*`` and ``?`` stay within one."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


@dataclass(frozen=True)
class KeyFilter:
    """Include/exclude globs over paths relative to the dataset root (``a/b.jpg``)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __call__(self, path: str) -> bool:
        if not self.include and not self.exclude:
            return True
        if self.include and not any(_glob_regex(p).match(path) for p in self.include):
            return False
        return not any(_glob_regex(p).match(path) for p in self.exclude)
