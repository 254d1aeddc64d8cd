"""Load processes, run apart from the bench process so a client never shares a core's event loop
with what it measures: `python -m tests.bench.load echo|fleet ARGS-JSON`; prints one JSON line.

echo:  grpc.health.v1 Check calls/s (the transport ceiling: no database, no service code).
fleet: simulated analysis workers. Each claims one job at a time and runs it for `job_s`
       seconds: Heartbeat every `heartbeat_s`, ReportProgress QUICK_DONE and DEEP_RUNNING half
       way, CompleteJob at the end -- four lease RPCs per job plus the heartbeats. Workers start
       spread over the ramp, and the fleet is in steady state when the window opens: each
       worker's first job is one it was already running, a uniform share of a job in, so
       claims, reports and completions spread evenly over time (a fleet whose jobs all started
       within the ramp would claim, report and complete in bursts at three times the steady
       rate: a cold start, not capacity). At the window's end each worker hands its lease
       back, as on SIGTERM, and stops. Latencies count inside the observation window, lost
       leases and failed calls count anywhere.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc

from tests.support import auth


async def echo(address: str, seconds: float, concurrency: int, n_channels: int) -> dict[str, Any]:
    chans = [grpc.aio.insecure_channel(address) for _ in range(n_channels)]
    stubs = [health_pb2_grpc.HealthStub(ch) for ch in chans]
    done = 0
    for stub in stubs:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    deadline = time.perf_counter() + seconds

    async def loop(stub: health_pb2_grpc.HealthStub) -> None:
        nonlocal done
        request = health_pb2.HealthCheckRequest()
        while time.perf_counter() < deadline:
            await stub.Check(request, timeout=10)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(stubs[i % len(stubs)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    for ch in chans:
        await ch.close()
    return {"calls_per_s": done / elapsed}


class Fleet:
    def __init__(
        self,
        address: str,
        workers: int,
        n_channels: int,
        heartbeat_s: float,
        job_s: float,
        ramp_s: float,
        window_s: float,
        offset: int,
    ) -> None:
        self.address = address
        self.workers = workers
        self.n_channels = n_channels
        self.heartbeat_s = heartbeat_s
        self.job_s = job_s
        self.ramp_s = ramp_s
        self.window_s = window_s
        self.offset = offset
        self.latencies: dict[str, list[float]] = {
            "Heartbeat": [],
            "ClaimJob": [],
            "ReportProgress": [],
            "CompleteJob": [],
            "ReleaseJob": [],
        }
        self.calls = 0
        self.lost = 0
        self.errors: dict[str, int] = {}
        self.details: dict[str, str] = {}  # the first message per error key, for the log
        self.jobs_done = 0
        self.abandoned = 0  # gave up after retries: the lease expires and the job runs again

    async def run(self) -> dict[str, Any]:
        # One connection per channel, as each worker host has its own (grpc would otherwise
        # share one subchannel, so one TCP connection, between equal channels of a process).
        local = [("grpc.use_local_subchannel_pool", 1)]
        chans = [auth.channel(self.address, options=local) for _ in range(self.n_channels)]
        for ch in chans:
            await asyncio.wait_for(ch.channel_ready(), 30)
        stubs = [jobs_pb2_grpc.WorkerServiceStub(ch) for ch in chans]
        self.t0 = time.perf_counter()
        self.window = (self.t0 + self.ramp_s, self.t0 + self.ramp_s + self.window_s)
        self.end = self.window[1]
        await asyncio.gather(*(self.worker(i, stubs[i % len(stubs)]) for i in range(self.workers)))
        for ch in chans:
            await ch.close()
        return {
            "latencies": self.latencies,
            "calls": self.calls,
            "lost": self.lost,
            "errors": self.errors,
            "details": self.details,
            "jobs_done": self.jobs_done,
            "abandoned": self.abandoned,
            "window_s": self.window_s,
        }

    async def call(self, name: str, make: Callable[[], Any], attempts: int = 1) -> Any:
        """One RPC, retried like a worker retries UNAVAILABLE. A failed attempt is a latency
        sample too (a 5 s deadline exceeded is a 5 s heartbeat). ABORTED: the lease is lost."""
        for attempt in range(attempts):
            start = time.perf_counter()
            try:
                resp = await make()
            except grpc.aio.AioRpcError as exc:
                self.sample(name, start)
                if exc.code() == grpc.StatusCode.ABORTED:
                    self.lost += 1
                    return None
                key = f"{name}:{exc.code().name}"
                self.errors[key] = self.errors.get(key, 0) + 1
                self.details.setdefault(key, exc.details() or "")
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.5 * (attempt + 1))
                continue
            self.sample(name, start)
            self.calls += 1
            return resp
        return None

    def sample(self, name: str, start: float) -> None:
        end = time.perf_counter()
        if self.window[0] <= start and end <= self.window[1]:
            self.latencies[name].append((end - start) * 1000)

    async def worker(self, i: int, stub: jobs_pb2_grpc.WorkerServiceStub) -> None:
        name = f"sim-{self.offset + i}"
        await asyncio.sleep(self.ramp_s * random.random())
        into = self.job_s * random.random()  # how far into its first job this worker is
        while (left := self.end - time.perf_counter()) > 0.5:
            wait = duration_pb2.Duration(seconds=max(1, min(20, int(left))))
            request = pb.ClaimJobRequest(worker_id=name, max_jobs=1, wait=wait)
            resp = await self.call(
                "ClaimJob", partial(stub.ClaimJob, request, timeout=wait.seconds + 5)
            )
            if resp is None:
                await asyncio.sleep(1.0)  # a worker backs off before claiming again
                continue
            if resp.leases:
                lease = resp.leases[0]
                ref = pb.LeaseRef(job_id=lease.job.job_id, lease_token=lease.lease_token)
                if not await self.run_job(name, stub, ref, into):
                    return  # the window is over
                into = 0.0

    async def run_job(
        self, name: str, stub: jobs_pb2_grpc.WorkerServiceStub, ref: pb.LeaseRef, into: float
    ) -> bool:
        """Runs one job `into` seconds in (0: from its start). False: the window ended first and
        the lease was handed back."""
        started = time.perf_counter() - into
        finish = started + self.job_s
        n_beats = int(self.job_s / self.heartbeat_s)
        beats = [started + k * self.heartbeat_s for k in range(1, n_beats + 1)]
        events = sorted(
            [(b, "beat") for b in beats if b < finish]
            + [(started + self.job_s / 2, "progress"), (finish, "done")]
        )
        fenced = {"job_id": ref.job_id, "lease_token": ref.lease_token}
        for at, what in events:
            now = time.perf_counter()
            if at > self.end:
                # SIGTERM at the window's end: hand the lease back and stop.
                if self.end > now:
                    await asyncio.sleep(self.end - now)
                release = pb.ReleaseJobRequest(**fenced, reason="bench window over")
                await self.call("ReleaseJob", partial(stub.ReleaseJob, release, timeout=10), 3)
                return False
            if at < now and what == "beat":
                continue  # a beat of the part of the job run before the bench began
            if at > now:
                await asyncio.sleep(at - now)
            if what == "beat":
                beat = pb.HeartbeatRequest(worker_id=name, leases=[ref])
                resp = await self.call("Heartbeat", partial(stub.Heartbeat, beat, timeout=5))
                if resp is not None and any(s.state != pb.LEASE_STATE_HELD for s in resp.leases):
                    self.lost += 1
                    return True
                # A failed heartbeat is retried at the next beat: the lease outlasts two.
            elif what == "progress":
                for status in (pb.JOB_STATUS_QUICK_DONE, pb.JOB_STATUS_DEEP_RUNNING):
                    report = pb.ReportProgressRequest(**fenced, status=status, progress_pct=50)
                    if (
                        await self.call(
                            "ReportProgress", partial(stub.ReportProgress, report, timeout=10), 3
                        )
                        is None
                    ):
                        self.abandoned += 1
                        return True
            elif what == "done":
                done = pb.CompleteJobRequest(**fenced)
                if (
                    await self.call("CompleteJob", partial(stub.CompleteJob, done, timeout=10), 3)
                    is None
                ):
                    self.abandoned += 1
                    return True
                self.jobs_done += 1
        return True


async def main(kind: str, args: dict[str, Any]) -> None:
    if kind == "echo":
        out = await echo(**args)
    elif kind == "fleet":
        out = await Fleet(**args).run()
    else:
        raise SystemExit(f"unknown load {kind!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
