"""A small blocking facade over JobsClient for scripts and sync code: one private event loop
in a daemon thread runs the async client, so channels stay on the loop that made them."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
from jobs.v1 import jobs_pb2 as pb

from jobs_client.channel import DEFAULT_TIMEOUT_SECONDS
from jobs_client.client import JobsClient
from jobs_client.retry import Backoff
from jobs_client.upload_progress import ProgressCallback

T = TypeVar("T")

INTERRUPTS = {signal.SIGINT, signal.SIGTERM}
HANDLER_CHECK_SECONDS = 0.25


class SyncJobsClient:
    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        retry: Backoff | None = None,
        tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

        async def make() -> JobsClient:
            return JobsClient.connect(
                address,
                timeout=timeout,
                credentials=credentials,
                token=token,
                retry=retry,
                tokens=tokens,
            )

        self.aio = self._run(make())

    def _serve(self) -> None:
        # Ctrl-C and SIGTERM belong to the caller's thread. Blocked here (and so in every
        # thread started from here, such as the transfer threads), the kernel hands them to
        # another thread; for threads started elsewhere (gRPC's own) the bounded wait in _run
        # still gets the handler run.
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
        self._loop.run_forever()

    def _run(self, aw: Awaitable[T]) -> T:
        async def run() -> T:
            return await aw

        fut: Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            # A bounded wait, repeated: the interpreter runs signal handlers between waits
            # even when the signal woke some other thread.
            while not futures.wait([fut], timeout=HANDLER_CHECK_SECONDS).done:
                pass
            return fut.result()
        except BaseException:  # Ctrl-C, or whatever a caller's signal handler raises
            fut.cancel()
            raise

    def upload_file(
        self,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        request_id: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        resume: bool = False,
        state_dir: Path | None = None,
        multipart: bool = False,
        session_id: str = "",
        concurrency: int = 4,
    ) -> pb.Job:
        """See JobsClient.upload_file; `progress` runs on the client's loop thread."""
        return self._run(
            self.aio.upload_file(
                path,
                content_type,
                request_id,
                progress,
                resume=resume,
                state_dir=state_dir,
                multipart=multipart,
                session_id=session_id,
                concurrency=concurrency,
            )
        )

    def get(self, job_id: str) -> pb.Job:
        return self._run(self.aio.get(job_id))

    def wait_done(self, job_id: str, timeout: float | None = None) -> pb.Job:
        return self._run(self.aio.wait_done(job_id, timeout))

    def watch(self, job_id: str) -> Iterator[pb.Job]:
        return self.iterate(self.aio.watch(job_id))

    def list_jobs(self, statuses: list[pb.JobStatus.ValueType] | None = None) -> Iterator[pb.Job]:
        return self.iterate(self.aio.list_jobs(statuses or []))

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Drive one of the async client's iterators from this thread."""
        while True:
            try:
                yield self._run(anext(items))
            except StopAsyncIteration:
                return

    def stats(self, stuck_after: timedelta | None = None) -> pb.GetStatsResponse:
        return self._run(self.aio.stats(stuck_after))

    def list_tenants(self) -> list[pb.Tenant]:
        return self._run(self.aio.list_tenants())

    def set_tenant(self, req: pb.SetTenantRequest) -> pb.Tenant:
        return self._run(self.aio.set_tenant(req))

    def requeue(self, job_id: str, reason: str = "") -> pb.Job:
        return self._run(self.aio.requeue(job_id, reason))

    def cancel(self, job_id: str, reason: str = "") -> pb.Job:
        return self._run(self.aio.cancel(job_id, reason))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
