"""What the worker trusts (issue 10): the job-service's certificate when TLS is on, its own
token on every call, and only leases that point inside its configured bucket and prefixes.

A lease is data from the network: a job-service impostor (or a bug) could point it at any
object the worker's S3 credentials reach. `lease_out_of_bounds` says why a lease must be
refused before anything is read or written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from jobs.v1 import jobs_pb2

log = logging.getLogger(__name__)


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


class TokenSource:
    """The worker's bearer token: fixed, or read from a file again whenever it changes."""

    def __init__(self, token: str = "", path: str = "") -> None:
        self._token = token.strip()
        self._path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        if self._path is not None:
            self.current()  # fail at start-up, not at the first call

    def current(self) -> str:
        if self._path is None:
            return self._token
        st = os.stat(self._path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._token, self._stamp = self._path.read_text().strip(), stamp
        return self._token


class _Bearer:
    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def _details(self, details: Any) -> Any:
        token = self._source.current()
        if not token:
            return details
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        metadata.append(("authorization", f"Bearer {token}"))
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def bearer_interceptors(source: TokenSource) -> Sequence[Any]:
    return [_UnaryUnaryBearer(source)]


def channel_credentials(
    ca_file: str = "", client_cert_file: str = "", client_key_file: str = ""
) -> grpc.ChannelCredentials:
    """TLS verifying the job-service against `ca_file` (or the system roots), with a client
    certificate for mTLS when both files are given."""
    if bool(client_cert_file) != bool(client_key_file):
        raise ValueError(
            "ANALYSIS_WORKER_TLS_CLIENT_CERT_FILE and ANALYSIS_WORKER_TLS_CLIENT_KEY_FILE go "
            "together (mTLS)"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(client_key_file).read_bytes() if client_key_file else None,
        certificate_chain=Path(client_cert_file).read_bytes() if client_cert_file else None,
    )
