"""Helpers of the end-to-end tests (real service and worker processes): stubs for a test acting
as backend and operator, the JSON log lines of a process, and following a job with WatchJob.
The fixtures that start the processes are in tests/e2e/conftest.py and tests/conftest.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc

from jobs_client.client import TERMINAL
from tests.support.procs import ServiceProcess


@dataclasses.dataclass
class Api:
    """Stubs for a test acting as the uploading backend and the operator."""

    upload: jobs_pb2_grpc.UploadServiceAsyncStub
    worker: jobs_pb2_grpc.WorkerServiceAsyncStub
    admin: jobs_pb2_grpc.AdminServiceAsyncStub


async def wait_logged(proc: ServiceProcess, event: str, within: float = 30.0) -> None:
    """Waits for a JSON log line with this `msg`; fails with the log if the process exits."""
    deadline = time.monotonic() + within
    while True:
        if any(line.get("msg") == event for line in json_lines(proc)):
            return
        if proc.proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.proc.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event!r} after {within}s:\n{proc.log()}")
        await asyncio.sleep(0.05)  # log poll interval


def json_lines(proc: ServiceProcess) -> list[dict[str, Any]]:
    lines = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written
    return lines


async def watch(
    api: Api,
    job_id: str,
    until: Callable[[pb.Job], bool] = lambda job: job.status in TERMINAL,
    within: float = 60.0,
    seen: list[pb.Job] | None = None,
) -> pb.Job:
    """Follows WatchJob until `until(job)` holds; returns that job. `seen` collects updates."""
    call = api.upload.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=within)
    try:
        async for response in call:
            if seen is not None:
                seen.append(response.job)
            if until(response.job):
                return response.job
    finally:
        call.cancel()
    raise AssertionError(f"WatchJob ended before the condition held for {job_id}")
