import pytest

from datahoard.units import format_size, parse_positive_size, parse_size


@pytest.mark.parametrize(
    "text, value",
    [("1048576", 1 << 20), ("10Gi", 10 << 30), ("500M", 500_000_000), ("1.5Ki", 1536), ("2GiB", 2 << 30), ("1T", 10**12)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "-1Gi", "5 XB", "1.2.3"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


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
