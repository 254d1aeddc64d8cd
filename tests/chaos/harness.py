"""The chaos suite's harness: a fleet of real processes, fault proxies between them, the
figures every scenario prints, and the overlap measurement.

* `Fleet` starts `python -m job_service` and `python -m analysis_worker` processes (through
  tests/chaos/processes.py), FaultyProxies in front of S3, Postgres and the job-service, and
  SIGKILLs or stops all of them at teardown. It remembers when it SIGKILLed which pid, so an
  analysis that a kill cut short has an end.
* `JobsDb` reads the job table and the error history straight from Postgres (psql), whatever
  the service can or cannot reach at the time.
* `Figures` are what the issue asks each scenario to print: jobs submitted, done, failed (with
  codes), a histogram of attempts, error rows per code, and jobs run by two workers at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from jobs.v1 import jobs_pb2_grpc

from job_service.auth.policy import Role
from localinfra.netports import free_port
from localinfra.postgres import PostgresCluster, PostgresError
from localinfra.s3 import MotoS3
from tests.chaos.processes import (
    ServiceProcess,
    json_lines,
    message,
    start,
    wait_logged,
    wait_serving,
)
from tests.support import auth, flows
from tests.support.analyzers import (
    DEEP_SECONDS_ENV,
    QUICK_SECONDS_ENV,
    RECORD_FILE_ENV,
    analysis_records,
)
from tests.support.faults import FaultyProxy

BUCKET = "videos"
ANALYZER = "tests.support.analyzers:PacedAnalyzer"
TERMINAL = ("done", "failed")


@dataclasses.dataclass(frozen=True)
class Scale:
    """`short` runs inside `make test` (the whole suite in about three minutes), `full` is
    `make chaos` (about ten). Scenarios pick their sizes with `pick(short, full)`."""

    name: str

    @classmethod
    def from_env(cls) -> Scale:
        name = os.environ.get("CHAOS_SCALE", "short")
        if name not in ("short", "full"):
            raise ValueError(f"CHAOS_SCALE={name!r}: must be 'short' or 'full'")
        return cls(name)

    def pick(self, short: Any, full: Any) -> Any:
        return short if self.name == "short" else full


@dataclasses.dataclass
class Api:
    upload: jobs_pb2_grpc.UploadServiceAsyncStub
    worker: jobs_pb2_grpc.WorkerServiceAsyncStub
    admin: jobs_pb2_grpc.AdminServiceAsyncStub


async def until(
    predicate: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = 0.25
) -> float:
    """Polls `predicate` until it holds; returns the seconds it took. Bounded by `within`."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within:.0f}s: {what}")
        await asyncio.sleep(every)  # poll interval
    return time.monotonic() - started


# -- the database, read directly ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobRow:
    id: str
    status: str
    attempts: int
    error_code: str


class JobsDb:
    """Reads one test database with psql over TCP: independent of the service under test."""

    def __init__(self, cluster: PostgresCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    @classmethod
    def from_url(cls, cluster: PostgresCluster, url: str) -> JobsDb:
        return cls(cluster, url.rpartition("/")[2])

    def sa_url(self, port: int | None = None) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port or self.cluster.port}/{self.name}"

    async def query(self, sql: str) -> list[list[str]]:
        out = await asyncio.to_thread(self.cluster.execute, sql, self.name)
        return [line.split("|") for line in out.splitlines() if line]

    async def jobs(self) -> list[JobRow]:
        rows = await self.query(
            "SELECT id, status, attempts, coalesce(error_code, '') FROM video_analysis_jobs"
        )
        return [JobRow(r[0], r[1], int(r[2]), r[3]) for r in rows]

    async def jobs_or_none(self) -> list[JobRow] | None:
        """None while the database cannot be reached (it is being restarted)."""
        try:
            return await self.jobs()
        except PostgresError:
            return None

    async def error_rows(self) -> list[tuple[str, str]]:
        """(job id, code) of every row in the error history."""
        rows = await self.query("SELECT job_id, code FROM video_analysis_job_errors ORDER BY id")
        return [(r[0], r[1]) for r in rows]

    async def wait_all_terminal(self, count: int, within: float) -> float:
        async def settled() -> bool:
            jobs = await self.jobs_or_none()
            return jobs is not None and sum(j.status in TERMINAL for j in jobs) >= count

        return await until(settled, within=within, what=f"all {count} jobs done or failed")


# -- analysis records ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
    job: str
    kind: str  # quick / deep
    worker: str
    pid: int
    start: float
    end: float
    outcome: str  # done / aborted / killed / running


