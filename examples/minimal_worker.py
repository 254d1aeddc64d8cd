"""A worker in twenty lines on `jobs_client.worker`: claim, keep the lease, report, complete.

JOBS_TOKEN_WORKER=... python examples/minimal_worker.py 127.0.0.1:50051 [--jobs N]
"""

import asyncio
import os
import sys

from jobs.v1 import jobs_pb2 as pb

from jobs_client.worker import LeaseLost, WorkerClient


async def analyse(lease: pb.Lease) -> dict[str, object]:
    await asyncio.sleep(0.1)  # your work: read s3://{lease.bucket}/{lease.key} here
    return {"bytes": lease.size_bytes}


async def run(target: str, jobs_to_do: int | None = None) -> None:
    token, me = os.environ.get("JOBS_TOKEN_WORKER"), f"minimal-{os.getpid()}"
    async with WorkerClient.connect(target, worker_id=me, token=token) as jobs:
        done = 0
        while jobs_to_do is None or done < jobs_to_do:
            for lease in await jobs.claim(max_jobs=1, wait=20):
                try:
                    async with jobs.renewing(lease):  # heartbeats while the block runs
                        result = await analyse(lease)
                    if lease.job.status == pb.JOB_STATUS_QUICK_RUNNING:  # one pass: skip to deep
                        await jobs.report_progress(
                            lease, status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=50, result=result
                        )
                    await jobs.complete(lease, result=result)
                    done += 1
                except LeaseLost:
                    pass  # the job is someone else's now: drop it


if __name__ == "__main__":
    count = int(sys.argv[3]) if sys.argv[2:3] == ["--jobs"] else None
    asyncio.run(run(sys.argv[1], count))
