"""The events and webhooks RPCs: UploadService.StreamEvents / ListEvents / ListJobs and
AdminService's webhook endpoints. The servicers app.py registers are the existing ones with
these methods mixed in (`UploadServicerWithEvents`, `AdminServicerWithWebhooks`)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf import json_format
from jobs.v1 import jobs_pb2 as pb

from job_service.admin import Admin
from job_service.auth.caller import owner_scope
from job_service.config import Settings
from job_service.domain import errors
from job_service.domain.events import EndpointRow, EventRow
from job_service.domain.status import JobStatus
from job_service.events import EventFeed, OwnJobs, encode_cursor
from job_service.metrics import Metrics
from job_service.retention import Retention
from job_service.rpc import convert
from job_service.rpc.admin_servicer import MAX_LIST_RESPONSE_BYTES, AdminServicer
from job_service.rpc.errors import stream, unary
from job_service.rpc.servicers import UploadServicer, until_max_lifetime
from job_service.tenants import Tenants
from job_service.uploads import Uploads
from job_service.webhooks.endpoints import Webhooks, parse_endpoint_id

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


def event_to_pb(e: EventRow) -> pb.JobEvent:
    return pb.JobEvent(
        event_id=str(e.id),
        cursor=encode_cursor((e.xid, e.seq)),
        type=e.type,
        job_id=str(e.job_id),
        owner_subject=e.owner_subject,
        occurred_at=convert.ts(e.occurred_at),
        job=convert.job_to_pb(e.job),
    )


def job_json(e: EventRow) -> dict[str, Any]:
    """The job of a webhook body: GetJob's answer in proto3 JSON (field names as in jobs.proto)."""
    return json_format.MessageToDict(convert.job_to_pb(e.job), preserving_proto_field_name=True)


def _statuses(request: pb.ListJobsRequest) -> list[JobStatus]:
    out: list[JobStatus] = []
    for value in request.statuses:
        status = convert.status_from_pb(value, "statuses")
        if status is None:
            raise errors.InvalidArgument("statuses", "JOB_STATUS_UNSPECIFIED is not a status")
        out.append(status)
    return out


class UploadServicerWithEvents(UploadServicer):
    def __init__(
        self,
        uploads: Uploads,
        settings: Settings,
        metrics: Metrics,
        watch_uploads: Uploads,
        *,
        feed: EventFeed,
        own_jobs: OwnJobs,
        admin: Admin,
    ) -> None:
        super().__init__(uploads, settings, metrics, watch_uploads)
        self._feed = feed
        self._own_jobs = own_jobs
        self._admin = admin

    @stream
    async def StreamEvents(
        self, request: pb.StreamEventsRequest, context: Ctx
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        """Backlog after the cursor, then live events; ends with OK and trailing metadata
        jobs-watch-end=max-lifetime after JOB_SERVICE_WATCH_MAX_SECONDS (call again with the
        last cursor received)."""
        events = cast(
            AsyncGenerator[EventRow, None],
            await self._feed.stream(request.after_cursor, owner_scope(), list(request.types)),
        )
        async for event in until_max_lifetime(events, self._settings.watch_max_seconds, context):
            yield pb.StreamEventsResponse(event=event_to_pb(event))

    @unary
    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Ctx
    ) -> pb.ListEventsResponse:
        events, cursor = await self._feed.list(
            request.after_cursor, request.page_size, owner_scope(), list(request.types)
        )
        return pb.ListEventsResponse(events=[event_to_pb(e) for e in events], next_cursor=cursor)

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        """The caller's jobs (an operator's: every job), as AdminService.ListJobs pages them."""
        statuses = _statuses(request)
        older_than = (
            convert.duration_from_pb(request.older_than, "older_than")
            if request.HasField("older_than")
            else None
        )
        owner = owner_scope()
        if owner is None:
            jobs, more = await self._admin.list_jobs(
                statuses, older_than, request.page_size, request.page_token
            )
        else:
            jobs, more = await self._own_jobs.list(
                owner, statuses, older_than, request.page_size, request.page_token
            )
        resp = pb.ListJobsResponse()
        budget, served = MAX_LIST_RESPONSE_BYTES, 0
        for job in jobs:
            msg = convert.job_to_pb(job)
            size = msg.ByteSize() + 8
            if served and size > budget:
                more = True
                break
            budget -= size
            resp.jobs.append(msg)
            served += 1
        if more:
            last = jobs[served - 1]
            resp.next_page_token = (
                self._admin.page_token(last, statuses, older_than)
                if owner is None
                else self._own_jobs.page_token(owner, last, statuses, older_than)
            )
        return resp


