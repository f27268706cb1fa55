"""What this installation lets a Dataset ask for, beyond what the schema allows.

Whoever may create a Dataset gets privileged cache workers that read a source with some
identity. The cluster admin bounds that in the chart's values (operator settings): whether the
node's cloud identity may be used, whether an endpoint may point at a link-local address (the
cloud metadata services live at 169.254.169.254, fd00:ec2::254, fe80::/10), and which
namespaces are served at all. A refused Dataset gets a condition and no workers; placement
limits (forbidden nodes, capacity) are in :mod:`.placement`.

The endpoint check resolves host names as the operator sees them. A name that resolves
differently for the worker (DNS rebinding) is stopped by the chart's worker NetworkPolicy, which
denies egress to link-local addresses; this check gives the early, readable refusal.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from datahoard.api import Dataset

from .config import OperatorSettings

#: AWS's IPv6 instance metadata address: a unique-local address, not link-local, so named here.
METADATA_ADDRESSES = {ipaddress.ip_address("fd00:ec2::254")}

Resolver = Callable[[str], list[str]]


@dataclass(frozen=True)
class Refusal:
    """Why this installation does not serve a Dataset (a condition reason and message)."""

    reason: str
    message: str


def resolve(host: str) -> list[str]:
    """Addresses of ``host``; [] when it does not resolve here (the worker will say so)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    return sorted({info[4][0] for info in infos})


def link_local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip in METADATA_ADDRESSES


def endpoint_refusal(endpoint: str, resolver: Resolver = resolve) -> str | None:
    """Why ``endpoint`` points at a link-local address, or None."""
    host = urlsplit(endpoint).hostname or ""
    if link_local(host):
        return f"spec.source.endpoint {endpoint} is a link-local address"
    bad = [a for a in resolver(host) if link_local(a)]
    if bad:
        return f"spec.source.endpoint host {host} resolves to link-local {', '.join(bad)}"
    return None


def check(ds: Dataset, settings: OperatorSettings, resolver: Resolver = resolve) -> Refusal | None:
    """The first thing this installation refuses about ``ds``, or None."""
    if settings.dataset_namespaces and ds.namespace not in settings.dataset_namespaces:
        return Refusal("NamespaceNotServed", (
            f"this installation serves Datasets only in {', '.join(settings.dataset_namespaces)}, "
            f"not in {ds.namespace}: ask the cluster admin to add it (chart value "
            "operator.datasetNamespaces)"))
    source = ds.spec.source
    if source.credentials_mode == "NodeIdentity" and not settings.allow_node_identity:
        return Refusal("NodeIdentityForbidden", (
            "spec.source.credentials NodeIdentity is forbidden in this installation (the node's "
            "cloud identity is shared by every tenant): use a secretRef, or Anonymous for a "
            "public source; a cluster admin can allow it (chart value policy.allowNodeIdentity)"))
    if source.endpoint and not settings.allow_link_local_endpoints:
        why = endpoint_refusal(source.endpoint, resolver)
        if why:
            return Refusal("EndpointForbidden", (
                f"{why}: link-local addresses host cloud metadata services and are refused "
                "(chart value policy.allowLinkLocalEndpoints)"))
    return None
