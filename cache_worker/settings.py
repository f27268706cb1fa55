"""The worker's environment, parsed once by pydantic-settings into :class:`SourceSettings`.

The operator sets these on the worker pod (credentials from the Dataset's Secret); a person
running ``datahoard mount`` exports them. Every variable is read here and nowhere else in the
worker's source code, and a bad value is one :class:`~.source.SourceError` naming the variable,
the value and what would be accepted, before anything is mounted or fetched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from .source import SourceError

#: How a worker authenticates (the operator sets it from ``spec.source.credentials``):
#: ``anonymous``: unsigned requests, no credential lookup at all (not even instance metadata);
#: ``secret``: exactly the keys in the environment (from the Dataset's Secret), no chain;
#: ``node-identity``, or unset (a person running ``datahoard mount``): the usual AWS chain.
CredentialsMode = Literal["anonymous", "secret", "node-identity"]
_PREFIX = "DATAHOARD_"

Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Attempts = Annotated[int, Field(ge=1, le=100)]


class SourceSettings(BaseSettings):
    """Everything the worker reads from its environment to reach its source."""

    model_config = SettingsConfigDict(env_prefix=_PREFIX, frozen=True, extra="ignore",
                                      env_ignore_empty=True)

    source_credentials: CredentialsMode | None = None

    # -- S3 ---------------------------------------------------------------------------------
    #: Attempts per request, the first included (:mod:`.retry`).
    s3_max_attempts: Attempts = 5
    #: No new attempt of a request starts this many seconds after its first.
    s3_retry_deadline: Seconds = 300.0
    s3_connect_timeout: Seconds = 5.0
    s3_read_timeout: Seconds = 30.0
    #: One attempt in all: connect, headers and the whole body.
    s3_request_timeout: Seconds = 60.0
    #: ``botocore`` sends chunk GETs through botocore instead of the lean path.
    s3_client: Literal["lean", "botocore"] = "lean"
    #: None: path-style with an explicit endpoint, else botocore's choice.
    s3_addressing_style: Literal["path", "virtual", "auto"] | None = None
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_session_token: SecretStr | None = Field(None, validation_alias="AWS_SESSION_TOKEN")

    # -- HDFS -------------------------------------------------------------------------------
    #: Simple-auth user; default ``$HADOOP_USER_NAME`` (as the Hadoop client does), else the
    #: login name. Dropped with ``anonymous`` credentials, ``HADOOP_USER_NAME`` is not.
    hdfs_user: str | None = None
    hadoop_user_name: str | None = Field(None, validation_alias="HADOOP_USER_NAME")
    hdfs_delegation_token: SecretStr | None = None
    #: ``host:http-port`` of every NameNode (HA), comma-separated.
    hdfs_namenodes: Annotated[tuple[str, ...], NoDecode] = ()
    hdfs_max_attempts: Attempts = 5
    hdfs_retry_deadline: Seconds = 300.0
    hdfs_request_timeout: Seconds = 60.0

    # -- snapshot (snapshot.py) ------------------------------------------------------------
    #: Serve this snapshot (its id, 64 hex digits) instead of listing the source; the operator
    #: sets it once a Dataset has one. ``--snapshot-id`` wins over it.
    snapshot_id: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    #: Stats URLs of peers that hold it (``http://host:port``), comma-separated, tried in order.
    snapshot_from: Annotated[tuple[str, ...], NoDecode] = ()
    #: A refresh the operator asks of one node (operator/refresh.py): the worker on node
    #: ``refresh_lister`` (``NODE_NAME`` is its own) lists the source afresh once per
    #: ``refresh_token`` instead of serving ``snapshot_id``.
    refresh_lister: str | None = None
    refresh_token: Annotated[str, Field(max_length=128)] | None = None
    node_name: str | None = Field(None, validation_alias="NODE_NAME")

    @field_validator("snapshot_from", mode="before")
    @classmethod
    def _urls(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(u.strip() for u in value.split(",") if u.strip())
        for url in value or ():
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s):// URL of a worker's stats endpoint")
        return value

    @field_validator("source_credentials", "s3_client", "s3_addressing_style", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("hdfs_namenodes", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SourceSettings":
        """The settings in ``environ`` (default: the process environment) and nowhere else;
        raises SourceError naming every variable that holds a bad value."""
        token = _environ.set(os.environ if environ is None else environ)
        try:
            return cls()
        except ValidationError as exc:
            raise SourceError(_explain(exc)) from None
        finally:
            _environ.reset(token)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        environ = _environ.get()
        if environ is None:
            return init_settings, env_settings
        return init_settings, _MappingSource(settings_cls, environ)


_environ: ContextVar[Mapping[str, str] | None] = ContextVar("environ", default=None)


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of ``os.environ``
    (a worker's environment as the operator builds it, a test's dict)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = {
            name if self.case_sensitive else name.lower(): value
            for name, value in environ.items()
            if not (self.env_ignore_empty and value == "")
        }


def _variable(field: str) -> str:
    alias = SourceSettings.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return _PREFIX + field.upper()


def _explain(exc: ValidationError) -> str:
    """Every bad variable in one line: ``DATAHOARD_S3_MAX_ATTEMPTS='zero': Input should be a
    valid integer; ...``. Only fields that can fail validation are named, and none is a secret
    (keys and tokens are any string)."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = error["loc"][0] if error["loc"] else ""
        name = _variable(str(loc)) if str(loc) in SourceSettings.model_fields else str(loc)
        lines.append(f"{name}={error.get('input')!r}: {error['msg']}")
    return "bad worker setting: " + "; ".join(lines)
