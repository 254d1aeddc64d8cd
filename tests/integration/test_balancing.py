"""Several job-service instances behind one target (section 2).

Two real instances share one database, each on its own port of 127.0.0.1. A fleet of simulated
workers, each with its own `WorkerClient` channel, holds one lease apiece (heartbeats every
0.25 s) and long-polls ClaimJob beside it. Two ways to reach the instances are measured:

- **round-robin target** (`ipv4:127.0.0.1:A,127.0.0.1:B`, what `dns:///name:port` of a Kubernetes
  headless Service resolves to): every channel spreads its calls over every address;
- **an L4 balancer** (one address, a TCP proxy handing each new connection to the next
  instance: a ClusterIP Service): a connection stays where it landed, so after an instance
  restarts the fleet is all on the other one until the service's max connection age sends
  GOAWAY and the clients reconnect.

Throughout, a short connection age (3 s) retires connections many times: no lease is lost, no
ClaimJob long poll, Heartbeat or WatchJob stream fails outside the restart itself (GOAWAY ends
nothing in flight: the grace covers the longest call), and the balance is printed before and
after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc as pb_grpc

from job_service.app import JobServiceApp
from job_service.config import Settings
from jobs_client.auth import bearer_interceptors
from jobs_client.channel import open_channel
from jobs_client.errors import JobsError
from jobs_client.worker import WorkerClient
from tests.support import auth
from tests.support.auth import Role, token
from tests.support.flows import queued_job
from tests.support.service import settings_for, stubs_for

FLEET = 12
CONNECTION_AGE = 3.0
WINDOW = 2.5


def instance_settings(database_url: str, moto_s3: Any, port: int = 0) -> Settings:
    return settings_for(
        database_url,
        moto_s3,
        grpc_address=f"127.0.0.1:{port}",
        lease_seconds=4.0,
        heartbeat_interval_seconds=1.0,
        claim_max_wait_seconds=2.0,
        watch_max_seconds=2.0,
        grpc_max_connection_age_seconds=CONNECTION_AGE,
        grpc_max_connection_age_grace_seconds=3.0,
    )


def heartbeats_served(app: JobServiceApp) -> int:
    total = 0.0
    for metric in app.metrics.rpc_total.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["method"].endswith("Heartbeat"):
                total += sample.value
    return int(total)


class RoundRobinProxy:
    """An L4 balancer: each new TCP connection goes to the next upstream that accepts it."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._next = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in self.ports:
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue  # that instance is down: the balancer's health check skips it
        else:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()


@dataclasses.dataclass
class FleetStats:
    lost: int = 0
    heartbeat_errors: list[str] = dataclasses.field(default_factory=list)
    claim_errors: list[str] = dataclasses.field(default_factory=list)
    watch_errors: list[str] = dataclasses.field(default_factory=list)
    renewals: int = 0
    watch_streams_ended_ok: int = 0


class Fleet:
    """FLEET workers, each its own channel: one held lease renewed every 0.25 s, and one
    ClaimJob long poll after another beside it."""

    def __init__(self, target: str) -> None:
        # A connection of its own per worker, as separate processes have (grpc otherwise
        # shares one connection among a process's channels to the same target).
        own = [("grpc.use_local_subchannel_pool", 1)]
        self.clients = [
            WorkerClient.connect(
                target, worker_id=f"fleet-{n}", token=token(Role.WORKER), options=own
            )
            for n in range(FLEET)
        ]
        self.target = target
        self.stats = FleetStats()
        self.counting_errors = True
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        leases = [(await client.claim(max_jobs=1, wait=5))[0] for client in self.clients]
        for client, lease in zip(self.clients, leases, strict=True):
            self._tasks.append(asyncio.create_task(self._keep(client, lease)))
            self._tasks.append(asyncio.create_task(self._poll(client)))
        self._tasks.append(asyncio.create_task(self._watch(leases[0].job.job_id)))

    async def _watch(self, job_id: str) -> None:
        """WatchJob streams one after another (each ends OK after the 2 s stream lifetime);
        a stream in flight when its connection is retired must still end OK."""
        own = [("grpc.use_local_subchannel_pool", 1)]
        tokens = {"uploader": token(Role.UPLOADER), "operator": token(Role.OPERATOR)}
        async with open_channel(
            self.target, options=own, interceptors=bearer_interceptors(tokens)
        ) as channel:
            stub = pb_grpc.UploadServiceStub(channel)
            while not self._stop.is_set():
                call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
                try:
                    async for _ in call:
                        if self._stop.is_set():
                            call.cancel()
                    code = await call.code()
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                if code == grpc.StatusCode.OK:
                    self.stats.watch_streams_ended_ok += 1
                elif code != grpc.StatusCode.CANCELLED or not self._stop.is_set():
                    if self.counting_errors:
                        self.stats.watch_errors.append(code.name)
                    await asyncio.sleep(0.05)

    async def _keep(self, client: WorkerClient, lease: pb.Lease) -> None:
        while not self._stop.is_set():
            try:
                (status,) = await client.heartbeat([lease], deadline=2.0)
            except JobsError as exc:
                if self.counting_errors:
                    self.stats.heartbeat_errors.append(str(exc))
                await asyncio.sleep(0.05)  # retried at once: the lease lasts 4 s
                continue
            if status.state == pb.LEASE_STATE_LOST:
                self.stats.lost += 1
                return
            self.stats.renewals += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.25)

    async def _poll(self, client: WorkerClient) -> None:
        while not self._stop.is_set():
            try:
                leases = await client.claim(max_jobs=1, wait=2.0, stop=self._stop)
            except JobsError as exc:
                if self.counting_errors:
                    self.stats.claim_errors.append(str(exc))
                await asyncio.sleep(0.05)
                continue
            for lease in leases:  # none are queued; never keep one by accident
                await client.release(lease, reason="test fleet polls only")

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        for client in self.clients:
            await client.close()


