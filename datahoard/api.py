"""The Dataset API (``datahoard.io/v1alpha1``) as a pydantic model.

``crds/datasets.datahoard.io.yaml`` is the single source of truth; this model accepts exactly
what that schema accepts (``tests/test_api.py`` and ``tests/cluster/test_crd.py`` run one table
of specs through both). It is strict on purpose: the API server refuses a string where an
integer belongs, unknown fields (``kubectl apply`` validates strictly) and anything its CEL rules
reject, so the model does too. Defaults are the schema's defaults, so parsing a spec that was
not round-tripped through the API server gives the same result as parsing the stored object.

The regular expressions below are the ones in the CRD's CEL rules (a unit test compares them).
They are kept unanchored and evaluated with :func:`re.fullmatch`, because RE2's ``$`` (used by
CEL) never matches before a trailing newline while Python's does. Null fields are dropped before
validation, as the API server prunes them from structural schemas.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator, model_validator

from . import names, units
from .units import QUANTITY_RE  # one of the CRD's regexes below, kept beside its parser

# The same regexes as the CRD's x-kubernetes-validations (without the ^...$ anchors).
#: A TCP port, 1-65535 (a 5-digit pattern let 70000 through to the worker, which refused it).
#: Spelled out in each pattern because the CRD copies them whole into CEL rules. An HDFS path
#: has no '?' or '#' (the worker refuses a query or fragment); an S3 prefix may (keys can).
URI_RE = r"(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^ ]*)?|(s?webhdfs|hdfs)://[A-Za-z0-9.-]+(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(/[^ ?#]*)?)"
ENDPOINT_RE = r"https?://[A-Za-z0-9.-]+(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(/[^ ]*)?"
REGION_RE = r"[a-z0-9-]+"
DURATION_RE = r"([0-9]+h)?([0-9]+m)?([0-9]+s)?"
#: The shortest refresh interval: a listing of a large bucket takes minutes, and each refresh
#: restarts every worker onto the new snapshot (operator/refresh.py).
MIN_REFRESH_SECONDS = 60
SECRET_NAME_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"

#: Smallest cache the schema allows: below this a worker cannot hold even a small index.
MIN_CAPACITY_BYTES = 1024 * 1024


def quantity_bytes(text: str) -> int:
    """Bytes in a Kubernetes quantity of the restricted form the CRD accepts (``200Gi``),
    a fraction of a byte rounded up as Kubernetes does (``datahoard.units``)."""
    return units.parse_size(text, strict=True)


def format_bytes(count: int) -> str:
    """Short binary size for printer columns, e.g. ``136.8Gi``."""
    value = float(count)
    for unit in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if value < 1024 or unit == "Pi":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _check(pattern: str, message: str):
    """A validator that mirrors one CEL ``matches`` rule and its message."""

    def validate(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(message)
        return value

    return validate


Str = Annotated[str, Field(strict=True)]
Pattern = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Int64 = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]


class _Model(BaseModel):
    # strict: no "1" for 1 and no 1 for "1"; forbid: unknown fields, as `kubectl apply` does.
    model_config = ConfigDict(strict=True, extra="forbid")


class SecretRef(_Model):
    name: Annotated[str, StringConstraints(max_length=253)]

    _name = field_validator("name")(
        _check(SECRET_NAME_RE, "must be the name of a Secret (lowercase letters, digits, '-' and '.')")
    )


def duration_seconds(text: str) -> int:
    """Seconds of a duration such as ``1h30m`` or ``90s`` (:data:`DURATION_RE`)."""
    match = re.fullmatch(DURATION_RE, text)
    if not text or match is None:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m or 1h30m")
    h, m, s = (int(g[:-1]) if g else 0 for g in match.groups())
    return h * 3600 + m * 60 + s


class Refresh(_Model):
    """Opt in to growing datasets: list the source again and move every node to the new snapshot
    (operator/refresh.py). Without ``interval`` only on demand: set or change the Dataset's
    ``datahoard.io/refresh`` annotation."""

    interval: Annotated[str, StringConstraints(max_length=32)] | None = None

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            seconds = duration_seconds(value)
        except ValueError:
            raise ValueError("must be a duration such as 90s, 30m or 1h30m") from None
        if seconds < MIN_REFRESH_SECONDS:
            raise ValueError(f"must be at least {MIN_REFRESH_SECONDS}s")
        return value

    def interval_seconds(self) -> int | None:
        return duration_seconds(self.interval) if self.interval else None


class Source(_Model):
    uri: Annotated[str, StringConstraints(max_length=2048)]
    endpoint: Annotated[str, StringConstraints(max_length=2048)] | None = None
    region: Annotated[str, StringConstraints(max_length=64)] | None = None
    secret_ref: SecretRef | None = Field(default=None, alias="secretRef")
    #: None: Secret when secretRef is set, else Anonymous (see :attr:`credentials_mode`).
    credentials: Literal["Anonymous", "Secret", "NodeIdentity"] | None = None
    include: Annotated[list[Pattern], Field(max_length=64)] | None = None
    exclude: Annotated[list[Pattern], Field(max_length=64)] | None = None
    #: None: one snapshot forever (the default).
    refresh: Refresh | None = None

    _uri = field_validator("uri")(
        _check(
            URI_RE,
            "must be s3://<bucket>[/prefix] or (s)webhdfs:// / hdfs://<namenode>[:port][/path] (no spaces; bucket "
            "names are 3-63 lowercase letters, digits, dots or dashes)",
        )
    )
    _endpoint = field_validator("endpoint")(
        _check(ENDPOINT_RE, "must be an http:// or https:// URL such as http://minio.minio:9000")
    )
    _region = field_validator("region")(_check(REGION_RE, "must be a region name such as us-east-1"))

    @model_validator(mode="after")
    def _s3_only_options(self) -> "Source":
        if self.endpoint is not None and not self.uri.startswith("s3://"):
            raise ValueError("endpoint only applies to s3:// sources")
        if self.region is not None and not self.uri.startswith("s3://"):
            raise ValueError("region only applies to s3:// sources")
        if self.credentials == "Secret" and self.secret_ref is None:
            raise ValueError("credentials Secret needs a secretRef")
        if self.credentials not in (None, "Secret") and self.secret_ref is not None:
            raise ValueError("secretRef is only used with credentials Secret")
        if self.credentials == "NodeIdentity" and not self.uri.startswith("s3://"):
            raise ValueError("credentials NodeIdentity only applies to s3:// sources")
        return self

    @property
    def credentials_mode(self) -> Literal["Anonymous", "Secret", "NodeIdentity"]:
        """What the workers use: never the node's identity unless the spec asks for it."""
        if self.credentials is not None:
            return self.credentials
        return "Secret" if self.secret_ref is not None else "Anonymous"

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]


