"""The async client: upload files (single PUT or multipart, checksummed, resumable), follow
jobs, and the admin calls. Create it inside the running event loop:

    async with JobsClient.connect("127.0.0.1:50051") as jobs:
        job = await jobs.upload_file("match.mp4", progress=print)
        done = await jobs.wait_done(job.job_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc as pb_grpc

from jobs_client import _transfer
from jobs_client.auth import bearer_interceptors
from jobs_client.channel import (
    DEFAULT_TIMEOUT_SECONDS,
    ChannelOwner,
    call_metadata,
    open_channel,
)
from jobs_client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    JobsError,
    Unavailable,
    UploadFailed,
    from_rpc_error,
)
from jobs_client.retry import Backoff
from jobs_client.upload_progress import ProgressCallback, UploadMeter

T = TypeVar("T")
TERMINAL = frozenset({pb.JOB_STATUS_DONE, pb.JOB_STATUS_FAILED})
#: Still taking an upload: AWAITING_UPLOAD, or FAILED at verification (upload again).
_UPLOAD_CODES = frozenset(
    pb.ErrorCode.Name(c).removeprefix("ERROR_CODE_")
    for c in (
        pb.ERROR_CODE_UPLOAD_OBJECT_NOT_FOUND,
        pb.ERROR_CODE_UPLOAD_EMPTY,
        pb.ERROR_CODE_UPLOAD_SIZE_MISMATCH,
        pb.ERROR_CODE_UPLOAD_CONTENT_TYPE_MISMATCH,
        pb.ERROR_CODE_UPLOAD_EXPIRED,
        pb.ERROR_CODE_UPLOAD_CHECKSUM_MISMATCH,
    )
)
PAGE_SIZE = 500


#: The client's own retries (S3 transfers, CompleteUpload and friends on UNAVAILABLE, WatchJob
#: reopening), on top of grpc's quick ones from the service config.
DEFAULT_RETRY = Backoff(max_attempts=6, initial_backoff=0.5, max_backoff=10.0)


def guess_content_type(path: Path, given: str | None) -> str:
    ctype = given or mimetypes.guess_type(path.name)[0]
    if ctype is None:
        raise InvalidArgument(f"cannot tell the content type of {path.name}; pass content_type")
    if not ctype.lower().startswith("video/"):
        raise InvalidArgument(f"{path.name} is {ctype}, not a video (video/*)")
    return ctype


def upload_pending(job: pb.Job) -> bool:
    return job.status == pb.JOB_STATUS_AWAITING_UPLOAD or (
        job.status == pb.JOB_STATUS_FAILED and job.error.code in _UPLOAD_CODES
    )


class JobsClient(ChannelOwner):
    """One channel to the job-service with UploadService and AdminService stubs.

    `timeout` is the deadline of each unary call; `token` is the bearer token sent with every
    call, `credentials` TLS channel credentials (README, Security). `connect(tokens=...)` sends
    each call with its audience's token instead (jobs_client.auth: uploads with the uploader's,
    AdminService and reads with the operator's).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        token: str | None = None,
        retry: Backoff | None = None,
        owns_channel: bool = False,
    ) -> None:
        self.channel: grpc.aio.Channel | None = channel
        self.upload = pb_grpc.UploadServiceStub(channel)
        self.admin = pb_grpc.AdminServiceStub(channel)
        self.timeout = timeout
        self.retry = retry or DEFAULT_RETRY
        self._metadata = call_metadata(token)
        self._owns_channel = owns_channel

    @classmethod
    def from_stubs(
        cls,
        upload: pb_grpc.UploadServiceAsyncStub,
        admin: pb_grpc.AdminServiceAsyncStub,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        token: str | None = None,
        retry: Backoff | None = None,
    ) -> JobsClient:
        """Around stubs the caller already has (its own channel, interceptors); closing the
        client leaves their channel open."""
        client = cls.__new__(cls)
        client.channel = None
        client.upload, client.admin = upload, admin
        client.timeout = timeout
        client.retry = retry or DEFAULT_RETRY
        client._metadata = call_metadata(token)
        client._owns_channel = False
        return client

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        retry: Backoff | None = None,
        tokens: Mapping[str, str] | None = None,
    ) -> JobsClient:
        channel = open_channel(
            address,
            credentials=credentials,
            interceptors=bearer_interceptors(tokens) if tokens else (),
        )
        return cls(channel, timeout=timeout, token=token, retry=retry, owns_channel=True)

    # -------------------------------------------------------------------------- raw calls

    async def _call(self, fn: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await fn(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def _retrying(self, make: Callable[[], Awaitable[T]]) -> T:
        """Retry what the service says changed nothing (UNAVAILABLE), with jittered backoff
        (on top of grpc's own quick retries from the service config)."""
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return await make()
            except Unavailable:
                if attempt == self.retry.max_attempts:
                    raise
            await asyncio.sleep(self.retry.delay(attempt - 1))  # backoff between retries
        raise AssertionError("unreachable")

    async def initiate(
        self,
        *,
        filename: str,
        content_type: str,
        size_bytes: int,
        sha256: bytes = b"",
        request_id: str | None = None,
        session_id: str = "",
        multipart: bool = False,
    ) -> pb.InitiateUploadResponse:
        req = pb.InitiateUploadRequest(
            filename=filename,
            content_type=content_type,
            size_bytes=size_bytes,
            sha256=sha256,
            request_id=request_id or str(uuid.uuid4()),
            session_id=session_id,
            multipart=multipart,
        )
        return await self._retrying(lambda: self._call(self.upload.InitiateUpload, req))

    async def complete(self, job_id: str) -> pb.Job:
        """CompleteUpload (idempotent), retried while the service answers UNAVAILABLE."""
        req = pb.CompleteUploadRequest(job_id=job_id)
        resp = await self._retrying(lambda: self._call(self.upload.CompleteUpload, req))
        return resp.job

    async def sign_parts(
        self, job_id: str, parts: Sequence[tuple[int, bytes]]
    ) -> list[pb.SignedPart]:
        req = pb.SignUploadPartsRequest(
            job_id=job_id,
            parts=[pb.PartToSign(part_number=n, sha256=sha) for n, sha in parts],
        )
        resp = await self._retrying(lambda: self._call(self.upload.SignUploadParts, req))
        return list(resp.parts)

    async def list_parts(self, job_id: str) -> pb.ListUploadedPartsResponse:
        req = pb.ListUploadedPartsRequest(job_id=job_id)
        return await self._retrying(lambda: self._call(self.upload.ListUploadedParts, req))

    async def get(self, job_id: str) -> pb.Job:
        resp = await self._call(self.upload.GetJob, pb.GetJobRequest(job_id=job_id))
        return resp.job

    # ------------------------------------------------------------------------------ upload

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        request_id: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        session_id: str = "",
        multipart: bool = False,
        resume: bool = False,
        state_dir: Path | None = None,
        concurrency: int = 4,
    ) -> pb.Job:
        """Upload a video and queue its job; returns the job after CompleteUpload (QUEUED).

        Single PUT or multipart is the service's choice (`multipart=True` asks for it). The
        SHA-256 is computed while reading the file and declared, so S3 rejects corrupted bytes.
        Parts go in parallel (`concurrency` at a time, streamed from disk); transient S3 and
        service errors are retried with backoff. A small state file (in `state_dir`) lets a
        later call with `resume=True` continue the same job: parts S3 already holds with the
        same checksum are not sent again. Raises JobsError subclasses (FailedPrecondition with
        reason UPLOAD_CHECKSUM_MISMATCH etc. when the service rejects the object).
        """
        file = Path(path)
        ctype = guess_content_type(file, content_type)
        states = state_dir or _transfer.default_state_dir()
        try:
            state = await asyncio.to_thread(
                _transfer.UploadState.prepare, states, file, request_id, resume
            )
        except OSError as exc:
            raise InvalidArgument(f"cannot read {file}: {exc.strerror}") from None
        await self._save_state(state, states, file)
        size = state.size
        init = await self.initiate(
            filename=file.name,
            content_type=ctype,
            size_bytes=size,
            sha256=bytes.fromhex(state.sha256_hex),
            request_id=state.request_id,
            session_id=session_id,
            multipart=multipart,
        )
        job_id = init.job.job_id
        if state.job_id != job_id:
            state.job_id = job_id
            await self._save_state(state, states, file)
        try:
            if init.HasField("multipart"):
                await self._send_parts(job_id, file, size, init.multipart, progress, concurrency)
            elif init.upload_url:
                await self._send_whole(job_id, init, file, size, progress)
        except OSError as exc:  # hashing a part: the video went away or became unreadable
            raise InvalidArgument(
                f"cannot read {file} while uploading job {job_id}: {exc.strerror}"
            ) from None
        except (FailedPrecondition, UploadFailed) as failure:
            # Another call with the same request_id (deliberately the same job) may have
            # finished the upload first (UPLOAD_CLOSED, or S3 refusing a part of the completed
            # multipart upload): then CompleteUpload (which waits for that call's to commit)
            # returns the queued job. Otherwise this call's own failure is the answer.
            try:
                job = await self.complete(job_id)
            except JobsError:
                raise failure from None
            if upload_pending(job):
                raise
        else:
            job = await self.complete(job_id)
        with contextlib.suppress(OSError):  # the job is queued; a stale state file is harmless
            await asyncio.to_thread(state.remove, states)
        return job

    @staticmethod
    async def _save_state(state: _transfer.UploadState, states: Path, file: Path) -> None:
        try:
            await asyncio.to_thread(state.save, states)
        except OSError as exc:
            raise JobsError(
                f"cannot save the resume state of {file} in {states}: {exc.strerror}; "
                "pass state_dir= a writable directory",
                retryable=False,
            ) from None

    async def resume_upload(
        self,
        path: str | os.PathLike[str],
        job_id: str,
        progress: ProgressCallback | None = None,
        *,
        concurrency: int = 4,
    ) -> pb.Job:
        """Finish the multipart upload of `job_id` from any machine that has the file: the
        plan and the parts S3 holds come from ListUploadedParts; parts whose SHA-256 matches
        the local bytes are skipped. Raises FailedPrecondition (UPLOAD_NOT_MULTIPART for a
        single-PUT job: use upload_file with the same request_id), InvalidArgument (the file
        is not the job's size)."""
        file = Path(path)
        listed = await self.list_parts(job_id)
        size = (await asyncio.to_thread(file.stat)).st_size
        if size != listed.job.size_bytes:
            raise InvalidArgument(
                f"{file} has {size} bytes but job {job_id} expects {listed.job.size_bytes}"
            )
        if upload_pending(listed.job):
            await self._send_parts(job_id, file, size, listed.plan, progress, concurrency)
        return await self.complete(job_id)

    async def _transfer(self, what: str, fn: Callable[[], T]) -> T:
        """Run one blocking transfer in a thread, retrying network errors and S3 5xx."""
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return await asyncio.to_thread(fn)
            except _transfer.PutRefused as exc:
                if exc.status < 500 and exc.status != 429:
                    raise
                failure: Exception = exc
            except OSError as exc:
                failure = exc
            if attempt == self.retry.max_attempts:
                raise UploadFailed(
                    f"{what} failed after {attempt} attempts: {failure}", retryable=True
                ) from failure
            await asyncio.sleep(self.retry.delay(attempt - 1))  # backoff between retries
        raise AssertionError("unreachable")

    async def _send_whole(
        self,
        job_id: str,
        init: pb.InitiateUploadResponse,
        file: Path,
        size: int,
        progress: ProgressCallback | None,
    ) -> None:
        meter = UploadMeter(job_id, size, 1, progress)
        meter.start()

        def put() -> str:
            meter.reset_part(0)
            return _transfer.put_range(
                init.upload_url,
                dict(init.upload_headers),
                file,
                0,
                size,
                lambda n: meter.add(0, n),
                self.timeout * 6,
            )

        try:
            await self._transfer("the upload PUT", put)
        except _transfer.PutRefused as exc:
            raise _refused(job_id, "the upload PUT", exc) from None
        meter.part_done(1)

    async def _send_parts(
        self,
        job_id: str,
        file: Path,
        size: int,
        plan: pb.MultipartPlan,
        progress: ProgressCallback | None,
        concurrency: int,
    ) -> None:
        listed = await self.list_parts(job_id)
        sizes = {
            n: (plan.part_size if n < plan.part_count else size - plan.part_size * (n - 1))
            for n in range(1, plan.part_count + 1)
        }
        held = {p.part_number: p for p in listed.parts if p.size == sizes.get(p.part_number)}
        meter = UploadMeter(job_id, size, plan.part_count, progress)
        todo: list[int] = []
        for n in range(1, plan.part_count + 1):
            part = held.get(n)
            if part is not None and part.sha256:
                offset = plan.part_size * (n - 1)
                local = await asyncio.to_thread(_transfer.sha256_of, file, offset, sizes[n])
                if local == part.sha256:  # S3 has exactly these bytes: skip it
                    meter.skipped(n, sizes[n])
                    continue
            todo.append(n)
        meter.start()
        sem = asyncio.Semaphore(max(1, concurrency))
        batch = max(1, min(plan.max_parts_per_call or 100, 4 * concurrency))
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(0, len(todo), batch):
                numbers = todo[i : i + batch]
                digests = await asyncio.to_thread(
                    lambda ns=numbers: [  # type: ignore[misc]
                        _transfer.sha256_of(file, plan.part_size * (n - 1), sizes[n]) for n in ns
                    ]
                )
                signed = await self.sign_parts(job_id, list(zip(numbers, digests, strict=True)))
                for signed_part, sha in zip(signed, digests, strict=True):
                    await sem.acquire()
                    tasks.append(
                        asyncio.create_task(
                            self._send_part(job_id, file, plan, signed_part, sha, meter, sem)
                        )
                    )
                failed = [t for t in tasks if t.done() and t.exception() is not None]
                if failed:
                    break
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_part(
        self,
        job_id: str,
        file: Path,
        plan: pb.MultipartPlan,
        part: pb.SignedPart,
        sha: bytes,
        meter: UploadMeter,
        sem: asyncio.Semaphore,
    ) -> None:
        n = part.part_number
        offset = plan.part_size * (n - 1)
        url, headers = part.url, dict(part.headers)
        try:
            for attempt in range(1, self.retry.max_attempts + 1):

                def put(u: str = url, h: dict[str, str] = headers) -> str:
                    meter.reset_part(n)
                    return _transfer.put_range(
                        u, h, file, offset, part.size, lambda k: meter.add(n, k), self.timeout * 6
                    )

                try:
                    await self._transfer(f"part {n}", put)
                    meter.part_done(n)
                    return
                except _transfer.PutRefused as exc:
                    # An expired URL (403) is signed again; anything else is final.
                    if exc.status != 403 or attempt == self.retry.max_attempts:
                        raise _refused(job_id, f"part {n}", exc) from None
                    again = await self.sign_parts(job_id, [(n, sha)])
                    url, headers = again[0].url, dict(again[0].headers)
        finally:
            sem.release()

    # ------------------------------------------------------------------------ follow jobs

    async def watch(self, job_id: str, *, reconnects: int = 10) -> AsyncIterator[pb.Job]:
        """The job now and after each change, until DONE or FAILED. A stream that breaks
        (server restart, the service's stream lifetime) is reopened with backoff; it starts
        again with the job as it is now, so a change is never missed."""
        failures = 0
        reopened = False
        last: tuple[int, int, str] | None = None
        while True:
            # A reopened stream waits for the channel to be ready again (grpc reconnects with
            # its own backoff) instead of failing fast while the service restarts.
            call = self.upload.WatchJob(
                pb.WatchJobRequest(job_id=job_id),
                metadata=self._metadata,
                wait_for_ready=reopened,
            )
            try:
                async for resp in call:
                    failures = 0
                    job = resp.job
                    seen = (job.status, job.progress_pct, job.updated_at.ToJsonString())
                    if seen != last:
                        last = seen
                        yield job
                    if job.status in TERMINAL:
                        return
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
                if not error.retryable or failures >= reconnects:
                    raise error from None
                failures += 1
            finally:
                call.cancel()
            reopened = True
            await asyncio.sleep(self.retry.delay(failures))  # backoff before reopening

    def events(self, *, after: str = "", types: Sequence[str] = ()) -> AsyncIterator[pb.JobEvent]:
        """Job events after the cursor, then live ones; reconnects and resumes by itself
        (jobs_client.events)."""
        from jobs_client import events as _events

        return _events.follow(self, after=after, types=types)

    async def wait_done(self, job_id: str, timeout: float | None = None) -> pb.Job:  # noqa: ASYNC109
        """Follow the job until it is DONE (returned) or FAILED (JobFailed is raised)."""

        async def follow() -> pb.Job:
            async for job in self.watch(job_id):
                if job.status == pb.JOB_STATUS_DONE:
                    return job
                if job.status == pb.JOB_STATUS_FAILED:
                    raise JobFailed(job)
            raise JobsError(f"the watch of job {job_id} ended early")

        try:
            async with asyncio.timeout(timeout):
                return await follow()
        except TimeoutError:
            raise DeadlineExceeded(
                f"job {job_id} did not finish within {timeout} s", retryable=True
            ) from None

    # ------------------------------------------------------------------------------ admin

    async def list_jobs(
        self,
        statuses: Sequence[pb.JobStatus.ValueType] = (),
        older_than: timedelta | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[pb.Job]:
        """Every matching job, newest change first, page after page."""
        req = pb.ListJobsRequest(statuses=list(statuses), page_size=page_size)
        if older_than is not None:
            d = duration_pb2.Duration()
            d.FromTimedelta(older_than)
            req.older_than.CopyFrom(d)
        while True:
            resp = await self._retrying(lambda: self._call(self.admin.ListJobs, req))
            for job in resp.jobs:
                yield job
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    async def stats(self, stuck_after: timedelta | None = None) -> pb.GetStatsResponse:
        req = pb.GetStatsRequest()
        if stuck_after is not None:
            req.stuck_after.FromTimedelta(stuck_after)
        return await self._retrying(lambda: self._call(self.admin.GetStats, req))

    async def list_tenants(self) -> list[pb.Tenant]:
        """Every tenant, page after page (AdminService.ListTenants)."""
        out: list[pb.Tenant] = []
        token = ""
        while True:
            req = pb.ListTenantsRequest(page_size=500, page_token=token)
            resp = await self._retrying(
                lambda req=req: self._call(self.admin.ListTenants, req)  # type: ignore[misc]
            )
            out += resp.tenants
            token = resp.next_page_token
            if not token:
                return out

    async def set_tenant(self, req: pb.SetTenantRequest) -> pb.Tenant:
        """Set a tenant's weight and quotas (AdminService.SetTenant)."""
        return (await self._call(self.admin.SetTenant, req)).tenant

    async def requeue(self, job_id: str, reason: str = "") -> pb.Job:
        req = pb.RequeueJobRequest(job_id=job_id, reason=reason)
        return (await self._call(self.admin.RequeueJob, req)).job

    async def cancel(self, job_id: str, reason: str = "") -> pb.Job:
        req = pb.CancelJobRequest(job_id=job_id, reason=reason)
        return (await self._call(self.admin.CancelJob, req)).job


def _refused(job_id: str, what: str, exc: _transfer.PutRefused) -> UploadFailed:
    hint = ""
    if exc.s3_code in ("BadDigest", "XAmzContentSHA256Mismatch"):
        hint = " (S3 says the bytes do not match their SHA-256: did the file change?)"
    return UploadFailed(
        f"S3 refused {what} of job {job_id}: {exc}{hint}; the job stays in AWAITING_UPLOAD",
        reason=exc.s3_code,
        retryable=False,
    )
