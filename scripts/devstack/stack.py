"""The stack: start Postgres, S3, migrations, the job-service and workers in order; watch them;
stop them in reverse order. Spawning, readiness and stopping one process is localinfra.supervise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from job_service.config import Settings as ServiceSettings
from job_service.storage import migrate
from localinfra import supervise
from localinfra.netports import LOCALHOST, is_listening
from localinfra.postgres import PostgresCluster
from localinfra.process import Lifeline, pid_alive
from localinfra.s3 import SeaweedS3
from scripts.devstack import StackError
from scripts.devstack.cleanup import clean_previous_run
from scripts.devstack.console import Console, pretty, shown
from scripts.devstack.credentials import DevCredentials
from scripts.devstack.options import ROOT, Options, check_ports, default_ports
from scripts.devstack.signals import Signals
from scripts.devstack.state import Endpoints, StackState, banner, remove_state, write_state

DATABASE = "jobs"
READY_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 15.0
# The worker's default 30 s grace suits a deploy; at a desk, Ctrl-C should take seconds. A value
# in the environment wins.
DEV_WORKER_GRACE_SECONDS = "5"
# What a worker may take after its grace (abort, then ReleaseJob) before it is SIGKILLed.
WORKER_ABORT_MARGIN = 15.0
SUPERVISION_POLL_INTERVAL = 0.25
WORKER_READY_POLL_INTERVAL = 0.1


@dataclasses.dataclass
class Service:
    name: str
    proc: supervise.Child
    log_path: Path
    reader: threading.Thread
    #: Kills the service's process group if devstack dies before stopping it (SIGKILL, a crash,
    #: a terminal that closed its stdout); disarmed once the orderly stop has run.
    lifeline: Lifeline


def _pump(stream: IO[bytes], log_path: Path, name: str, console: Console) -> None:
    """Copy a service's output to its log file as is, and to the console shortened."""
    with log_path.open("wb") as log:
        for raw in stream:
            log.write(raw)
            log.flush()
            console.line(name, pretty(raw.decode("utf-8", "replace").rstrip("\r\n")))