def intervals(records: Sequence[dict[str, Any]], killed: dict[int, float]) -> list[Interval]:
    """Pairs each start with the stop of the same (job, pass, pid). A start without a stop ends
    when its process was SIGKILLed, or is still running (ends now)."""
    open_: dict[tuple[str, str, int], dict[str, Any]] = {}
    out: list[Interval] = []
    for rec in records:
        key = (str(rec["job"]), str(rec["pass"]), int(rec["pid"]))
        if rec["event"] == "start":
            open_[key] = rec
        elif key in open_:
            begun = open_.pop(key)
            out.append(
                Interval(
                    *key[:2],
                    str(rec["worker"]),
                    key[2],
                    begun["mono"],
                    rec["mono"],
                    str(rec.get("outcome", "done")),
                )
            )
    now = time.monotonic()
    for key, begun in open_.items():
        pid = key[2]
        outcome, end = ("killed", killed[pid]) if pid in killed else ("running", now)
        out.append(Interval(*key[:2], str(begun["worker"]), pid, begun["mono"], end, outcome))
    return sorted(out, key=lambda i: i.start)


def overlaps(spans: Sequence[Interval]) -> dict[str, float]:
    """Job id -> seconds during which two processes were analysing it at the same time."""
    by_job: dict[str, list[Interval]] = collections.defaultdict(list)
    for span in spans:
        by_job[span.job].append(span)
    result: dict[str, float] = {}
    for job, items in by_job.items():
        worst = 0.0
        for i, a in enumerate(items):
            for b in items[i + 1 :]:
                if a.pid != b.pid:
                    worst = max(worst, min(a.end, b.end) - max(a.start, b.start))
        if worst > 0:
            result[job] = round(worst, 2)
    return result


# -- figures ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
    scenario: str
    scale: str
    submitted: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    failed_codes: dict[str, int] = dataclasses.field(default_factory=dict)
    attempts: dict[int, int] = dataclasses.field(default_factory=dict)
    error_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    overlapping_jobs: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def take(
        self,
        jobs: Sequence[JobRow],
        errors: Sequence[tuple[str, str]],
        spans: Sequence[Interval] = (),
    ) -> Figures:
        self.statuses = dict(collections.Counter(j.status for j in jobs))
        self.failed_codes = dict(
            collections.Counter(j.error_code for j in jobs if j.status == "failed")
        )
        self.attempts = dict(sorted(collections.Counter(j.attempts for j in jobs).items()))
        self.error_rows = dict(collections.Counter(code for _, code in errors))
        self.overlapping_jobs = overlaps(spans)
        return self

    def render(self) -> str:
        done = self.statuses.get("done", 0)
        failed = self.statuses.get("failed", 0)
        others = {k: v for k, v in self.statuses.items() if k not in TERMINAL}
        lines = [
            f"[{self.scenario} / {self.scale}] submitted {self.submitted}, done {done}, "
            f"failed {failed} {self.failed_codes or ''}".rstrip(),
            f"  not finished: {others or 'none'}; attempts histogram {self.attempts}",
            f"  error rows by code: {self.error_rows or 'none'}",
            f"  jobs run by two workers at once: {len(self.overlapping_jobs)}"
            + (
                f" (max overlap s per job: {self.overlapping_jobs})"
                if self.overlapping_jobs
                else ""
            ),
        ]
        lines += [f"  {key}: {value}" for key, value in self.notes.items()]
        return "\n".join(lines)


# -- the fleet ----------------------------------------------------------------------------------