@contextlib.asynccontextmanager
async def two_instances(database_url: str, moto_s3: Any) -> AsyncIterator[list[JobServiceApp]]:
    apps = [JobServiceApp(instance_settings(database_url, moto_s3)) for _ in range(2)]
    for app in apps:
        await app.__aenter__()
    try:
        yield apps
    finally:
        for app in apps:
            await app._stop_server(grace=1.0)
            await app.__aexit__(None, None, None)


async def balance(apps: list[JobServiceApp], seconds: float) -> tuple[int, int]:
    before = [heartbeats_served(app) for app in apps]
    await asyncio.sleep(seconds)  # the fleet works meanwhile: this is the measuring window
    after = [heartbeats_served(app) for app in apps]
    a, b = (after[i] - before[i] for i in range(2))
    return a, b


def share(counts: tuple[int, int]) -> str:
    a, b = counts
    return f"A {a} ({100 * a / max(1, a + b):.0f}%) / B {b} ({100 * b / max(1, a + b):.0f}%)"


def assert_within_60_40(counts: tuple[int, int], when: str) -> None:
    a, b = counts
    assert a + b > 50, f"{when}: too few heartbeats measured ({a + b})"
    assert 0.4 <= a / (a + b) <= 0.6, f"{when}: fleet not spread within 60/40: {share(counts)}"


async def restart(apps: list[JobServiceApp], index: int, database_url: str, moto_s3: Any) -> None:
    """Stops instance `index` as a rolling update does (grace) and starts it on its port."""
    old = apps[index]
    port = old.port
    await old._stop_server(grace=1.0)
    await old.__aexit__(None, None, None)
    new = JobServiceApp(instance_settings(database_url, moto_s3, port))
    await new.__aenter__()
    apps[index] = new


@pytest.mark.parametrize("route", ["round_robin_target", "l4_balancer"])
async def test_a_fleet_spreads_over_two_instances_and_again_after_a_restart(
    database_url: str, moto_s3: Any, route: str
) -> None:
    async with two_instances(database_url, moto_s3) as apps:
        ports = [app.port for app in apps]
        proxy = RoundRobinProxy(ports)
        await proxy.start()
        if route == "round_robin_target":
            target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        else:
            target = f"127.0.0.1:{proxy.port}"
        async with auth.channel(f"127.0.0.1:{ports[0]}") as channel:
            api = stubs_for(channel)
            for _ in range(FLEET):
                await queued_job(api, moto_s3)
        fleet = Fleet(target)
        try:
            await fleet.start()
            # Two connection ages: every connection is retired (GOAWAY) at least once while
            # the fleet works; nothing may fail because of it.
            await asyncio.sleep(2 * CONNECTION_AGE)
            before = await balance(apps, WINDOW)
            assert fleet.stats.heartbeat_errors == [] and fleet.stats.claim_errors == []
            assert fleet.stats.watch_errors == [] and fleet.stats.watch_streams_ended_ok >= 2
            fleet.counting_errors = False  # the restart itself may cut calls; they are retried
            restarted_at = time.monotonic()
            await restart(apps, 1, database_url, moto_s3)
            back_at = time.monotonic()
            # Within one connection age (plus grpc's 10 % jitter) of the instance's return,
            # every connection that moved away has been retired and placed again.
            await asyncio.sleep(CONNECTION_AGE * 1.1)
            fleet.counting_errors = True
            after = await balance(apps, WINDOW)
            print(
                f"\n[{route}] {FLEET} workers, max connection age {CONNECTION_AGE:g} s; "
                f"heartbeats served per instance in {WINDOW:g} s windows:\n"
                f"  before the restart: {share(before)}\n"
                f"  after instance B restarted (down {back_at - restarted_at:.1f} s), "
                f"one connection age later: {share(after)}\n"
                f"  renewals {fleet.stats.renewals}, leases lost {fleet.stats.lost}, WatchJob "
                f"streams ended OK {fleet.stats.watch_streams_ended_ok}"
            )
            assert_within_60_40(before, "before the restart")
            assert_within_60_40(after, "one connection age after the restart")
            assert fleet.stats.heartbeat_errors == [] and fleet.stats.claim_errors == []
            assert fleet.stats.watch_errors == []
        finally:
            await fleet.close()
            await proxy.close()
        assert fleet.stats.lost == 0
