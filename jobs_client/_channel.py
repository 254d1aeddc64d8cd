"""Channel options in one place: keepalive for long streams, the retry service config, TLS
credentials and the token interceptors (jobs_client.auth)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

#: Deadline of one unary call unless the caller says otherwise.
DEFAULT_TIMEOUT_SECONDS = 10.0

# UNAVAILABLE is retried by grpc itself: the service answers it only when nothing changed,
# InitiateUpload carries a request_id, CompleteUpload and SignUploadParts are idempotent, and a
# repeated requeue/cancel is refused, never applied twice.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "jobs.v1.UploadService"}, {"service": "jobs.v1.AdminService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 3,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS: Sequence[tuple[str, int | str]] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # WatchJob streams sit idle between changes: ping every 30 s (the service accepts 10 s) so
    # proxies and NATs keep the connection, and notice a dead peer within 10 s of a ping.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def open_channel(
    address: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, int | str]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """An aio channel (create it inside the running loop). `credentials` (TLS, see
    jobs_client.auth.channel_credentials) make it a secure channel; `interceptors` add e.g. the
    audience's bearer token to each call (jobs_client.auth.bearer_interceptors)."""
    opts = [*CHANNEL_OPTIONS, *options]
    if credentials is not None:
        return grpc.aio.secure_channel(
            address, credentials, options=opts, interceptors=list(interceptors)
        )
    return grpc.aio.insecure_channel(address, options=opts, interceptors=list(interceptors))


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: one bearer token, when given (README, Security)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
