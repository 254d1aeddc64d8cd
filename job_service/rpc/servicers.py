"""gRPC servicers: parse and validate requests, call a use case, convert the answer.

Validation that does not need the database happens here (INVALID_ARGUMENT); what a request
means is in the use cases (job_service.uploads, .leases, .admin).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import grpc
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc as pb_grpc

from job_service.auth.caller import current as current_caller
from job_service.auth.caller import owner_scope
from job_service.config import Settings
from job_service.domain import errors
from job_service.domain import multipart as mp
from job_service.domain.lease_policy import FailureKind
from job_service.domain.model import (
    parse_job_id,
    parse_lease_token,
    parse_uuid,
    validate_error_code,
    validate_new_upload,
    validate_progress,
    validate_text,
    validate_worker_id,
)
from job_service.domain.tenancy import validate_priority, validate_sub_tenant
from job_service.leases import Completion, ItemOutcome, Leases, ProgressReport
from job_service.metrics import Metrics
from job_service.rpc import convert
from job_service.rpc.errors import status_for, stream, unary
from job_service.uploads import Uploads

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]
#: Kept between a long-poll's answer and the caller's deadline, so the answer arrives in time.
DEADLINE_MARGIN_SECONDS = 1.0
#: No claim starts later than this before the caller's deadline (see leases.MIN_CLAIM_SECONDS).
ANSWER_MARGIN_SECONDS = 0.1
#: A ClaimJob reply stays under this many bytes: gRPC clients refuse replies over 4 MiB by
#: default (grpc.max_receive_message_length), and a resumed job carries its stored results (up
#: to 256 KiB each), so 16 of them overflow. The leases past it go back to the queue at once.
MAX_CLAIM_REPLY_BYTES = 4 * 1024 * 1024 - 64 * 1024
_FAILURE_KIND = {
    pb.FAILURE_KIND_UNSPECIFIED: FailureKind.JOB,
    pb.FAILURE_KIND_JOB: FailureKind.JOB,
    pb.FAILURE_KIND_INFRASTRUCTURE: FailureKind.INFRASTRUCTURE,
}
MAX_HEARTBEAT_LEASES = 1000
MAX_BATCH_ITEMS = 1000
MAX_MESSAGE_CHARS = 4000


T = TypeVar("T")


async def until_max_lifetime(
    items: AsyncGenerator[T, None], seconds: float, context: Ctx
) -> AsyncIterator[T]:
    """The items of a server stream until they end, or until `seconds` have passed: then the
    stream ends with OK and trailing metadata jobs-watch-end=max-lifetime (the caller calls
    again). Closes `items` either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    item = await anext(items)
            except StopAsyncIteration:
                return
            except TimeoutError:
                break
            yield item
        context.set_trailing_metadata(((WATCH_END_KEY, WATCH_END_MAX_LIFETIME),))
    finally:
        await items.aclose()


class _BatchItem(Protocol):
    @property
    def job_id(self) -> str: ...


class _ParsedItem(Protocol):
    @property
    def job_id(self) -> uuid.UUID: ...


Item = TypeVar("Item", bound=_BatchItem)
Parsed = TypeVar("Parsed", bound=_ParsedItem)


#: Trailing metadata on a WatchJob stream that ended at the service's maximum lifetime (the job
#: had not finished): call WatchJob again.
WATCH_END_KEY = "jobs-watch-end"
WATCH_END_MAX_LIFETIME = "max-lifetime"


