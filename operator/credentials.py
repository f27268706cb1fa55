"""The Dataset's source credentials as the workers get them: which Secret keys each source
scheme needs, the copy of the Secret next to the workers, and its fingerprint.

Its own module because the converge pass checks a Secret against :func:`secret_keys` before it
copies anything, and the worker container refers to the same keys; one table serves both.
Pure: a Dataset in, a manifest or a hash out (golden-tested with the other builders).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from datahoard import names
from datahoard.api import Dataset

from .config import OperatorSettings
from .labels import Manifest, metadata


@dataclass(frozen=True)
class SecretKeys:
    """Environment variables the cache worker reads for one source scheme, taken from the
    Dataset's Secret: all of ``required``, and at least one of ``any_of`` when it is set."""

    required: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.required + self.any_of + self.optional


#: Per scheme: what the worker's S3 and WebHDFS clients read (cache_worker/s3.py, hdfs.py).
SECRET_KEYS = {
    "s3": SecretKeys(required=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
                     optional=("AWS_SESSION_TOKEN",)),
    "hdfs": SecretKeys(any_of=("DATAHOARD_HDFS_USER", "DATAHOARD_HDFS_DELEGATION_TOKEN"),
                       optional=("DATAHOARD_HDFS_NAMENODES",)),
}
SECRET_KEYS["webhdfs"] = SECRET_KEYS["swebhdfs"] = SECRET_KEYS["hdfs"]


def secret_keys(ds: Dataset) -> SecretKeys:
    return SECRET_KEYS.get(ds.spec.source.scheme, SecretKeys())


def secret_copy(ds: Dataset, data: dict[str, str], settings: OperatorSettings) -> Manifest:
    """The Dataset's credentials, copied next to its workers (pods cannot read across namespaces)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(ds, names.worker_name(ds.namespace, ds.name), "credentials",
                             settings.namespace),
        "type": "Opaque",
        "data": dict(sorted(data.items())),
    }


def credentials_hash(data: dict[str, str]) -> str:
    """Fingerprint of the copied credentials; in the pod template it rolls the workers when
    the Secret changes (env vars are read once, at container start)."""
    return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]