def endpoint_to_pb(e: EndpointRow) -> pb.WebhookEndpoint:
    msg = pb.WebhookEndpoint(
        endpoint_id=str(e.id),
        url=e.url,
        subject=e.subject,
        types=e.types,
        enabled=e.enabled,
        disabled_reason=e.disabled_reason or "",
        created_at=convert.ts(e.created_at),
        pending_deliveries=e.pending,
    )
    if e.disabled_at is not None:
        msg.disabled_at.FromDatetime(e.disabled_at)
    if e.failing_since is not None:
        msg.failing_since.FromDatetime(e.failing_since)
    if e.old_secret_until is not None:
        msg.old_secret_until.FromDatetime(e.old_secret_until)
    return msg


class AdminServicerWithWebhooks(AdminServicer):
    def __init__(
        self,
        admin: Admin,
        settings: Settings,
        metrics: Metrics,
        retention: Retention,
        tenants: Tenants | None = None,
        *,
        webhooks: Webhooks,
        wake: Any,
    ) -> None:
        super().__init__(admin, settings, metrics, retention, tenants)
        self._webhooks = webhooks
        self._wake = wake

    @unary
    async def AddWebhookEndpoint(
        self, request: pb.AddWebhookEndpointRequest, context: Ctx
    ) -> pb.AddWebhookEndpointResponse:
        row, secret = await self._webhooks.add(request.url, request.subject, list(request.types))
        self._wake()
        return pb.AddWebhookEndpointResponse(endpoint=endpoint_to_pb(row), secret=secret)

    @unary
    async def ListWebhookEndpoints(
        self, request: pb.ListWebhookEndpointsRequest, context: Ctx
    ) -> pb.ListWebhookEndpointsResponse:
        rows = await self._webhooks.list(request.subject)
        return pb.ListWebhookEndpointsResponse(endpoints=[endpoint_to_pb(r) for r in rows])

    @unary
    async def SetWebhookEndpointEnabled(
        self, request: pb.SetWebhookEndpointEnabledRequest, context: Ctx
    ) -> pb.SetWebhookEndpointEnabledResponse:
        row = await self._webhooks.set_enabled(
            parse_endpoint_id(request.endpoint_id), request.enabled
        )
        self._wake()
        return pb.SetWebhookEndpointEnabledResponse(endpoint=endpoint_to_pb(row))

    @unary
    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Ctx
    ) -> pb.RotateWebhookSecretResponse:
        overlap = (
            convert.duration_from_pb(request.old_secret_ttl, "old_secret_ttl").total_seconds()
            if request.HasField("old_secret_ttl")
            else None
        )
        row, secret = await self._webhooks.rotate(parse_endpoint_id(request.endpoint_id), overlap)
        return pb.RotateWebhookSecretResponse(endpoint=endpoint_to_pb(row), secret=secret)

    @unary
    async def RemoveWebhookEndpoint(
        self, request: pb.RemoveWebhookEndpointRequest, context: Ctx
    ) -> pb.RemoveWebhookEndpointResponse:
        await self._webhooks.remove(parse_endpoint_id(request.endpoint_id))
        return pb.RemoveWebhookEndpointResponse()

    @unary
    async def ReplayWebhookEvents(
        self, request: pb.ReplayWebhookEventsRequest, context: Ctx
    ) -> pb.ReplayWebhookEventsResponse:
        since = None
        if request.HasField("since"):
            try:
                since = request.since.ToDatetime(tzinfo=UTC)
            except (ValueError, OverflowError) as exc:
                raise errors.InvalidArgument("since", f"is not a valid time ({exc})") from None
        n = await self._webhooks.replay(
            parse_endpoint_id(request.endpoint_id), since, request.after_cursor
        )
        self._wake()
        return pb.ReplayWebhookEventsResponse(queued=n)
