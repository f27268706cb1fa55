"""What an HDFS dataset names: its URI, the NameNodes behind it, and the options of the client
that reads it (:mod:`.webhdfs`) and of the Source (:mod:`.hdfs`).

URIs: ``hdfs://namenode[:port]/path`` and ``webhdfs://namenode[:port]/path`` name the NameNode's
*HTTP* address (default port 9870, Hadoop 3's ``dfs.namenode.http-address``; Hadoop 2 used
50070, so give it explicitly there); ``swebhdfs://`` is the same over HTTPS (default 9871). The
RPC port of ``fs.defaultFS`` (8020) does not speak HTTP: a URI naming it gets an error that says
so. With an HA namenode list (:class:`HdfsOptions.namenodes`), the URI's authority is only a
name (the nameservice) and requests go to whichever listed NameNode is active.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .source import SourceError

#: Hadoop 3's NameNode HTTP(S) ports (``dfs.namenode.http-address`` / ``https-address``).
DEFAULT_HTTP_PORT = 9870
DEFAULT_HTTPS_PORT = 9871
SCHEMES = ("hdfs", "webhdfs", "swebhdfs")


@dataclass(frozen=True)
class HdfsOptions:
    #: Simple-auth user (``user.name``); default the login name (``open_source`` passes
    #: ``$HADOOP_USER_NAME`` first, as the Hadoop client does). Ignored when a delegation token
    #: is given (the token names the user).
    user: str | None = None
    #: A delegation token for Kerberos-secured clusters: the ``urlString`` WebHDFS's
    #: ``GETDELEGATIONTOKEN`` returns. Not renewed here: it must outlive the mount.
    delegation_token: str | None = None
    #: HA: ``host:port`` of every NameNode, tried in order until the active one answers.
    namenodes: tuple[str, ...] = ()
    #: Attempts per operation, each going once around the namenode list if it has to.
    max_attempts: int = 5
    #: Seconds after an operation's first attempt past which no new attempt starts.
    retry_deadline: float | None = 300.0
    #: Directories listed concurrently by :meth:`HdfsSource.list`.
    list_parallelism: int = 8
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    #: Seconds one attempt may take in all (NameNode call, redirect, DataNode body).
    request_timeout: float = 60.0
    max_connections: int = 64


@dataclass(frozen=True)
class HdfsUri:
    scheme: str  # http or https
    authority: str  # host[:port] as written; the nameservice name with an HA list
    namenodes: tuple[str, ...]  # host:port to talk to
    path: str  # absolute, no trailing slash except the root "/"


def parse_hdfs_uri(uri: str, namenodes: tuple[str, ...] = ()) -> HdfsUri:
    """``hdfs://nn:9870/data/train/`` -> http, namenodes ``("nn:9870",)``, path ``/data/train``."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise SourceError(
            f"not an HDFS URI: {uri!r} (expected hdfs://namenode[:http-port]/path, "
            f"webhdfs:// or swebhdfs://)"
        )
    if parts.query or parts.fragment or parts.username:
        raise SourceError(f"HDFS URI {uri!r} must not carry a query, fragment or user; "
                          f"set the user with DATAHOARD_HDFS_USER")
    https = parts.scheme == "swebhdfs"
    try:
        port = parts.port
    except ValueError:
        raise SourceError(f"invalid port in {uri!r}") from None
    host = parts.hostname or ""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise SourceError(f"invalid namenode host {host!r} in {uri!r}")
    path = "/" + parts.path.strip("/")
    if not namenodes:
        default = DEFAULT_HTTPS_PORT if https else DEFAULT_HTTP_PORT
        namenodes = (f"{host}:{port or default}",)
    for nn in namenodes:
        if not re.fullmatch(r"[A-Za-z0-9._-]+:[0-9]{1,5}", nn):
            raise SourceError(f"invalid namenode address {nn!r}: expected host:http-port")
    return HdfsUri("https" if https else "http", parts.netloc, tuple(namenodes), path)
