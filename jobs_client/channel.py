"""The one way to open a channel to the job-service, for jobctl, backend services and workers.

A target is anything grpc resolves: `host:port`, `dns:///jobs.example.svc:50051` (every address
the name resolves to), or `ipv4:10.0.0.1:50051,10.0.0.2:50051`. Calls are spread round-robin over
every resolved address, one connection each, so a fleet behind a Kubernetes headless Service
spreads over the instances. The job-service ends each connection after its
`JOB_SERVICE_GRPC_MAX_CONNECTION_AGE_SECONDS` (GOAWAY); the channel then re-resolves and
reconnects, so a restarted or added instance gets its share again (docs/architecture.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import grpc

#: Deadline of one unary call unless the caller says otherwise.
DEFAULT_TIMEOUT_SECONDS = 10.0

# UNAVAILABLE on UploadService and AdminService is retried by grpc itself: the service answers
# it only when nothing changed, InitiateUpload carries a request_id, CompleteUpload and
# SignUploadParts are idempotent, and a repeated requeue/cancel is refused, never applied twice.
# WorkerService is retried by its callers (jobs_client.worker), which know how long their
# leases last. Independently of this policy grpc retries, transparently, a call that never
# reached the server: one sent on a connection the server was closing (GOAWAY).
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
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
        ],
    }
)

CHANNEL_OPTIONS: Sequence[tuple[str, int | str]] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # WatchJob streams and ClaimJob long polls sit idle on the connection: ping every 30 s so
    # proxies and NATs keep it, and notice a dead peer within 10 s of a ping. That stays above
    # the job-service's `grpc.http2.min_recv_ping_interval_without_data_ms` (10 s): a client
    # pinging more often than the server allows is sent GOAWAY `too_many_pings`.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after an instance restarts; callers' own retries add the jitter.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def channel_options(
    user_agent: str = "", options: Sequence[tuple[str, int | str]] = ()
) -> list[tuple[str, int | str]]:
    """CHANNEL_OPTIONS, then `options` (later ones win), and the user agent if given."""
    opts = [*CHANNEL_OPTIONS, *options]
    if user_agent:
        opts.append(("grpc.primary_user_agent", user_agent))
    return opts


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, int | str]] = (),
    interceptors: Sequence[Any] = (),
    user_agent: str = "",
) -> grpc.aio.Channel:
    """An aio channel (create it inside the running loop). `credentials` (TLS, see
    jobs_client.auth) make it a secure channel; `interceptors` add the bearer token to each call
    (jobs_client.auth.bearer_interceptors)."""
    opts = channel_options(user_agent, options)
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=opts, interceptors=list(interceptors)
        )
    return grpc.aio.insecure_channel(target, options=opts, interceptors=list(interceptors))


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: one bearer token, when given (README, Security)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class ChannelOwner:
    """`close()` and `async with` for a client that may own its channel."""

    channel: grpc.aio.Channel | None
    _owns_channel: bool

    async def close(self) -> None:
        if self._owns_channel and self.channel is not None:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
