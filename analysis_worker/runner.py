"""The life of one lease: download → quick pass → deep pass → upload → CompleteJob.

…or the right ending when it cannot get there: an analysis or storage failure becomes FailJob
with the error's code and retryability; a bug becomes a retryable ANALYSIS_ERROR (logged with
its traceback); a lost lease ends the job silently (it is someone else's now); a cancellation
becomes FailJob(CANCELLED); a shutdown hands the lease back with ReleaseJob. A job-service
outage is never a reason to fail a job: calls that must land are retried until they do or the
lease is lost.
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
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from jobs.v1 import jobs_pb2

from analysis_worker.analysis import AnalysisError, Analyzer, DeepResult
from analysis_worker.job_client import (
    JobClient,
    JobServiceError,
    JobServiceUnavailable,
    LeaseLostError,
    RetryPolicy,
)
from analysis_worker.lease import ActiveJob, JobStopped, StopReason
from analysis_worker.metrics import WorkerMetrics
from analysis_worker.progress import ProgressReporter, ProgressThrottle
from analysis_worker.storage import Storage, StorageError

T = TypeVar("T")

# Overall progress: the quick pass is the first 10 %, the deep pass the rest but the last
# point, which CompleteJob sets.
QUICK_DONE_PCT = 10
DEEP_END_PCT = 99

UNEXPECTED_ERROR_CODE = "ANALYSIS_ERROR"
JOB_SERVICE_ERROR_CODE = "JOB_SERVICE_ERROR"
CANCELLED_CODE = "CANCELLED"

_QUICK_STATUSES = (jobs_pb2.JOB_STATUS_QUEUED, jobs_pb2.JOB_STATUS_QUICK_RUNNING)
_RESUME_STATUSES = (jobs_pb2.JOB_STATUS_QUICK_DONE, jobs_pb2.JOB_STATUS_DEEP_RUNNING)
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


class JobRunner:
    """Runs leases to an outcome. Analysis runs in `executor`, never on the event loop."""

    def __init__(
        self,
        *,
        client: JobClient,
        storage: Storage,
        analyzer: Analyzer,
        executor: Executor,
        metrics: WorkerMetrics,
        work_dir: Path | None = None,
        delivery_retry: RetryPolicy | None = None,
        progress_interval: float = 1.0,
        progress_step: int = 5,
    ) -> None:
        self._client = client
        self._storage = storage
        self._analyzer = analyzer
        self._executor = executor
        self._metrics = metrics
        self._work_dir = work_dir
        # Between two rounds of the client's own retries; grows to 30 s during long outages.
        self._delivery_retry = delivery_retry or RetryPolicy(
            max_attempts=1, initial_backoff=1.0, max_backoff=30.0
        )
        self._progress_interval = progress_interval
        self._progress_step = progress_step
        self._rng = random.Random()

    async def run(self, job: ActiveJob) -> None:
        """Takes the job to an outcome; raises nothing but CancelledError.

        The per-job temp dir (the download and every artefact) is removed whatever happens.
        """
        tmp = Path(tempfile.mkdtemp(prefix=f"job-{_safe_name(job.job_id)}-", dir=self._work_dir))
        try:
            await self._attempt(job, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if job.stop_reason is StopReason.LOST:
                self._metrics.leases_lost.inc()
                job.log.warning("lease lost: job dropped without further calls")

    async def _attempt(self, job: ActiveJob, tmp: Path) -> None:
        try:
            await self._process(job, tmp)
            return
        except JobStopped:
            pass
        except LeaseLostError:
            job.stop(StopReason.LOST)
        except (AnalysisError, StorageError) as exc:
            if job.stop_reason is None:
                await self._fail(job, exc.code, exc.message, retryable=exc.retryable)
                return
        except JobServiceError as exc:
            # The job-service refused a report with an unexpected status (e.g. INTERNAL): say
            # so, rather than blaming the analysis; the retry budget still bounds it.
            if job.stop_reason is None:
                job.log.error("job-service refused a report: %s", exc)
                await self._fail(job, JOB_SERVICE_ERROR_CODE, str(exc), retryable=True)
                return
        except Exception as exc:
            if job.stop_reason is None:
                job.log.exception("unexpected error in the job pipeline")
                message = f"{type(exc).__name__}: {exc}"
                await self._fail(job, UNEXPECTED_ERROR_CODE, message, retryable=True)
                return
        if job.stop_reason is StopReason.CANCELLED:
            await self._fail(job, CANCELLED_CODE, "cancelled by an operator", retryable=False)
        elif job.stop_reason is StopReason.SHUTDOWN:
            await self._release(job, "worker shutting down")

    async def _process(self, job: ActiveJob, tmp: Path) -> None:
        lease = job.lease
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
        size = await _until_stopped(job, self._storage.download(lease, video))
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
        deep_summary["signal_uri"] = self._storage.object_uri(lease, deep.signal_path.name)
        summary = {"quick": quick_summary, "deep": deep_summary}
        results_uri = await self._storage.upload_results(
            lease, signal_file=deep.signal_path, summary=summary
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
        summary["thumbnails"] = await self._storage.upload_thumbnails(job.lease, quick.thumbnails)
        # Worth recording even if a shutdown began meanwhile: the next attempt resumes at deep.
        await self._deliver(
            job,
            "ReportProgress(QUICK_DONE)",
            lambda: self._client.report_progress(
                job.lease,
                status=jobs_pb2.JOB_STATUS_QUICK_DONE,
                progress_pct=QUICK_DONE_PCT,
                result=_struct(summary),
            ),
            give_up=job.lost,
        )
        job.raise_if_stopped()
        await self._deliver(
            job,
            "ReportProgress(DEEP_RUNNING)",
            lambda: self._client.report_progress(
                job.lease, status=jobs_pb2.JOB_STATUS_DEEP_RUNNING, progress_pct=QUICK_DONE_PCT
            ),
            give_up=job.stopped,
        )
        return summary

    async def _deep(self, job: ActiveJob, video: Path, out_dir: Path) -> DeepResult:
        job.raise_if_stopped()
        reporter = ProgressReporter(functools.partial(self._send_progress, job))
        throttle = ProgressThrottle(
            asyncio.get_running_loop(),
            reporter.offer,
            start_pct=QUICK_DONE_PCT,
            end_pct=DEEP_END_PCT,
            min_interval=self._progress_interval,
            min_step=self._progress_step,
        )
        reporter.start()
        started = time.monotonic()
        try:
            deep = await self._in_thread(
                functools.partial(self._analyzer.deep, video, out_dir, throttle, job.should_stop)
            )
        finally:
            await reporter.close()
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
            await self._client.report_progress(job.lease, progress_pct=pct)
        except LeaseLostError:
            job.stop(StopReason.LOST)
        except JobServiceError as exc:
            job.log.warning("progress report failed", extra={"error": str(exc)})

    async def _fail(self, job: ActiveJob, code: str, message: str, *, retryable: bool) -> None:
        try:
            await self._deliver(
                job,
                "FailJob",
                lambda: self._client.fail(
                    job.lease, code=code, message=message, retryable=retryable
                ),
                give_up=job.lost,
            )
        except LeaseLostError:
            job.stop(StopReason.LOST)
            return
        except JobStopped:
            return
        except JobServiceError as exc:
            job.log.error("FailJob was rejected", extra={"error": str(exc), "error_code": code})
            return
        job.done = True
        self._metrics.jobs_failed.labels(code=code, retryable=str(retryable).lower()).inc()
        job.log.warning(
            "job failed",
            extra={"error_code": code, "error_message": message, "retryable": retryable},
        )

    async def _release(self, job: ActiveJob, reason: str) -> None:
        try:
            await self._deliver(
                job,
                "ReleaseJob",
                lambda: self._client.release(job.lease, reason=reason),
                give_up=job.lost,
            )
        except LeaseLostError:
            job.stop(StopReason.LOST)
            return
        except JobStopped:
            return
        except JobServiceError as exc:
            job.log.error("ReleaseJob was rejected", extra={"error": str(exc)})
            return
        job.done = True
        self._metrics.jobs_released.inc()
        job.log.info("lease released", extra={"reason": reason})

    async def _deliver(
        self,
        job: ActiveJob,
        what: str,
        call: Callable[[], Awaitable[T]],
        *,
        give_up: asyncio.Event,
    ) -> T:
        """Makes `call` until it lands: an outage only delays it. Stops (JobStopped) once
        `give_up` is set — the lease is lost, or the job is stopping and the call is moot."""
        retry = 0
        while True:
            if give_up.is_set():
                raise JobStopped(what)
            try:
                return await call()
            except JobServiceUnavailable as exc:
                delay = self._delivery_retry.delay(retry, self._rng)
                retry += 1
                job.log.warning(
                    "job-service unavailable; will retry",
                    extra={"call": what, "code": exc.code.name, "retry_in_s": round(delay, 2)},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(give_up.wait(), timeout=delay)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


async def _until_stopped(job: ActiveJob, work: Coroutine[Any, Any, T]) -> T:
    """Runs `work` unless the job is told to stop first (then cancels it: JobStopped)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(job.stopped.wait())
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
