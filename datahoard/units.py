"""Byte quantities as people and Kubernetes write them (``200Gi``, ``1.5T``, ``512M``)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SUFFIXES = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?B?\s*$")


def parse_size(text: str | int) -> int:
    """``"10Gi"`` -> 10737418240. Accepts Kubernetes binary and decimal suffixes and a stray B."""
    if isinstance(text, int):
        return text
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500Mi, 200Gi, 1T, 1048576)")
    number, suffix = match.groups()
    return int(float(number) * _SUFFIXES[suffix or ""])


def parse_positive_size(text: str) -> int:
    """Like :func:`parse_size`, for a limit that must mean something: at least one byte.

    ``0`` and ``0.4`` (0.4 bytes) are refused rather than quietly becoming "no limit", which is
    what a zero meant downstream. A fraction of a byte above that rounds up, as Kubernetes
    rounds quantities (the operator passes a Dataset's ``capacity`` through unchanged).
    """
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500Mi, 200Gi, 1T, 1048576)")
    number, suffix = match.groups()
    value = Fraction(number) * _SUFFIXES[suffix or ""]
    if value < 1:
        raise ValueError(f"must be at least 1 byte, got {text!r}")
    return math.ceil(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
