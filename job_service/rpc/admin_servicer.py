"""AdminService servicer (operators: jobctl, grpcurl)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc as pb_grpc

from job_service.admin import Admin
from job_service.config import Settings
from job_service.domain import errors
from job_service.domain.model import parse_job_id, validate_text
from job_service.domain.status import JobStatus
from job_service.domain.tenancy import (
    TenantChange,
    TenantView,
    validate_quota,
    validate_weight,
)
from job_service.metrics import Metrics
from job_service.retention import DEFAULT_MAX_JOBS, MAX_MAX_JOBS, Retention
from job_service.rpc import convert
from job_service.rpc.errors import unary
from job_service.tenants import Tenants

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_REASON_CHARS = 1000
#: A ListJobs page ends early rather than grow past this (jobs carry results of up to 256 KiB):
#: clients, grpcurl included, refuse responses above 4 MiB by default.
MAX_LIST_RESPONSE_BYTES = 3 * 1024 * 1024


def _duration(
    msg: pb.ListJobsRequest | pb.GetStatsRequest | pb.PurgeJobsRequest, field: str
) -> timedelta | None:
    if not msg.HasField(field):  # type: ignore[arg-type]
        return None
    return convert.duration_from_pb(getattr(msg, field), field)


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        admin: Admin,
        settings: Settings,
        metrics: Metrics,
        retention: Retention,
        tenants: Tenants | None = None,
    ) -> None:
        self._tenants = tenants
        self._admin = admin
        self._settings = settings
        self.metrics = metrics
        self._retention = retention

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        statuses: list[JobStatus] = []
        for value in request.statuses:
            status = convert.status_from_pb(value, "statuses")
            if status is None:
                raise errors.InvalidArgument("statuses", "JOB_STATUS_UNSPECIFIED is not a status")
            statuses.append(status)
        older_than = _duration(request, "older_than")
        jobs, more = await self._admin.list_jobs(
            statuses, older_than, request.page_size, request.page_token
        )
        resp = pb.ListJobsResponse()
        budget = MAX_LIST_RESPONSE_BYTES
        served = 0
        for job in jobs:
            msg = convert.job_to_pb(job)
            size = msg.ByteSize() + 8  # field tag and length
            if served and size > budget:
                more = True  # the rest comes with the next page
                break
            budget -= size
            resp.jobs.append(msg)
            served += 1
        if more:
            resp.next_page_token = self._admin.page_token(jobs[served - 1], statuses, older_than)
        return resp

    @unary
    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        stats = await self._admin.stats(_duration(request, "stuck_after"))
        resp = pb.GetStatsResponse(
            counts=[
                pb.StatusCount(status=convert.status_to_pb(s), count=stats.counts.get(s, 0))
                for s in JobStatus
            ],
            stuck_awaiting_upload=stats.stuck_awaiting_upload,
        )
        resp.oldest_queued_age.CopyFrom(convert.duration(stats.oldest_queued_age or timedelta(0)))
        resp.stuck_after.CopyFrom(convert.duration(stats.stuck_after))
        return resp

    @unary
    async def RequeueJob(
        self, request: pb.RequeueJobRequest, context: Ctx
    ) -> pb.RequeueJobResponse:
        job = await self._admin.requeue(
            parse_job_id(request.job_id), validate_text("reason", request.reason, MAX_REASON_CHARS)
        )
        return pb.RequeueJobResponse(job=convert.job_to_pb(job))

    @unary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.CancelJobResponse:
        job = await self._admin.cancel(
            parse_job_id(request.job_id), validate_text("reason", request.reason, MAX_REASON_CHARS)
        )
        return pb.CancelJobResponse(job=convert.job_to_pb(job))

    @unary
    async def PurgeJobs(self, request: pb.PurgeJobsRequest, context: Ctx) -> pb.PurgeJobsResponse:
        age = _duration(request, "older_than")
        if age is None:
            if self._settings.retention_seconds <= 0:
                raise errors.InvalidArgument(
                    "older_than",
                    "is required: retention is off on this service (JOB_SERVICE_RETENTION_SECONDS"
                    "=0), say how old a finished job must be, e.g. 2592000s for 30 days",
                )
            age = timedelta(seconds=self._settings.retention_seconds)
        if not 0 <= request.max_jobs <= MAX_MAX_JOBS:
            raise errors.InvalidArgument(
                "max_jobs", f"must be within 0..{MAX_MAX_JOBS} (0 means {DEFAULT_MAX_JOBS})"
            )
        report = await self._retention.purge(
            age,
            dry_run=request.dry_run,
            delete_results=request.delete_results,
            max_jobs=request.max_jobs or DEFAULT_MAX_JOBS,
        )
        resp = pb.PurgeJobsResponse(
            jobs=report.jobs,
            error_rows=report.error_rows,
            result_objects=report.result_objects,
            more=report.more,
            batches=len(report.batches),
        )
        resp.older_than.CopyFrom(convert.duration(report.older_than))
        return resp

    # -- tenants --------------------------------------------------------------------

    def _tenant_use_cases(self) -> Tenants:
        if self._tenants is None:
            raise errors.JobServiceError("tenant calls are not served by this instance")
        return self._tenants

    @unary
    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: Ctx
    ) -> pb.ListTenantsResponse:
        rows, token = await self._tenant_use_cases().list(request.page_size, request.page_token)
        return pb.ListTenantsResponse(
            tenants=[tenant_to_pb(t) for t in rows], next_page_token=token
        )

    @unary
    async def SetTenant(self, request: pb.SetTenantRequest, context: Ctx) -> pb.SetTenantResponse:
        def quota(field: str) -> int | None:
            if not request.HasField(field):  # type: ignore[arg-type]
                return None
            return validate_quota(field, getattr(request, field)) or 0

        change = TenantChange(
            name=request.tenant,
            weight=validate_weight(request.weight) if request.HasField("weight") else None,
            max_live_jobs=quota("max_live_jobs"),
            max_pending_bytes=quota("max_pending_bytes"),
            max_initiates_per_minute=quota("max_initiates_per_minute"),
        )
        view = await self._tenant_use_cases().set(change)
        return pb.SetTenantResponse(tenant=tenant_to_pb(view))


def tenant_to_pb(t: TenantView) -> pb.Tenant:
    msg = pb.Tenant(
        name=t.name,
        owner=t.owner_subject,
        weight=t.weight,
        max_live_jobs=t.max_live_jobs or 0,
        max_pending_bytes=t.max_pending_bytes or 0,
        max_initiates_per_minute=t.max_initiates_per_minute or 0,
        queued=t.queued,
        in_flight=t.in_flight,
        live_jobs=t.live_jobs,
        pending_bytes=t.pending_bytes,
        initiates_this_minute=t.initiates_this_minute,
    )
    if t.dwell_p50 is not None:
        msg.dwell_p50.CopyFrom(convert.duration(t.dwell_p50))
    if t.dwell_p99 is not None:
        msg.dwell_p99.CopyFrom(convert.duration(t.dwell_p99))
    return msg
