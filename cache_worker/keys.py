"""Which object keys may appear in the view, and where.

Object keys are arbitrary strings; file paths are not. A key that could escape the mount or
name something other than itself (``..``, ``.``, empty segments such as ``a//b``, a leading
``/``, NUL, segments longer than a file name may be) is left out of the view, logged and
counted, never rewritten: a rewritten key could collide with a real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

#: Linux NAME_MAX, in bytes.
_NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class KeyPath:
    """A key split into directory parts and a leaf; ``leaf`` is None for a directory marker."""

    parents: tuple[str, ...]
    leaf: str | None


def key_to_path(key: str) -> KeyPath | None:
    """Split a relative object key into path parts, or None if it cannot be a safe path.

    A key ending in ``/`` is a directory marker (what consoles create for empty "folders").
    """
    if not key or key.startswith("/") or "\x00" in key:
        return None
    is_dir = key.endswith("/")
    parts = key[:-1].split("/") if is_dir else key.split("/")
    for part in parts:
        if part in ("", ".", "..") or len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            return None
    if is_dir:
        return KeyPath(tuple(parts), None)
    return KeyPath(tuple(parts[:-1]), parts[-1])


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
        if self.include and not any(_glob_regex(p).match(path) for p in self.include):
            return False
        return not any(_glob_regex(p).match(path) for p in self.exclude)
