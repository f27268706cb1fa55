from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahoard import api
from datahoard.units import SUFFIXES, exact_size, format_size, parse_positive_size, parse_size


@pytest.mark.parametrize(
    "text, value",
    [("1048576", 1 << 20), ("10Gi", 10 << 30), ("500M", 500_000_000), ("1.5Ki", 1536), ("2GiB", 2 << 30), ("1T", 10**12),
     (" 10 G ", 10**10)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "-1Gi", "5 XB", "1.2.3", "1e3", "1Gi\n2"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text, value", [
    ("0.5", 1),              # half a byte is a byte, as Kubernetes' Quantity.Value() rounds
    ("1.3Ki", 1332),         # 1331.2: truncation made this 1331
    ("0.1Ki", 103),          # 102.4
    ("2.01k", 2010),         # 2009.999... in floating point: truncation made this 2009
    ("1.07G", 1_070_000_000),  # 1070000000.0000001 in floating point: rounding up a float adds a byte
])
def test_a_fraction_of_a_byte_rounds_up_exactly(text, value):
    assert parse_size(text) == value
    assert api.quantity_bytes(text) == value  # the Dataset API parses with the same rule


@given(st.from_regex(r"[0-9]{1,6}(\.[0-9]{1,4})?", fullmatch=True), st.sampled_from(sorted(SUFFIXES)))
def test_sizes_are_the_quantity_rounded_up(number, suffix):
    exact = Decimal(number) * SUFFIXES[suffix]
    expected = int(exact) + (exact != int(exact))
    assert parse_size(number + suffix) == expected
    assert parse_size(number + suffix, strict=True) == expected
    assert parse_size(f" {number} {suffix}B ") == expected


@pytest.mark.parametrize("text", ["2GiB", " 1Gi", "1 Gi"])
def test_strict_is_the_crd_form(text):
    """The Dataset API takes what its CRD takes: no B, no spaces (the command line does)."""
    assert parse_size(text) > 0
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text, strict=True)
    with pytest.raises(ValueError):
        api.quantity_bytes(text)


def test_exact_size_keeps_the_fraction():
    assert exact_size("0.5") == Fraction(1, 2)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(3 << 30) == "3.0 GiB"


@pytest.mark.parametrize("text, value", [("1", 1), ("1.5", 2), ("1.3Ki", 1332), ("200Gi", 200 << 30)])
def test_parse_positive_size_rounds_a_fraction_of_a_byte_up(text, value):
    assert parse_positive_size(text) == value


@pytest.mark.parametrize("text, message", [("0", "at least 1 byte"), ("0.4", "at least 1 byte"),
                                           ("0Gi", "at least 1 byte"), ("lots", "not a size")])
def test_parse_positive_size_rejects_what_means_no_limit(text, message):
    with pytest.raises(ValueError, match=message):
        parse_positive_size(text)
