"""JOB_SERVICE_PROCESSES: several service processes share the gRPC port (SO_REUSEPORT), each a
whole instance; the parent forwards SIGTERM and exits when they have stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import grpc
from jobs.v1 import jobs_pb2 as pb

from tests.support.e2e import json_lines, wait_logged
from tests.support.flows import queued_job
from tests.support.service import stubs_for


async def both_listening(svc) -> list[dict]:
    """The two children's "listening" lines, once both have logged one."""
    while True:
        lines = [x for x in json_lines(svc) if x.get("msg") == "job-service listening"]
        if len(lines) >= 2:
            return lines
        await asyncio.sleep(0.05)  # the second process may still be starting


async def test_two_processes_share_the_port_and_stop_together(start_job_service, moto_s3):
    svc = await start_job_service(processes=2, metrics_address="", auth_required=False)
    await wait_logged(svc, "job-service processes started")
    listening = await both_listening(svc)
    pids = {x["pid"] for x in listening}
    assert len(pids) == 2 and {x["grpc_address"] for x in listening} == {svc.address}
    # Many connections (the kernel spreads them per connection): every job is leased once.
    channels = [grpc.aio.insecure_channel(svc.address) for _ in range(8)]
    try:
        apis = [stubs_for(ch) for ch in channels]
        jobs = {(await queued_job(apis[i % 8], moto_s3)).job_id for i in range(16)}
        got: list[str] = []
        for i in range(40):
            resp = await apis[i % 8].worker.ClaimJob(
                pb.ClaimJobRequest(worker_id=f"w-{i}", max_jobs=1), timeout=10
            )
            got += [lease.job.job_id for lease in resp.leases]
        assert sorted(got) == sorted(jobs)
    finally:
        for ch in channels:
            await ch.close()
    assert svc.stop() == 0


async def test_children_stop_when_the_parent_is_killed(start_job_service):
    # A SIGKILLed supervisor (OOM killer, kill -9) must not leave children serving the port.
    svc = await start_job_service(processes=2, metrics_address="", auth_required=False)
    children = {x["pid"] for x in await both_listening(svc)}
    assert svc.proc.pid not in children
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(timeout=10)
    deadline = asyncio.get_running_loop().time() + 20
    try:
        while alive := {pid for pid in children if _running(pid)}:
            assert asyncio.get_running_loop().time() < deadline, f"children still running: {alive}"
            await asyncio.sleep(0.1)
    finally:
        for pid in children:  # whatever the outcome, nothing outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert sum(x.get("msg") == "shutting down" for x in json_lines(svc)) == 2  # orderly stops


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has stopped
    except FileNotFoundError:
        return False
