"""Which leases the worker trusts: only those that point inside its configured bucket and
prefixes (its token and TLS are the client library's: jobs_client.auth).

A lease is data from the network: a job-service impostor (or a bug) could point it at any
object the worker's S3 credentials reach. `lease_out_of_bounds` says why a lease must be
refused before anything is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.v1 import jobs_pb2


@dataclass(frozen=True)
class LeaseBounds:
    bucket: str
    upload_prefix: str
    results_prefix: str


def _inside(key: str, prefix: str) -> bool:
    if not key.startswith(prefix) or key == prefix:
        return False
    # S3 keys are literal, but proxies and some S3 servers normalise paths: no dot segments.
    return not any(part in ("..", ".") for part in key.split("/"))


def lease_out_of_bounds(lease: jobs_pb2.Lease, bounds: LeaseBounds) -> str | None:
    """Why the lease points outside the worker's bounds, or None when it is inside."""
    if lease.bucket != bounds.bucket:
        return f"bucket {lease.bucket!r} is not the configured bucket {bounds.bucket!r}"
    if not _inside(lease.key, bounds.upload_prefix):
        return f"key {lease.key!r} is not under the upload prefix {bounds.upload_prefix!r}"
    if not _inside(lease.results_prefix, bounds.results_prefix):
        return (
            f"results prefix {lease.results_prefix!r} is not under the results prefix "
            f"{bounds.results_prefix!r}"
        )
    return None