class UploadServicer(pb_grpc.UploadServiceServicer):
    def __init__(
        self,
        uploads: Uploads,
        settings: Settings,
        metrics: Metrics,
        watch_uploads: Uploads | None = None,
    ) -> None:
        self._uploads = uploads
        # WatchJob reads through its own (small) pool: see app.py.
        self._watch = watch_uploads or uploads
        self._settings = settings
        self.metrics = metrics

    @unary
    async def InitiateUpload(
        self, request: pb.InitiateUploadRequest, context: Ctx
    ) -> pb.InitiateUploadResponse:
        upload = validate_new_upload(
            filename=request.filename,
            content_type=request.content_type,
            size_bytes=request.size_bytes,
            session_id=request.session_id,
            request_id=request.request_id,
            max_upload_bytes=self._settings.max_upload_bytes,
        )
        upload = dataclasses.replace(
            upload,
            sha256=mp.validate_sha256("sha256", request.sha256),
            multipart=request.multipart,
            sub_tenant=validate_sub_tenant(request.tenant),
            priority=validate_priority(request.priority),
        )
        who = current_caller()
        out = await self._uploads.initiate(upload, owner=who.subject if who else "")
        resp = pb.InitiateUploadResponse(
            job=convert.job_to_pb(out.job),
            upload_url=out.upload_url,
            upload_headers=out.upload_headers,
        )
        if out.plan is not None:
            resp.multipart.CopyFrom(convert.plan_to_pb(out.plan, self._settings.max_sign_parts))
        stamp = convert.ts(out.upload_expires_at) if out.upload_url or out.plan else None
        if stamp is not None:
            resp.upload_expires_at.CopyFrom(stamp)
        return resp

    @unary
    async def CompleteUpload(
        self, request: pb.CompleteUploadRequest, context: Ctx
    ) -> pb.CompleteUploadResponse:
        job = await self._uploads.complete(parse_job_id(request.job_id), owner=owner_scope())
        return pb.CompleteUploadResponse(job=convert.job_to_pb(job))

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.GetJobResponse:
        job = await self._uploads.get(parse_job_id(request.job_id), owner=owner_scope())
        return pb.GetJobResponse(job=convert.job_to_pb(job))

    @stream
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchJobResponse]:
        """Ends with OK when the job finishes, or after JOB_SERVICE_WATCH_MAX_SECONDS with OK and
        trailing metadata jobs-watch-end=max-lifetime (the client calls WatchJob again)."""
        job_id = parse_job_id(request.job_id)
        updates = cast(AsyncGenerator[Any, None], self._watch.watch(job_id, owner=owner_scope()))
        async for job in until_max_lifetime(updates, self._settings.watch_max_seconds, context):
            yield pb.WatchJobResponse(job=convert.job_to_pb(job))

    # Multipart uploads (upload helper, issue 9).
    @unary
    async def SignUploadParts(
        self, request: pb.SignUploadPartsRequest, context: Ctx
    ) -> pb.SignUploadPartsResponse:
        job_id = parse_job_id(request.job_id)
        parts: list[tuple[int, bytes]] = []
        for i, part in enumerate(request.parts):
            sha = mp.validate_sha256(f"parts[{i}].sha256", part.sha256, required=True)
            assert sha is not None
            parts.append((part.part_number, sha))
        signed = await self._uploads.sign_parts(job_id, parts, owner=owner_scope())
        resp = pb.SignUploadPartsResponse(
            parts=[
                pb.SignedPart(part_number=p.part_number, url=p.url, headers=p.headers, size=p.size)
                for p in signed
            ]
        )
        stamp = convert.ts(
            datetime.now(UTC) + timedelta(seconds=self._settings.upload_url_ttl_seconds)
        )
        assert stamp is not None
        resp.expires_at.CopyFrom(stamp)
        return resp

    @unary
    async def ListUploadedParts(
        self, request: pb.ListUploadedPartsRequest, context: Ctx
    ) -> pb.ListUploadedPartsResponse:
        job, parts = await self._uploads.list_parts(
            parse_job_id(request.job_id), owner=owner_scope()
        )
        return pb.ListUploadedPartsResponse(
            job=convert.job_to_pb(job),
            plan=convert.plan_to_pb(mp.plan_of(job), self._settings.max_sign_parts),
            parts=[
                pb.UploadedPart(
                    part_number=p.part_number, size=p.size, etag=p.etag, sha256=p.sha256 or b""
                )
                for p in parts
            ],
        )


def validate_worker_request(request: Any) -> None:
    """Checks every WorkerService request shares, before its handler reads it: the ids it
    carries are UUIDs and no string holds NUL (PostgreSQL text cannot)."""
    for name in ("job_id", "lease_token"):
        value = getattr(request, name, None)
        if isinstance(value, str):
            parse_uuid(name, value)
    for name in ("worker_id", "error_code", "error_message", "reason", "results_uri"):
        value = getattr(request, name, None)
        if isinstance(value, str) and "\x00" in value:
            raise errors.InvalidArgument(name, "must not contain NUL characters")


