"""Retention of finished jobs: DONE and FAILED jobs whose last change is older than an age are
deleted with their error rows, and on request their results in S3.

Deletes run in small batches, one short transaction each, taking only rows nobody else holds
(SKIP LOCKED): a purge never waits for the lease path, and the lease path never touches the
rows a purge takes (finished jobs are not leased). Active jobs are never deleted: the status is
checked in the statement that deletes. Runs as a background task when
JOB_SERVICE_RETENTION_SECONDS > 0, and on demand through AdminService.PurgeJobs.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

from job_service.config import Settings
from job_service.domain import errors
from job_service.ports import ResultObjects, RetentionRecords

log = logging.getLogger(__name__)

#: A purge never takes jobs younger than this, whatever an operator asks: a typo must not
#: delete the jobs that are being looked at.
MIN_AGE = timedelta(hours=1)
#: Jobs one PurgeJobs call deletes at most (0 in the request); a call stays bounded in time.
DEFAULT_MAX_JOBS = 10_000
MAX_MAX_JOBS = 100_000
#: Batches one background pass runs at most; the next pass continues.
BATCHES_PER_PASS = 20
#: Batch size when results are deleted too: the batch's rows stay locked while S3 answers
#: (one list and one delete per job), so keep that short.
RESULTS_BATCH = 50


@dataclasses.dataclass(frozen=True, slots=True)
class PurgeReport:
    older_than: timedelta
    dry_run: bool
    jobs: int
    error_rows: int
    result_objects: int
    #: Jobs deleted by each transaction (empty for a dry run).
    batches: tuple[int, ...]
    #: Stopped at max_jobs with more jobs to purge.
    more: bool


class Retention:
    def __init__(
        self, records: RetentionRecords, objects: ResultObjects, settings: Settings
    ) -> None:
        self._records = records
        self._objects = objects
        self._settings = settings

    def _results_prefix(self, job_id: object) -> str:
        # Every lease writes under <results prefix><job_id>/<attempt>-<token>/ (convert.py).
        return f"{self._settings.s3_results_prefix}{job_id}/"

    async def purge(
        self,
        older_than: timedelta,
        *,
        dry_run: bool = False,
        delete_results: bool = False,
        max_jobs: int = DEFAULT_MAX_JOBS,
        batch: int | None = None,
    ) -> PurgeReport:
        """Delete up to max_jobs finished jobs unchanged for `older_than`, oldest first.

        Raises InvalidArgument (age below MIN_AGE), ObjectStoreUnavailable / ObjectStoreAccessDenied
        with delete_results (the batch in progress is left whole, earlier batches stay
        deleted), DatabaseUnavailable.
        """
        if older_than < MIN_AGE:
            raise errors.InvalidArgument(
                "older_than", f"must be at least {int(MIN_AGE.total_seconds())} s (1 hour)"
            )
        size = batch or self._settings.retention_batch
        if delete_results:
            size = min(size, RESULTS_BATCH)
        if dry_run:
            return await self._preview(older_than, delete_results, max_jobs)
        batches: list[int] = []
        n_errors = n_objects = 0
        remaining = max_jobs
        more = False
        while remaining > 0:
            want = min(size, remaining)
            async with self._records.begin() as tx:
                picked = await tx.lock_finished(older_than=older_than, limit=want)
                if delete_results:
                    for job_id, bucket in picked:
                        n_objects += await self._objects.delete_prefix(
                            bucket, self._results_prefix(job_id)
                        )
                n_jobs, errs = await tx.delete_jobs([job_id for job_id, _ in picked])
            if n_jobs:
                batches.append(n_jobs)
            n_errors += errs
            remaining -= n_jobs
            if len(picked) < want:
                break
            more = remaining <= 0
        report = PurgeReport(
            older_than, False, sum(batches), n_errors, n_objects, tuple(batches), more
        )
        if report.jobs:
            log.info(
                "retention: purged finished jobs",
                extra={
                    "jobs": report.jobs,
                    "error_rows": report.error_rows,
                    "result_objects": report.result_objects,
                    "batches": len(report.batches),
                    "older_than_seconds": older_than.total_seconds(),
                },
            )
        return report

    async def _preview(
        self, older_than: timedelta, delete_results: bool, max_jobs: int
    ) -> PurgeReport:
        async with self._records.begin() as tx:
            rows, n_errors = await tx.preview_finished(older_than=older_than, limit=max_jobs)
        picked = rows[:max_jobs]
        n_objects = 0
        if delete_results:
            for job_id, bucket in picked:
                n_objects += await self._objects.delete_prefix(
                    bucket, self._results_prefix(job_id), dry_run=True
                )
        return PurgeReport(
            older_than, True, len(picked), n_errors, n_objects, (), len(rows) > max_jobs
        )

    async def run_policy(self) -> PurgeReport | None:
        """One background pass of the configured policy (at most BATCHES_PER_PASS batches;
        the next pass continues)."""
        s = self._settings
        if s.retention_seconds <= 0:
            return None
        return await self.purge(
            timedelta(seconds=s.retention_seconds),
            delete_results=s.retention_delete_results,
            max_jobs=s.retention_batch * BATCHES_PER_PASS,
        )
