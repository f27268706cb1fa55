"""Property tests: whatever Dataset spec the model (and so the CRD, see test_api.py) accepts,
the cache worker can open; whatever it refuses, it refuses with a readable message."""

from __future__ import annotations

import pydantic
from hypothesis import given, settings
from hypothesis import strategies as st

from datahoard import api
from datahoard.cache_worker.hdfs_uri import parse_hdfs_uri
from datahoard.cache_worker.s3_client import parse_s3_uri

_bucket = st.from_regex(r"[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]", fullmatch=True)
_path = st.text(st.characters(blacklist_characters=" \x00", blacklist_categories=("Cs",)), max_size=30)
_uris = st.one_of(
    st.builds(lambda b, p: f"s3://{b}/{p}", _bucket, _path),
    st.builds(lambda s, h, p: f"{s}://{h}/{p}", st.sampled_from(["hdfs", "webhdfs", "swebhdfs"]),
              st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True), _path),
    st.text(max_size=40),
)
_capacities = st.one_of(st.from_regex(r"[0-9]{1,4}(Ki|Mi|Gi|Ti|k|M|G|T)?", fullmatch=True), st.text(max_size=8))


@settings(max_examples=300, deadline=None)
@given(uri=_uris, capacity=_capacities, parallelism=st.integers(-5, 5000))
def test_accepted_specs_open_in_the_worker(uri: str, capacity: str, parallelism: int) -> None:
    raw = {"source": {"uri": uri}, "cache": {"capacity": capacity}, "warm": {"parallelism": parallelism}}
    try:
        spec = api.parse_spec(raw)
    except pydantic.ValidationError as exc:
        summary = api.error_summary(exc)
        assert summary and "Traceback" not in summary
        return
    if spec.source.scheme == "s3":
        parse_s3_uri(spec.source.uri)
    else:
        parse_hdfs_uri(spec.source.uri)
    assert api.quantity_bytes(spec.cache.capacity) >= 1 << 20