def progress_report(request: pb.ReportProgressRequest) -> ProgressReport:
    """A ReportProgress request, validated (alone or as a batch item)."""
    return ProgressReport(
        parse_job_id(request.job_id),
        parse_lease_token(request.lease_token),
        convert.status_from_pb(request.status),
        validate_progress(request.progress_pct),
        convert.struct_to_dict(request.result) if request.HasField("result") else None,
    )


def completion(request: pb.CompleteJobRequest) -> Completion:
    """A CompleteJob request, validated (alone or as a batch item)."""
    return Completion(
        parse_job_id(request.job_id),
        parse_lease_token(request.lease_token),
        convert.struct_to_dict(request.result) if request.HasField("result") else None,
        validate_text("results_uri", request.results_uri, MAX_MESSAGE_CHARS),
    )


def item_result(job_id: str, outcome: ItemOutcome) -> pb.BatchItemResult:
    """A batch item's answer: the job, or the status the single call would have answered
    (the same mapping, rpc/errors.status_for)."""
    if not isinstance(outcome, Exception):
        return pb.BatchItemResult(job_id=job_id, code=0, job=convert.job_to_pb(outcome))
    code, message, reason, meta = status_for(outcome)
    return pb.BatchItemResult(
        job_id=job_id, code=code.value[0], message=message, reason=reason, metadata=meta
    )