class Fleet:
    """Every process and proxy of one scenario; `close()` leaves nothing running."""

    def __init__(self, workdir: Path, s3: MotoS3, scale: Scale) -> None:
        self.dir = workdir
        self.s3 = s3
        self.scale = scale
        self.record_file = workdir / "analysis.jsonl"
        self.services: list[ServiceProcess] = []
        self.workers: list[ServiceProcess] = []
        self.proxies: list[FaultyProxy] = []
        self.killed: dict[int, float] = {}  # pid -> time.monotonic() of its SIGKILL
        self._channels: list[grpc.aio.Channel] = []

    async def proxy(self, port: int, *, more_ports: Sequence[int] = ()) -> FaultyProxy:
        proxy = FaultyProxy("127.0.0.1", port, more_targets=[("127.0.0.1", p) for p in more_ports])
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    def service_env(
        self, *, database_url: str, port: int, s3_endpoint: str | None, **settings: Any
    ) -> dict[str, str]:
        env = {
            "DATABASE_URL": database_url,
            "GRPC_ADDRESS": f"127.0.0.1:{port}",
            "METRICS_ADDRESS": "",
            "S3_ENDPOINT_URL": s3_endpoint or self.s3.endpoint_url,
            # Presigned URLs point at S3 itself, not at the service's fault proxy.
            "S3_PUBLIC_ENDPOINT_URL": self.s3.endpoint_url,
            "S3_ACCESS_KEY_ID": self.s3.access_key,
            "S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            "S3_BUCKET": BUCKET,
            "S3_TIMEOUT_SECONDS": "2",
            "LOG_FORMAT": "json",
            "RECONCILE_AFTER_SECONDS": "0",
            "REAPER_INTERVAL_SECONDS": "0.5",
            "CLAIM_MAX_WAIT_SECONDS": "2",
            # Authentication on with the test key; plaintext asked for (tests/support/auth.py).
            "AUTH_HS256_SECRETS": auth.TEST_HS256_SECRETS,
            "GRPC_PLAINTEXT": "true",
        }
        env.update({key.upper(): str(value) for key, value in settings.items()})
        return {f"JOB_SERVICE_{key}": value for key, value in env.items()}

    async def service(
        self,
        *,
        database_url: str,
        s3_endpoint: str | None = None,
        port: int | None = None,
        **settings: Any,
    ) -> ServiceProcess:
        """`python -m job_service`, healthy; JOB_SERVICE_<NAME> for each setting."""
        port = port or free_port()
        env = self.service_env(
            database_url=database_url, port=port, s3_endpoint=s3_endpoint, **settings
        )
        svc = start("job_service", env, self.dir / f"job-service-{len(self.services)}.log")
        self.services.append(svc)
        await wait_serving(svc, f"127.0.0.1:{port}")
        return svc

    async def worker(
        self,
        address: str,
        *,
        s3_endpoint: str | None = None,
        quick_seconds: float = 0.2,
        deep_seconds: float = 2.0,
        **overrides: Any,
    ) -> ServiceProcess:
        """`python -m analysis_worker` with the PacedAnalyzer, once it logged "worker started"."""
        index = len(self.workers)
        env = {
            "JOB_SERVICE_ADDRESS": address,
            "WORKER_ID": f"chaos-worker-{index}",
            "CONCURRENCY": "1",
            "CLAIM_WAIT_SECONDS": "1",
            "RPC_TIMEOUT_SECONDS": "2",
            "S3_ENDPOINT_URL": s3_endpoint or self.s3.endpoint_url,
            "S3_ACCESS_KEY_ID": self.s3.access_key,
            "S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            "ANALYZER": ANALYZER,
            "WORK_DIR": str(self.dir),
            "METRICS_ADDRESS": "",
            "LOG_FORMAT": "json",
            "SHUTDOWN_GRACE_SECONDS": "2",
            "TOKEN": auth.token(Role.WORKER, f"chaos-fleet-{index}"),
            "PLAINTEXT": "true",
        }
        env.update({key.upper(): str(value) for key, value in overrides.items()})
        full = {f"ANALYSIS_WORKER_{k}": v for k, v in env.items()}
        full[RECORD_FILE_ENV] = str(self.record_file)
        full[QUICK_SECONDS_ENV] = str(quick_seconds)
        full[DEEP_SECONDS_ENV] = str(deep_seconds)
        proc = start("analysis_worker", full, self.dir / f"worker-{index}.log")
        self.workers.append(proc)
        await wait_logged(proc, "worker started")
        return proc

    async def start_workers(self, count: int, address: str, **options: Any) -> list[ServiceProcess]:
        """`count` workers started at once (their start-up is the slow part)."""
        return list(await asyncio.gather(*(self.worker(address, **options) for _ in range(count))))

    def kill(self, proc: ServiceProcess) -> None:
        """SIGKILL, and remember when: the end of whatever that process was analysing."""
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGKILL)
            self.killed[proc.proc.pid] = time.monotonic()
            proc.proc.wait(10)

    def api(self, address: str) -> Api:
        channel = auth.channel(address)
        self._channels.append(channel)
        return Api(
            jobs_pb2_grpc.UploadServiceStub(channel),
            jobs_pb2_grpc.WorkerServiceStub(channel),
            jobs_pb2_grpc.AdminServiceStub(channel),
        )

    async def submit(self, api: Api, count: int) -> list[str]:
        """`count` jobs through the real upload flow (initiate, PUT to S3, CompleteUpload)."""
        jobs = [await flows.queued_job(api, self.s3) for _ in range(count)]
        return [job.job_id for job in jobs]

    def spans(self) -> list[Interval]:
        return intervals(analysis_records(self.record_file), self.killed)

    def worker_events(self, event: str) -> list[dict[str, Any]]:
        """JSON log lines whose event starts with `event`, from every worker process (killed
        ones included)."""
        return _events(self.workers, event)

    def service_events(self, event: str) -> list[dict[str, Any]]:
        """As worker_events, from every job-service process."""
        return _events(self.services, event)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        # Heal every fault first, so graceful stops do not wait on a frozen connection.
        for proxy in self.proxies:
            proxy.set_mode("pass")
        # Workers first (they may still talk to the service), then services; SIGTERM with a
        # 2 s grace (nothing is measured any more), then SIGKILL (ServiceProcess.stop).
        for group in (self.workers, self.services):
            await asyncio.gather(
                *(asyncio.to_thread(proc.stop, 2.0) for proc in group), return_exceptions=True
            )
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.stop()


def _events(procs: Sequence[ServiceProcess], event: str) -> list[dict[str, Any]]:
    return [line for p in procs for line in json_lines(p) if message(line).startswith(event)]
