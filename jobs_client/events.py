"""Job events and webhook endpoints from the client side (docs/events.md).

`follow(client, after=cursor)` (also `JobsClient.events(after=...)`) yields every event after the
cursor and then each new one, forever: when the stream ends (the service's stream lifetime, a
restart, a network fault) it reopens after the last cursor it yielded, so nothing is missed and
nothing comes twice. Store `event.cursor` after handling each event to survive a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2 as pb

from jobs_client.errors import from_rpc_error

if TYPE_CHECKING:
    from jobs_client.client import JobsClient


async def follow(
    client: JobsClient,
    *,
    after: str = "",
    types: Sequence[str] = (),
    reconnects: int = 20,
) -> AsyncIterator[pb.JobEvent]:
    """Events after `after`, then live ones; reconnects and resumes by itself. Raises the
    call's error when it cannot be cured by reconnecting (INVALID_ARGUMENT for a bad cursor,
    PERMISSION_DENIED), or after `reconnects` failures in a row."""
    cursor = after
    failures = 0
    reopened = False
    while True:
        call = client.upload.StreamEvents(
            pb.StreamEventsRequest(after_cursor=cursor, types=list(types)),
            metadata=client._metadata,
            wait_for_ready=reopened,
        )
        try:
            async for resp in call:
                failures = 0
                cursor = resp.event.cursor
                yield resp.event
        except grpc.aio.AioRpcError as err:
            error = from_rpc_error(err)
            if not error.retryable or failures >= reconnects:
                raise error from None
            failures += 1
        finally:
            call.cancel()
        reopened = True
        if failures:
            await asyncio.sleep(client.retry.delay(failures))  # backoff before reopening


async def list_events(
    client: JobsClient, *, after: str = "", page_size: int = 0, types: Sequence[str] = ()
) -> pb.ListEventsResponse:
    req = pb.ListEventsRequest(after_cursor=after, page_size=page_size, types=list(types))
    return await client._retrying(lambda: client._call(client.upload.ListEvents, req))


class Webhooks:
    """AdminService's webhook endpoints (operators)."""

    def __init__(self, client: JobsClient) -> None:
        self._c = client

    async def add(
        self, url: str, subject: str, types: Sequence[str] = ()
    ) -> pb.AddWebhookEndpointResponse:
        req = pb.AddWebhookEndpointRequest(url=url, subject=subject, types=list(types))
        return await self._c._call(self._c.admin.AddWebhookEndpoint, req)

    async def list(self, subject: str = "") -> list[pb.WebhookEndpoint]:
        req = pb.ListWebhookEndpointsRequest(subject=subject)
        resp = await self._c._call(self._c.admin.ListWebhookEndpoints, req)
        return list(resp.endpoints)

    async def set_enabled(self, endpoint_id: str, enabled: bool) -> pb.WebhookEndpoint:
        req = pb.SetWebhookEndpointEnabledRequest(endpoint_id=endpoint_id, enabled=enabled)
        resp = await self._c._call(self._c.admin.SetWebhookEndpointEnabled, req)
        return resp.endpoint

    async def rotate_secret(
        self, endpoint_id: str, old_secret_ttl: timedelta | None = None
    ) -> pb.RotateWebhookSecretResponse:
        req = pb.RotateWebhookSecretRequest(endpoint_id=endpoint_id)
        if old_secret_ttl is not None:
            req.old_secret_ttl.CopyFrom(duration_pb2.Duration())
            req.old_secret_ttl.FromTimedelta(old_secret_ttl)
        return await self._c._call(self._c.admin.RotateWebhookSecret, req)

    async def remove(self, endpoint_id: str) -> None:
        req = pb.RemoveWebhookEndpointRequest(endpoint_id=endpoint_id)
        await self._c._call(self._c.admin.RemoveWebhookEndpoint, req)

    async def replay(
        self, endpoint_id: str, *, since: datetime | None = None, after_cursor: str = ""
    ) -> int:
        req = pb.ReplayWebhookEventsRequest(endpoint_id=endpoint_id, after_cursor=after_cursor)
        if since is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(since)
            req.since.CopyFrom(stamp)
        resp = await self._c._call(self._c.admin.ReplayWebhookEvents, req)
        return int(resp.queued)
