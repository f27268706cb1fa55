"""Byte quantities as people and Kubernetes write them (``200Gi``, ``1.5T``, ``512M``): the one
parser, for the Dataset API (the CRD's form) and the command line (that form, plus spaces and a
trailing ``B``).

A fraction of a byte rounds *up*, as Kubernetes rounds a quantity to an integer
(``resource.Quantity.Value()``): the operator passes a Dataset's ``capacity`` to the worker as
bytes, and the worker must reserve no less than the API object says. The arithmetic is exact
(``Fraction``): in floating point ``2.01k`` is 2009.99…, which truncation made 2009 bytes and
``1.07G`` is 1070000000.0000001, which rounding up would make one byte too many.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

SUFFIXES = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}

#: The quantities the Dataset CRD accepts (its CEL rule, unanchored; ``api.QUANTITY_RE``).
QUANTITY_RE = r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?"
_STRICT = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
#: What a person types: the same, with spaces around and a stray B (``2GiB``, ``10 G``).
_LENIENT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?B?\s*")

_EXAMPLES = "examples: 500Mi, 200Gi, 1T, 1048576"


def exact_size(text: str, *, strict: bool = False) -> Fraction:
    """The exact number of bytes *text* says, fractions kept (``0.5`` is 1/2).

    ``strict``: only the CRD's form (no spaces, no ``B``). ValueError if it is not a size.
    """
    match = (_STRICT if strict else _LENIENT).fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} ({_EXAMPLES})")
    number, suffix = match.groups()
    return Fraction(number) * SUFFIXES[suffix or ""]


def parse_size(text: str | int, *, strict: bool = False) -> int:
    """``"10Gi"`` -> 10737418240; a fraction of a byte rounds up (``"0.5"`` -> 1)."""
    if isinstance(text, int):
        return text
    return math.ceil(exact_size(text, strict=strict))


def parse_positive_size(text: str) -> int:
    """Like :func:`parse_size`, for a limit that must mean something: at least one byte.

    ``0`` and ``0.4`` (0.4 bytes) are refused rather than quietly becoming "no limit", which is
    what a zero meant downstream (``0.4`` rounded up would be 1 byte, not what anyone meant).
    """
    if exact_size(text) < 1:
        raise ValueError(f"must be at least 1 byte, got {text!r}")
    return parse_size(text)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