class Cache(_Model):
    medium: Literal["Disk", "Memory"] = "Disk"
    capacity: Annotated[str, StringConstraints(max_length=32)] = "10Gi"
    #: Serve a fully cached node's files with no FUSE hop (``datahoard mount --direct``).
    direct: StrictBool = False

    @field_validator("capacity")
    @classmethod
    def _capacity(cls, value: str) -> str:
        _check(QUANTITY_RE, "must be a size such as 500Mi, 200Gi or 2Ti")(value)
        if quantity_bytes(value) < MIN_CAPACITY_BYTES:
            raise ValueError("must be at least 1Mi")
        return value

    @property
    def capacity_bytes(self) -> int:
        return quantity_bytes(self.capacity)


class Toleration(_Model):
    key: Annotated[str, StringConstraints(max_length=316)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, StringConstraints(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Int64 | None = Field(default=None, alias="tolerationSeconds")

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> "Toleration":
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        return self


class Placement(_Model):
    node_selector: Annotated[
        dict[str, Annotated[str, StringConstraints(max_length=63)]], Field(max_length=32)
    ] | None = Field(default=None, alias="nodeSelector")
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    max_nodes: Annotated[int, Field(strict=True, ge=0, le=10000)] = Field(default=0, alias="maxNodes")


class Warm(_Model):
    policy: Literal["Eager", "OnDemand"] = "Eager"
    parallelism: Annotated[int, Field(strict=True, ge=1, le=256)] = 16
    #: Bytes per second of warming traffic per node (the worker's ``--bandwidth-limit``).
    bandwidth_limit: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, alias="bandwidthLimit")

    @field_validator("bandwidth_limit")
    @classmethod
    def _bandwidth(cls, value: str) -> str:
        _check(QUANTITY_RE, "must be bytes per second as a quantity such as 50Mi or 1Gi")(value)
        # The CRD compares the exact quantity (0.5 is refused), not the rounded-up bytes.
        if units.exact_size(value, strict=True) < 1:
            raise ValueError("must be at least 1 byte per second")
        return value

    @property
    def bandwidth_bytes(self) -> int | None:
        return quantity_bytes(self.bandwidth_limit) if self.bandwidth_limit else None


class DatasetSpec(_Model):
    source: Source
    cache: Cache = Field(default_factory=Cache)
    placement: Placement = Field(default_factory=Placement)
    warm: Warm = Field(default_factory=Warm)


class Dataset(BaseModel):
    """A Dataset object as the operator sees it: identity plus a parsed spec."""

    model_config = ConfigDict(extra="ignore")

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    spec: DatasetSpec

    @classmethod
    def from_body(cls, body: Any) -> "Dataset":
        """Parse a Dataset object (a dict or kopf Body); raises pydantic.ValidationError."""
        meta = body["metadata"]
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            generation=meta.get("generation", 0),
            spec=parse_spec(body.get("spec") or {}),
        )

    @property
    def mount_dir(self) -> str:
        return str(names.mount_dir(self.namespace, self.name))


def parse_spec(spec: Any) -> DatasetSpec:
    """Validate a spec mapping as the API server would; raises pydantic.ValidationError."""
    return DatasetSpec.model_validate(_plain(spec))


def _plain(value: Any) -> Any:
    """Plain dicts without null fields.

    kopf hands out read-only mapping views, and pydantic's strict mode wants dicts; the API
    server drops null-valued fields before defaulting and validation, so the model does too.
    """
    if isinstance(value, dict) or hasattr(value, "items") and not isinstance(value, (str, bytes)):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def error_summary(exc: Exception) -> str:
    """One readable line per problem, with the field path, for conditions and Events."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "").removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