class Stack:
    """What one run started, so that stop() undoes exactly that, in the right order."""

    def __init__(self, opts: Options, console: Console, signals: Signals) -> None:
        self.opts = opts
        self.console = console
        self.signals = signals
        self.pg: PostgresCluster | None = None
        self.s3: SeaweedS3 | None = None
        self.services: list[Service] = []
        self.database_url = ""
        self.defaults = ServiceSettings()
        self.started_at = time.monotonic()
        self.owns_state = False  # whether the state file is ours to remove
        self.credentials: DevCredentials | None = None

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        opts = self.opts
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        opts.log_dir.mkdir(exist_ok=True)
        clean_previous_run(opts.run_dir, self.console)
        self.write_state(ready=False)
        check_ports(opts)
        self.start_postgres()
        self.start_s3()
        step = time.monotonic()
        migrate.upgrade(self.database_url)
        assert self.pg is not None
        revision = self.pg.execute("SELECT version_num FROM alembic_version", database=DATABASE)
        self.console.say(
            f"migrations: alembic upgrade head done, revision {revision or '?'} "
            f"({time.monotonic() - step:.1f} s)"
        )
        # Authentication on: a throwaway key and a token per audience.
        self.credentials = DevCredentials.create(opts.run_dir)
        self.console.say(
            f"auth: fresh dev key and tokens in {shown(self.credentials.directory)}/ "
            "(uploader.jwt, worker.jwt, operator.jwt)"
        )
        self.start_job_service()
        self.start_workers()
        self.write_state(ready=True)

    def start_postgres(self) -> None:
        step = time.monotonic()
        self.pg = pg = PostgresCluster(self.opts.run_dir / "pg", port=self.opts.pg_port)
        pg.start()
        exists = pg.execute(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if not exists:
            pg.create_database(DATABASE)
        self.database_url = pg.sqlalchemy_url(DATABASE)
        self.write_state(ready=False)
        self.console.say(
            f"postgres on {LOCALHOST}:{pg.port} ready, database {DATABASE} "
            f"{'reused' if exists else 'created'} (data {shown(pg.data_dir)}, "
            f"{time.monotonic() - step:.1f} s)"
        )

    def start_s3(self) -> None:
        step = time.monotonic()
        d = self.defaults
        self.s3 = s3 = SeaweedS3(
            self.opts.run_dir / "s3",
            access_key=d.s3_access_key_id,
            secret_key=d.s3_secret_access_key,
        )
        s3.start()
        buckets = {b["Name"] for b in s3.client().list_buckets().get("Buckets", [])}
        if d.s3_bucket not in buckets:
            s3.create_bucket(d.s3_bucket)
        self.write_state(ready=False)
        self.console.say(
            f"SeaweedFS S3 on {s3.endpoint_url} ready, bucket {d.s3_bucket} "
            f"{'reused' if d.s3_bucket in buckets else 'created'} (data {shown(s3.data_dir)}, "
            f"{time.monotonic() - step:.1f} s)"
        )

    def spawn(self, name: str, module: str, env: dict[str, str]) -> Service:
        log_path = self.opts.log_dir / f"{name}.log"
        with self.signals.deferred():
            # Own process group: the terminal's Ctrl-C reaches only us, and we stop the
            # services in order.
            proc = supervise.spawn_module(
                module, env, cwd=ROOT, stdout=subprocess.PIPE, own_group=True
            )
            assert proc.stdout is not None
            reader = threading.Thread(
                target=_pump, args=(proc.stdout, log_path, name, self.console), daemon=True
            )
            lifeline = Lifeline([f"killpg:{proc.pid}"])  # own group: its pgid is its pid
            service = Service(name, proc, log_path, reader, lifeline)
            self.services.append(service)
        reader.start()
        self.write_state(ready=False)
        return service

    def start_job_service(self) -> None:
        assert self.s3 is not None
        step = time.monotonic()
        d, o = self.defaults, self.opts
        service = self.spawn(
            "job-service",
            "job_service",
            {
                "JOB_SERVICE_DATABASE_URL": self.database_url,
                "JOB_SERVICE_GRPC_ADDRESS": o.grpc_address,
                "JOB_SERVICE_METRICS_ADDRESS": f"{LOCALHOST}:{o.metrics_port}",
                "JOB_SERVICE_S3_ENDPOINT_URL": self.s3.endpoint_url,
                # Clients reach SeaweedFS by the same address; a value left in the shell from
                # another setup would put an unreachable host into every upload URL.
                "JOB_SERVICE_S3_PUBLIC_ENDPOINT_URL": "",
                "JOB_SERVICE_S3_ACCESS_KEY_ID": d.s3_access_key_id,
                "JOB_SERVICE_S3_SECRET_ACCESS_KEY": d.s3_secret_access_key,
                "JOB_SERVICE_S3_BUCKET": d.s3_bucket,
                # Webhooks to a receiver on this machine (docs/events.md); the banner says so.
                "JOB_SERVICE_WEBHOOK_ALLOW_HTTP": "true",
                "JOB_SERVICE_WEBHOOK_ALLOWED_ADDRESSES": "127.0.0.1 ::1",
                **self._credentials().service_env(),
            },
        )
        try:
            supervise.wait_serving(service.proc, o.grpc_address, timeout=READY_TIMEOUT)
        except supervise.ChildExited as exc:
            raise _died_starting(service, exc) from None
        except TimeoutError:
            raise StackError(
                f"{service.name} not SERVING on {o.grpc_address} after {READY_TIMEOUT:.0f} s"
            ) from None
        self.console.say(
            f"job-service SERVING on {o.grpc_address} (pid {service.proc.pid}, "
            f"{time.monotonic() - step:.1f} s)"
        )

    def start_workers(self) -> None:
        assert self.s3 is not None
        step = time.monotonic()
        d, o = self.defaults, self.opts
        started: list[tuple[Service, int]] = []
        for i, port in enumerate(o.worker_metrics_ports, start=1):
            work_dir = o.run_dir / "work" / f"worker-{i}"
            work_dir.mkdir(parents=True, exist_ok=True)
            env = {
                "ANALYSIS_WORKER_JOB_SERVICE_ADDRESS": o.grpc_address,
                "ANALYSIS_WORKER_WORKER_ID": o.worker_ids[i - 1],
                "ANALYSIS_WORKER_S3_ENDPOINT_URL": self.s3.endpoint_url,
                "ANALYSIS_WORKER_S3_REGION": self.s3.region,
                "ANALYSIS_WORKER_S3_ACCESS_KEY_ID": d.s3_access_key_id,
                "ANALYSIS_WORKER_S3_SECRET_ACCESS_KEY": d.s3_secret_access_key,
                "ANALYSIS_WORKER_METRICS_ADDRESS": f"{LOCALHOST}:{port}",
                "ANALYSIS_WORKER_WORK_DIR": str(work_dir),
                "ANALYSIS_WORKER_SHUTDOWN_GRACE_SECONDS": str(worker_grace()),
                **self._credentials().worker_env(),
            }
            started.append((self.spawn(f"worker-{i}", "analysis_worker", env), port))
        # A worker serves its metrics before it dials the job-service: that port listening
        # means it parsed its settings and got past start-up.
        deadline = time.monotonic() + READY_TIMEOUT
        for service, port in started:
            try:
                supervise.wait_healthy(
                    service.proc,
                    functools.partial(is_listening, port),
                    timeout=max(0.0, deadline - time.monotonic()),
                    interval=WORKER_READY_POLL_INTERVAL,
                )
            except supervise.ChildExited as exc:
                raise _died_starting(service, exc) from None
            except TimeoutError:
                raise StackError(f"{service.name} did not open its metrics port {port}") from None
        self.console.say(
            f"{', '.join(s.name for s, _ in started)} up "
            f"({time.monotonic() - step:.1f} s; metrics on "
            f"{', '.join(str(p) for _, p in started)})"
        )

    def _credentials(self) -> DevCredentials:
        assert self.credentials is not None, "start() makes the credentials first"
        return self.credentials

    # -- run --------------------------------------------------------------------------------

    def supervise(self) -> int:
        """Block until a process dies on its own (returns 1); a signal raises Interrupted."""
        while True:
            for service in self.services:
                code = service.proc.poll()
                if code is not None:
                    self.console.say(
                        f"{service.name} (pid {service.proc.pid}) stopped unexpectedly "
                        f"({supervise.exit_status(code)}); its log: {shown(service.log_path)}. "
                        "Stopping everything."
                    )
                    return 1
            for name, pid, log in self._infra():
                if pid is not None and not pid_alive(pid):
                    self.console.say(
                        f"{name} (pid {pid}) died unexpectedly; its log: {shown(log)}. "
                        "Stopping everything."
                    )
                    return 1
            time.sleep(SUPERVISION_POLL_INTERVAL)

    def _infra(self) -> list[tuple[str, int | None, Path]]:
        out: list[tuple[str, int | None, Path]] = []
        if self.pg is not None:
            out.append(("postgres", self.pg.pid, self.pg.log_path))
        if self.s3 is not None:
            out.append(("seaweedfs", self.s3.pid, self.s3.log_path))
        return out

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Workers, then the job-service, then S3 and Postgres; a failing step does not skip
        the next. A second Ctrl-C makes the services' stops immediate."""
        self.signals.stopping = True
        began = time.monotonic()
        workers = [s for s in self.services if s.name.startswith("worker-")]
        rest = [s for s in self.services if s not in workers]
        self._terminate(workers, worker_grace() + WORKER_ABORT_MARGIN, "running jobs are released")
        self._terminate(rest, SERVICE_STOP_TIMEOUT)
        for name, server in (("SeaweedFS", self.s3), ("postgres", self.pg)):
            if server is None:
                continue
            step = time.monotonic()
            try:
                server.stop()
            except Exception as exc:  # keep stopping the rest
                self.console.say(f"stopping {name} failed: {type(exc).__name__}: {exc}")
            else:
                self.console.say(f"{name} stopped ({time.monotonic() - step:.1f} s)")
        for service in self.services:
            service.reader.join(timeout=2)
            service.lifeline.disarm()
        if self.owns_state:
            remove_state(self.opts.run_dir)
        if self.pg is not None:
            self.console.say(f"everything stopped ({time.monotonic() - began:.1f} s)")

    def _terminate(self, services: list[Service], timeout: float, why: str = "") -> None:
        alive = [s for s in services if s.proc.poll() is None]
        if not alive:
            return
        began = time.monotonic()
        self.console.say(
            f"stopping {', '.join(s.name for s in alive)} (SIGTERM{'; ' + why if why else ''})"
        )
        killed = supervise.terminate(
            [s.proc for s in alive], timeout, group=True, hurry=lambda: self.signals.hurry
        )
        for service in alive:
            if service.proc in killed:
                reason = (
                    "second Ctrl-C"
                    if self.signals.hurry
                    else f"still running after {timeout:.0f} s"
                )
                self.console.say(f"{service.name}: {reason}, SIGKILL")
            else:
                self.console.say(
                    f"{service.name} {supervise.exit_status(service.proc.returncode)} "
                    f"({time.monotonic() - began:.1f} s)"
                )

    # -- state ------------------------------------------------------------------------------

    def write_state(self, *, ready: bool) -> None:
        processes = {name: pid for name, pid, _ in self._infra() if pid is not None}
        processes.update({s.name: s.proc.pid for s in self.services})
        state = StackState(
            pid=os.getpid(),
            ready=ready,
            grpc_address=self.opts.grpc_address,
            database_url=self.database_url,
            s3_endpoint_url=self.s3.endpoint_url if self.s3 and self.s3.pid else "",
            processes=processes,
        )
        write_state(self.opts.run_dir, state)
        self.owns_state = True

    def banner(self) -> str:
        d = self.defaults
        assert self.s3 is not None and self.pg is not None
        where = Endpoints(
            database_url=self.database_url,
            psql=f"{self.pg.bindir / 'psql'} {self.pg.dsn(DATABASE)}",
            s3_endpoint_url=self.s3.endpoint_url,
            s3_region=self.s3.region,
            bucket=d.s3_bucket,
            access_key=d.s3_access_key_id,
            secret_key=d.s3_secret_access_key,
        )
        return banner(
            self.opts,
            where,
            elapsed=time.monotonic() - self.started_at,
            default_grpc_port=default_ports()["grpc_port"],
            request_id=str(uuid.uuid4()),
            exports=self._credentials().exports(),
        )


def worker_grace() -> float:
    raw = os.environ.get("ANALYSIS_WORKER_SHUTDOWN_GRACE_SECONDS", DEV_WORKER_GRACE_SECONDS)
    try:
        return max(0.0, float(raw))
    except ValueError:
        return float(DEV_WORKER_GRACE_SECONDS)


def _died_starting(service: Service, exc: supervise.ChildExited) -> StackError:
    return StackError(
        f"{service.name} {supervise.exit_status(exc.returncode)} during start-up; "
        f"see its output above or {shown(service.log_path)}"
    )
