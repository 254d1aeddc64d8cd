"""The life of one lease: download → quick pass → deep pass → upload → CompleteJob.

…or the right ending when it cannot get there. Two budgets are kept apart:

* **The job's own failures** (bad media, an analyzer error, the upload missing or changed)
  become FailJob(FAILURE_KIND_JOB) with the error's code and retryability: they count attempts.
  A bug becomes a retryable ANALYSIS_ERROR (logged with its traceback).
* **Infrastructure trouble** never counts an attempt. S3 errors that a retry can cure (5xx,
  timeouts, refused connections, 403 for our own credentials) are retried inside the lease with
  capped, jittered backoff, waking early if the job is stopped; only when the lease's S3 retry
  budget is spent does the worker give the lease up with FailJob(FAILURE_KIND_INFRASTRUCTURE),
  which requeues the job without spending an attempt. A job-service that is unreachable or in
  trouble (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN, CANCELLED)
  only delays the calls that must land (quick results, CompleteJob, FailJob, ReleaseJob): they
  are retried until they land or the lease is gone, so a finished deep pass is never turned into
  a FailJob because of the service. A report the service refuses for good (INVALID_ARGUMENT,
  FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, …) cannot land by being repeated; the job is
  then failed JOB_SERVICE_ERROR, retryable, so its attempts bound how often that repeats.

A lost lease ends the job silently (it is someone else's now), and so does the worker's own
fence when a lease runs out unrenewed; a cancellation becomes FailJob(CANCELLED); a shutdown
releases the lease (ReleaseJob).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from jobs.v1 import jobs_pb2

from analysis_worker import codes
from analysis_worker.analysis import AnalysisError, Analyzer, DeepResult
from analysis_worker.lease_bounds import LeaseBounds, lease_out_of_bounds
from analysis_worker.lease_keeper import ActiveJob, JobStopped, StopReason
from analysis_worker.metrics import WorkerMetrics
from analysis_worker.object_store import ObjectStore, ObjectStoreError
from analysis_worker.progress_reports import ProgressBatcher, ProgressSender, ProgressThrottle
from jobs_client.errors import JobsError, LeaseLost
from jobs_client.retry import Backoff
from jobs_client.worker import WorkerClient

T = TypeVar("T")

# Overall progress: the quick pass is the first 10 %, the deep pass the rest but the last
# point, which CompleteJob sets.
QUICK_DONE_PCT = 10
DEEP_END_PCT = 99

# Between two rounds of the client's own retries; grows to 30 s during long outages.
DELIVERY_RETRY = Backoff(max_attempts=1, initial_backoff=1.0, max_backoff=30.0)
# Between two tries of one S3 operation inside a lease.
S3_RETRY = Backoff(max_attempts=1, initial_backoff=0.5, max_backoff=10.0)
# How long, in total, one lease may spend retrying S3 before it gives the job back.
DEFAULT_S3_RETRY_BUDGET = 60.0

_QUICK_STATUSES = (jobs_pb2.JOB_STATUS_QUEUED, jobs_pb2.JOB_STATUS_QUICK_RUNNING)
_RESUME_STATUSES = (jobs_pb2.JOB_STATUS_QUICK_DONE, jobs_pb2.JOB_STATUS_DEEP_RUNNING)
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


class JobRunner:
    """Runs leases to an outcome. Analysis runs in `executor`, never on the event loop."""

    def __init__(
        self,
        *,
        client: WorkerClient,
        objects: ObjectStore,
        analyzer: Analyzer,
        executor: Executor,
        metrics: WorkerMetrics,
        work_dir: Path | None = None,
        delivery_retry: Backoff = DELIVERY_RETRY,
        s3_retry: Backoff = S3_RETRY,
        s3_retry_budget: float = DEFAULT_S3_RETRY_BUDGET,
        progress_interval: float = 1.0,
        progress_step: int = 5,
        bounds: LeaseBounds | None = None,
    ) -> None:
        #: Where leases may point; None trusts every lease (tests of other parts).
        self._bounds = bounds
        self._client = client
        self._objects = objects
        self._analyzer = analyzer
        self._executor = executor
        self._metrics = metrics
        self._work_dir = work_dir
        self._delivery_retry = delivery_retry
        self._s3_retry = s3_retry
        self._s3_retry_budget = s3_retry_budget
        self._progress_interval = progress_interval
        self._progress_step = progress_step
        self._rng = random.Random()
        # Whether the service takes ReportProgress(DEEP_RUNNING, result) from QUICK_RUNNING
        # (quick results + entering the deep pass in one call); None until the first answer.
        self._one_call_deep: bool | None = None
        # Percentages of the jobs this worker runs at once go in one call when they meet.
        self._progress = ProgressBatcher(
            lambda lease, pct: client.report_progress(lease, progress_pct=pct),
            self._report_many,
            key=lambda lease: lease.job.job_id,
        )

    async def _report_many(
        self, items: Sequence[tuple[jobs_pb2.Lease, int]]
    ) -> list[BaseException | None]:
        return [o.error for o in await self._client.report_progress_many(items)]

    async def run(self, job: ActiveJob) -> None:
        """Takes the job to an outcome; raises nothing but CancelledError.

        The per-job temp dir (the download and every artefact) is removed whatever happens.
        """
        tmp = Path(tempfile.mkdtemp(prefix=f"job-{_safe_name(job.job_id)}-", dir=self._work_dir))
        try:
            await self._attempt(job, tmp)
        finally:
            job.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if job.stop_reason is StopReason.LOST:
                self._metrics.leases_lost.inc()
                if job.fenced:
                    self._metrics.leases_fenced.inc()
                job.log.warning(
                    "lease lost: job dropped without further calls",
                    extra={"self_fenced": job.fenced},
                )

    async def _attempt(self, job: ActiveJob, tmp: Path) -> None:
        try:
            await self._process(job, tmp)
            return
        except JobStopped:
            pass
        except LeaseLost:
            job.stop(StopReason.LOST)
        except ObjectStoreError as exc:
            if job.stop_reason is None:
                kind = (
                    jobs_pb2.FAILURE_KIND_INFRASTRUCTURE
                    if exc.infrastructure
                    else jobs_pb2.FAILURE_KIND_JOB
                )
                await self._fail(job, exc.code, exc.message, retryable=exc.retryable, kind=kind)
                return
        except AnalysisError as exc:
            if job.stop_reason is None:
                await self._fail(job, exc.code, exc.message, retryable=exc.retryable)
                return
        except JobsError as exc:
            # Service trouble never gets here (deliveries retry it until the lease is gone):
            # this is a refusal that repeating cannot cure. Say so rather than blame the
            # analysis; the job's attempts bound how often it repeats.
            if job.stop_reason is None:
                job.log.error("job-service refused a report: %s", exc)
                await self._fail(job, codes.JOB_SERVICE_ERROR, str(exc), retryable=True)
                return
        except Exception as exc:
            if job.stop_reason is None:
                job.log.exception("unexpected error in the job pipeline")
                message = f"{type(exc).__name__}: {exc}"
                await self._fail(job, codes.ANALYSIS_ERROR, message, retryable=True)
                return
        if job.stop_reason is StopReason.CANCELLED:
            await self._fail(job, codes.CANCELLED, "cancelled by an operator", retryable=False)
        elif job.stop_reason is StopReason.SHUTDOWN:
            await self._release(job, "worker shutting down")

    async def _process(self, job: ActiveJob, tmp: Path) -> None:
        lease = job.lease
        problem = lease_out_of_bounds(lease, self._bounds) if self._bounds else None
        if problem is not None:
            # Never read or written: the worker's S3 credentials must not serve whoever wrote
            # the lease. Not retryable: another attempt gets the same lease data.
            job.log.error(
                "lease refused: %s", problem, extra={"error_code": codes.LEASE_OUT_OF_BOUNDS}
            )
            await self._fail(
                job,
                codes.LEASE_OUT_OF_BOUNDS,
                f"the worker refused the lease: {problem}",
                retryable=False,
            )
            return
        status = lease.job.status
        if status not in _QUICK_STATUSES + _RESUME_STATUSES:
            name = jobs_pb2.JobStatus.Name(status)
            raise RuntimeError(f"lease for a job in {name}: nothing to run")
        job.log.info(
            "lease started",
            extra={
                "attempt": lease.attempt,
                "stage": jobs_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_"),
            },
        )
        out_dir = tmp / "out"
        out_dir.mkdir()
        video = tmp / _input_name(lease.key)
        job.raise_if_stopped()
        size = await self._s3(
            job, "download", lambda: self._objects.download(lease, video), interrupt=job.stopped
        )
        job.log.info("downloaded", extra={"bytes": size})

        if status in _RESUME_STATUSES:
            # Another worker finished the quick pass; its results are on the job.
            quick_summary = json_format.MessageToDict(lease.job.result)
            job.log.info("resuming at the deep pass")
        else:
            quick_summary = await self._quick(job, video, out_dir)

        deep = await self._deep(job, video, out_dir)
        job.raise_if_stopped(finishing=True)
        deep_summary = deep.to_dict()
        deep_summary.pop("signal_path", None)
        deep_summary["signal_uri"] = self._objects.object_uri(lease, deep.signal_path.name)
        summary = {"quick": quick_summary, "deep": deep_summary}
        # A shutdown does not interrupt the finishing steps (finishing beats releasing the
        # work); a lost lease, or the worker's own fence, does: nothing more is uploaded.
        results_uri = await self._s3(
            job,
            "results upload",
            lambda: self._objects.upload_results(
                lease, signal_file=deep.signal_path, summary=summary
            ),
            interrupt=job.lost,
        )
        job.raise_if_stopped(finishing=True)
        await self._deliver(
            job,
            "CompleteJob",
            lambda: self._client.complete(lease, result=_struct(summary), results_uri=results_uri),
            give_up=job.lost,
        )
        job.done = True
        self._metrics.jobs_completed.inc()
        job.log.info("job completed", extra={"results_uri": results_uri})

    async def _quick(self, job: ActiveJob, video: Path, out_dir: Path) -> dict[str, Any]:
        job.raise_if_stopped()
        started = time.monotonic()
        quick = await self._in_thread(functools.partial(self._analyzer.quick, video, out_dir))
        elapsed = time.monotonic() - started
        self._metrics.pass_seconds.labels("quick").observe(elapsed)
        job.log.info("quick pass done", extra={"seconds": round(elapsed, 3)})
        summary = quick.to_dict()
        # Uploaded now, not with the rest: if this lease is lost during the deep pass, the
        # worker that resumes the job skips the quick pass and would have no thumbnails.
        summary["thumbnails"] = await self._s3(
            job,
            "thumbnails upload",
            lambda: self._objects.upload_thumbnails(job.lease, quick.thumbnails),
            interrupt=job.lost,
        )
        # Worth recording even if a shutdown began meanwhile: the next attempt resumes at deep.
        await self._enter_deep(job, _struct(summary))
        return summary

    async def _enter_deep(self, job: ActiveJob, quick_result: struct_pb2.Struct) -> None:
        """Records the quick pass and enters the deep pass: one ReportProgress(DEEP_RUNNING,
        result) where the service supports it, else QUICK_DONE(result) then DEEP_RUNNING."""
        deep, quick_done = jobs_pb2.JOB_STATUS_DEEP_RUNNING, jobs_pb2.JOB_STATUS_QUICK_DONE
        if self._one_call_deep is not False:
            try:
                await self._report_stage(job, deep, quick_result, give_up=job.lost)
            except JobsError as exc:
                if exc.code is not grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # A service that moves quick_running -> deep_running only through quick_done.
                # It recorded nothing; from now on this worker makes the two calls.
                self._one_call_deep = False
                job.log.info(
                    "job-service wants QUICK_DONE before DEEP_RUNNING; using two calls",
                    extra={"error": str(exc)},
                )
            else:
                self._one_call_deep = True
                job.raise_if_stopped()
                return
        await self._report_stage(job, quick_done, quick_result, give_up=job.lost)
        job.raise_if_stopped()
        await self._report_stage(job, deep, None, give_up=job.stopped)

    async def _report_stage(
        self,
        job: ActiveJob,
        status: jobs_pb2.JobStatus.ValueType,
        result: struct_pb2.Struct | None,
        *,
        give_up: asyncio.Event,
    ) -> None:
        name = jobs_pb2.JobStatus.Name(status).removeprefix("JOB_STATUS_")
        await self._deliver(
            job,
            f"ReportProgress({name}{', quick result' if result is not None else ''})",
            lambda: self._client.report_progress(
                job.lease, status=status, progress_pct=QUICK_DONE_PCT, result=result
            ),
            give_up=give_up,
        )

    async def _deep(self, job: ActiveJob, video: Path, out_dir: Path) -> DeepResult:
        job.raise_if_stopped()
        sender = ProgressSender(functools.partial(self._send_progress, job))
        throttle = ProgressThrottle(
            asyncio.get_running_loop(),
            sender.offer,
            start_pct=QUICK_DONE_PCT,
            end_pct=DEEP_END_PCT,
            min_interval=self._progress_interval,
            min_step=self._progress_step,
        )
        sender.start()
        started = time.monotonic()
        try:
            deep = await self._in_thread(
                functools.partial(self._analyzer.deep, video, out_dir, throttle, job.should_stop)
            )
        finally:
            await sender.close()
        elapsed = time.monotonic() - started
        self._metrics.pass_seconds.labels("deep").observe(elapsed)
        job.log.info(
            "deep pass done",
            extra={"seconds": round(elapsed, 3), "frames": deep.frames_decoded},
        )
        return deep

    async def _send_progress(self, job: ActiveJob, pct: int) -> None:
        """Best effort: a missed percentage is harmless, a lost lease stops the analysis."""
        if job.stop_reason is not None:
            return
        try:
            await self._progress.send(job.lease, pct)
        except LeaseLost:
            job.stop(StopReason.LOST)
        except JobsError as exc:
            job.log.warning("progress report failed", extra={"error": str(exc)})

    async def _fail(
        self,
        job: ActiveJob,
        code: str,
        message: str,
        *,
        retryable: bool,
        kind: jobs_pb2.FailureKind.ValueType = jobs_pb2.FAILURE_KIND_JOB,
    ) -> None:
        infrastructure = kind == jobs_pb2.FAILURE_KIND_INFRASTRUCTURE
        ended = await self._end_lease(
            job,
            "FailJob",
            lambda: self._client.fail(
                job.lease, code=code, message=message, retryable=retryable, kind=kind
            ),
            error_code=code,
        )
        if not ended:
            return
        if infrastructure:
            self._metrics.infrastructure_failures.labels(code=code).inc()
        else:
            self._metrics.jobs_failed.labels(code=code, retryable=str(retryable).lower()).inc()
        job.log.warning(
            "job failed",
            extra={
                "error_code": code,
                "error_message": message,
                "retryable": retryable,
                "infrastructure": infrastructure,
            },
        )

    async def _release(self, job: ActiveJob, reason: str) -> None:
        ended = await self._end_lease(
            job, "ReleaseJob", lambda: self._client.release(job.lease, reason=reason)
        )
        if not ended:
            return
        self._metrics.jobs_released.inc()
        job.log.info("lease released", extra={"reason": reason})

    async def _end_lease(
        self, job: ActiveJob, what: str, call: Callable[[], Awaitable[Any]], **log_extra: str
    ) -> bool:
        """Delivers the call that ends the lease (FailJob, ReleaseJob); True once it landed
        (the job is then done). False if the lease was lost meanwhile, or the call refused."""
        try:
            await self._deliver(job, what, call, give_up=job.lost)
        except LeaseLost:
            job.stop(StopReason.LOST)
            return False
        except JobStopped:
            return False
        except JobsError as exc:
            job.log.error("%s was rejected", what, extra={"error": str(exc), **log_extra})
            return False
        job.done = True
        return True

    async def _deliver(
        self,
        job: ActiveJob,
        what: str,
        call: Callable[[], Awaitable[T]],
        *,
        give_up: asyncio.Event,
    ) -> T:
        """Makes `call` until it lands: service trouble only delays it. Stops (JobStopped)
        once `give_up` is set — the lease is lost (or fenced), or the job is stopping and the
        call is moot. A lost lease (LeaseLost) and a refusal that repeating cannot cure
        (JobsError without service_trouble) are raised."""
        retry = 0
        while True:
            if give_up.is_set():
                raise JobStopped(what)
            try:
                return await call()
            except JobsError as exc:
                if not exc.service_trouble:
                    raise
                delay = self._delivery_retry.delay(retry, self._rng)
                retry += 1
                job.log.warning(
                    "job-service call failed; will retry while the lease lasts",
                    extra={
                        "call": what,
                        "code": exc.code.name if exc.code else "",
                        "retry_in_s": round(delay, 2),
                    },
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await give_up.wait()

    async def _s3(
        self,
        job: ActiveJob,
        what: str,
        operation: Callable[[], Coroutine[Any, Any, T]],
        *,
        interrupt: asyncio.Event,
    ) -> T:
        """Runs an S3 operation, retrying infrastructure errors inside the lease.

        `interrupt` cancels the operation in flight (JobStopped); a backoff also ends early
        when the job is stopped for any reason. The lease's budget (`s3_retry_budget` seconds
        of S3 trouble in total, across its operations) bounds the retries; when it is spent
        the last error is raised and the job is given back as infrastructure trouble.
        """
        loop = asyncio.get_running_loop()
        retry = 0
        trouble_since: float | None = None
        while True:
            tried_at = loop.time()
            try:
                result = await _until(interrupt, operation())
            except ObjectStoreError as exc:
                if not exc.infrastructure:
                    raise
                now = loop.time()
                if trouble_since is None:
                    trouble_since = tried_at
                spent = job.s3_trouble_seconds + (now - trouble_since)
                left = self._s3_retry_budget - spent
                if left <= 0:
                    job.s3_trouble_seconds = spent
                    job.log.warning(
                        "S3 retry budget of this lease spent; giving the job back",
                        extra={"operation": what, "error_code": exc.code, "spent_s": round(spent)},
                    )
                    raise
                delay = min(self._s3_retry.delay(retry, self._rng), left)
                retry += 1
                self._metrics.object_store_retries.labels(operation=what).inc()
                job.log.warning(
                    "S3 operation failed; retrying inside the lease",
                    extra={
                        "operation": what,
                        "error_code": exc.code,
                        "error": exc.message,
                        "retry_in_s": round(delay, 2),
                    },
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await job.stopped.wait()
                if job.stop_reason is not None:
                    raise JobStopped(f"stopped while retrying the {what}") from None
                continue
            if trouble_since is not None:
                job.s3_trouble_seconds += loop.time() - trouble_since
            return result

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


async def _until(event: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """Runs `work` unless `event` is set first (then cancels it: JobStopped)."""
    if event.is_set():
        work.close()
        raise JobStopped("stopped before starting")
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            # Let it close its file and connection before the temp dir goes.
            await asyncio.wait({task})
    if task.cancelled():
        raise JobStopped("stopped while waiting")
    return task.result()


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64]


def _input_name(key: str) -> str:
    """The download's local name: never derived from the key beyond a plain extension."""
    suffix = Path(key).suffix
    return "input" + (suffix if _SAFE_SUFFIX.match(suffix) else "")