async def run_batch(
    items: Sequence[Item],
    parse: Callable[[Item], Parsed],
    run: Callable[[list[Parsed]], Awaitable[list[ItemOutcome]]],
) -> list[pb.BatchItemResult]:
    """A batch call: what fails the whole call (no items, too many, a job named twice) raises;
    an item that does not validate gets its INVALID_ARGUMENT in its place and the others go on.
    One result per item, in request order."""
    if not items:
        raise errors.InvalidArgument("items", "name at least one item")
    if len(items) > MAX_BATCH_ITEMS:
        raise errors.InvalidArgument(
            "items", f"at most {MAX_BATCH_ITEMS} per call, got {len(items)}; split the batch"
        )
    results: dict[int, pb.BatchItemResult] = {}
    parsed: list[Parsed] = []
    where: list[int] = []
    seen: set[uuid.UUID] = set()
    for i, item in enumerate(items):
        try:
            validate_worker_request(item)
            one = parse(item)
        except errors.JobServiceError as exc:
            results[i] = item_result(item.job_id, exc)
            continue
        if one.job_id in seen:
            raise errors.InvalidArgument(
                "items", f"job {one.job_id} appears more than once; a batch names each job once"
            )
        seen.add(one.job_id)
        parsed.append(one)
        where.append(i)
    outcomes = await run(parsed) if parsed else []
    for i, outcome in zip(where, outcomes, strict=True):
        results[i] = item_result(items[i].job_id, outcome)
    return [results[i] for i in range(len(items))]


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, leases: Leases, settings: Settings, metrics: Metrics) -> None:
        self._leases = leases
        self._settings = settings
        self.metrics = metrics

    @unary
    async def ClaimJob(self, request: pb.ClaimJobRequest, context: Ctx) -> pb.ClaimJobResponse:
        validate_worker_request(request)
        worker_id = validate_worker_id(request.worker_id)
        if request.max_jobs < 1:
            raise errors.InvalidArgument(
                "max_jobs",
                f"must be >= 1 (the number of jobs you can start now), got {request.max_jobs}",
            )
        wait = (
            convert.duration_from_pb(request.wait, "wait").total_seconds()
            if request.HasField("wait")
            else 0.0
        )
        remaining = context.time_remaining()
        budget = None
        if remaining is not None:
            wait = min(wait, max(remaining - DEADLINE_MARGIN_SECONDS, 0.0))
            budget = remaining - ANSWER_MARGIN_SECONDS
        leases = await self._leases.claim(worker_id, request.max_jobs, wait, budget=budget)
        interval = timedelta(seconds=self._settings.heartbeat_interval_seconds)
        reply = pb.ClaimJobResponse()
        size = 0
        for i, lease in enumerate(leases):
            item = convert.lease_to_pb(
                lease,
                heartbeat_interval=interval,
                results_prefix=self._settings.s3_results_prefix,
                lease_ttl=self._leases.lease_ttl,
            )
            size += item.ByteSize() + 8  # the field's tag and length
            if i and size > MAX_CLAIM_REPLY_BYTES:
                # Bounded by size, not count: fewer leases go out, the rest are queued again
                # before the answer leaves (no attempt counted). The first always goes.
                surplus, leases = leases[i:], leases[:i]
                await self._leases.hand_back_now(surplus, "ClaimJob reply size limit")
                break
            reply.leases.append(item)
        if leases:
            # The answer may still not reach the caller (it cancels, its deadline passes while
            # the response is on its way): then its leases go back at once, no attempt counted.
            sent = list(leases)

            def gone(ctx: Ctx) -> None:
                if ctx.cancelled():
                    self._leases.give_back(sent, "ClaimJob caller gone")

            # The stubs type the callback as a stub-only class; any callable works.
            context.add_done_callback(gone)  # type: ignore[arg-type]
        return reply

    @unary
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        validate_worker_request(request)
        validate_worker_id(request.worker_id)
        if not request.leases:
            raise errors.InvalidArgument("leases", "name at least one (job_id, lease_token)")
        if len(request.leases) > MAX_HEARTBEAT_LEASES:
            raise errors.InvalidArgument(
                "leases", f"at most {MAX_HEARTBEAT_LEASES} per call, got {len(request.leases)}"
            )
        refs = [(parse_job_id(r.job_id), parse_lease_token(r.lease_token)) for r in request.leases]
        results = await self._leases.heartbeat(request.worker_id, refs)
        ttl = convert.duration(self._leases.lease_ttl)
        out = pb.HeartbeatResponse()
        for r in results:
            status = out.leases.add(
                job_id=str(r.job_id),
                state=pb.LEASE_STATE_HELD if r.held else pb.LEASE_STATE_LOST,
                cancel_requested=r.cancel_requested,
            )
            stamp = convert.ts(r.expires_at)
            if stamp is not None:
                status.lease_expires_at.CopyFrom(stamp)
                status.lease_ttl.CopyFrom(ttl)
        return out

    @unary
    async def ReportProgress(
        self, request: pb.ReportProgressRequest, context: Ctx
    ) -> pb.ReportProgressResponse:
        validate_worker_request(request)
        r = progress_report(request)
        job = await self._leases.report_progress(
            r.job_id, r.token, r.status, r.progress_pct, r.result
        )
        return pb.ReportProgressResponse(job=convert.job_to_pb(job))

    @unary
    async def CompleteJob(
        self, request: pb.CompleteJobRequest, context: Ctx
    ) -> pb.CompleteJobResponse:
        validate_worker_request(request)
        c = completion(request)
        job = await self._leases.complete(c.job_id, c.token, c.result, c.results_uri)
        return pb.CompleteJobResponse(job=convert.job_to_pb(job))

    @unary
    async def FailJob(self, request: pb.FailJobRequest, context: Ctx) -> pb.FailJobResponse:
        validate_worker_request(request)
        job_id = parse_job_id(request.job_id)
        token = parse_lease_token(request.lease_token)
        code = validate_error_code(request.error_code)
        message = validate_text("error_message", request.error_message, MAX_MESSAGE_CHARS) or code
        kind = _FAILURE_KIND.get(request.kind)
        if kind is None:
            raise errors.InvalidArgument("kind", f"{request.kind} is not a FailureKind")
        job = await self._leases.fail(job_id, token, code, message, request.retryable, kind)
        return pb.FailJobResponse(job=convert.job_to_pb(job))

    @unary
    async def ReleaseJob(
        self, request: pb.ReleaseJobRequest, context: Ctx
    ) -> pb.ReleaseJobResponse:
        validate_worker_request(request)
        job = await self._leases.release(
            parse_job_id(request.job_id),
            parse_lease_token(request.lease_token),
            validate_text("reason", request.reason, MAX_MESSAGE_CHARS),
        )
        return pb.ReleaseJobResponse(job=convert.job_to_pb(job))

    @unary
    async def BatchReportProgress(
        self, request: pb.BatchReportProgressRequest, context: Ctx
    ) -> pb.BatchReportProgressResponse:
        results = await run_batch(request.items, progress_report, self._leases.report_progress_many)
        return pb.BatchReportProgressResponse(results=results)

    @unary
    async def BatchCompleteJobs(
        self, request: pb.BatchCompleteJobsRequest, context: Ctx
    ) -> pb.BatchCompleteJobsResponse:
        results = await run_batch(request.items, completion, self._leases.complete_many)
        return pb.BatchCompleteJobsResponse(results=results)
