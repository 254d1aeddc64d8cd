"""Composition root: settings -> engine -> S3 -> use cases -> servicers -> gRPC server, plus
the background tasks (LISTEN, lease rescue, gauges). `python -m job_service` and the tests
build the service through here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from types import TracebackType

import grpc
from google.rpc import error_details_pb2  # noqa: F401  (reflection serves ErrorInfo to grpcurl)
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from jobs.v1 import jobs_pb2
from prometheus_client import start_http_server

from job_service.admin import Admin
from job_service.auth.authenticator import Authenticator, parse_identities
from job_service.auth.revocations import DenyList
from job_service.auth.tls import ReloadingCertificates
from job_service.auth.tokens import KeyRing, Verifier
from job_service.config import Settings
from job_service.events import EventFeed, EventSignal, OwnJobs
from job_service.leases import Leases
from job_service.metrics import Metrics
from job_service.retention import MIN_AGE, Retention
from job_service.rpc.events_rpc import (
    AdminServicerWithWebhooks,
    UploadServicerWithEvents,
    job_json,
)
from job_service.rpc.interceptor import AuthInterceptor
from job_service.rpc.registration import CallGate, add_health, add_services
from job_service.rpc.servicers import WorkerServicer
from job_service.s3 import S3Gateway
from job_service.storage.db import LeasePool, Reachability, create_engine
from job_service.storage.events import EventDatabase, EventListener
from job_service.storage.jobs import JobDatabase
from job_service.storage.lease_store import LeaseStore
from job_service.storage.notify import ClaimableListener
from job_service.storage.retention import RetentionDatabase
from job_service.storage.revocations import RevocationDatabase
from job_service.storage.tenants import TenantDatabase
from job_service.storage.webhooks import WebhookDatabase
from job_service.tenants import Tenants
from job_service.uploads import Uploads
from job_service.wakeup import ClaimWaiters, JobChanges
from job_service.webhooks.addresses import AddressPolicy, parse_allowlist
from job_service.webhooks.delivery import Relay
from job_service.webhooks.endpoints import Webhooks

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    jobs_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("UploadService", "WorkerService", "AdminService")
)

#: Calls grpc-core may hold for one method before the Python server takes them. grpc.aio takes
#: one call per method per event-loop turn; past 1,000 waiting
#: (`grpc.server.max_pending_requests`, the default) grpc-core 1.85 drops new calls at random,
#: and past 3,000 all of them, answering CANCELLED as if the caller had cancelled. A fleet of
#: 5,000 workers releasing or reporting at once reaches that; such a call must queue (its
#: deadline still bounds it) and reach our caps, which answer RESOURCE_EXHAUSTED with a reason.
#: docs/decisions.md, decision 17.
PENDING_CALLS_LIMIT = 20_000

SERVER_OPTIONS = [
    # Two servers must never share a port silently.
    ("grpc.so_reuseport", 0),
    # Soft limit = hard limit: no random early drop below it (see PENDING_CALLS_LIMIT).
    ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
    ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
    # Long-polling workers ping every ~30 s; accept that instead of answering GOAWAY.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def connection_age_options(s: Settings) -> list[tuple[str, int]]:
    """GOAWAY after JOB_SERVICE_GRPC_MAX_CONNECTION_AGE_SECONDS (jittered ±10 % by grpc), so
    clients behind one name reconnect and spread over the instances; calls in flight keep the
    old connection for the grace period (at least the longest call: they end by themselves)."""
    if s.grpc_max_connection_age_seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(s.grpc_max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(s.grpc_max_connection_age_grace_seconds * 1000)),
    ]


def check_edge_settings(s: Settings) -> None:
    for name in (
        "max_concurrent_rpcs",
        "max_watch_streams",
        "watch_max_seconds",
        "aux_db_pool_size",
        "retention_interval_seconds",
        "retention_batch",
    ):
        if getattr(s, name) <= 0:
            raise ValueError(f"JOB_SERVICE_{name.upper()} must be > 0")
    if s.retention_seconds != 0 and s.retention_seconds < MIN_AGE.total_seconds():
        raise ValueError(
            f"JOB_SERVICE_RETENTION_SECONDS must be 0 (keep finished jobs forever) or at least "
            f"{int(MIN_AGE.total_seconds())}"
        )


class JobServiceApp:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(tenant_labels=settings.tenant_metric_labels)
        self.port: int = 0
        self.metrics_port: int = 0
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    async def __aenter__(self) -> JobServiceApp:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        engine = create_engine(
            s.database_url, pool_size=s.db_pool_size, connect_timeout=s.db_connect_timeout_seconds
        )
        self._stack.push_async_callback(engine.dispose)
        self.engine = engine
        check_edge_settings(s)
        # WatchJob, AdminService and retention get a small pool of their own: however many
        # streams or operator reads there are, they never take the lease path's connections.
        aux_engine = create_engine(
            s.database_url,
            pool_size=s.aux_db_pool_size,
            connect_timeout=s.db_connect_timeout_seconds,
        )
        self._stack.push_async_callback(aux_engine.dispose)
        self.aux_engine = aux_engine
        objects = await self._stack.enter_async_context(S3Gateway(s))
        if not await objects.bucket_exists(s.s3_bucket):
            raise RuntimeError(
                f"S3 bucket {s.s3_bucket!r} does not exist at {s.s3_endpoint_url or 'AWS'}: "
                "create it (every upload would look missing otherwise)"
            )
        waiters, changes = ClaimWaiters(), JobChanges()
        self.waiters = waiters
        # The lease path's own pool (issue 7 section 7): WatchJob or admin floods on the engine
        # cannot starve heartbeats of connections.
        self.reachability = Reachability()
        lease_pool = LeasePool(
            s.database_url,
            size=s.lease_pool_size,
            connect_timeout=s.db_connect_timeout_seconds,
            lock_timeout=s.lease_lock_timeout_seconds,
            statement_timeout=s.lease_statement_timeout_seconds,
            reachability=self.reachability,
        )
        await lease_pool.start()
        self._stack.push_async_callback(lease_pool.close)
        self.lease_pool = lease_pool
        lease_store = LeaseStore(lease_pool, fair=s.fair_claim)
        self.uploads = Uploads(JobDatabase(engine), objects, s, self.metrics, changes)
        self.leases = Leases(lease_store, s, waiters, self.metrics, self.reachability)
        self._stack.push_async_callback(self.leases.hand_back.close)
        self.admin = Admin(JobDatabase(aux_engine), objects, s, self.metrics)
        watch_uploads = Uploads(JobDatabase(aux_engine), objects, s, self.metrics, changes)
        self.retention = Retention(RetentionDatabase(aux_engine), objects, s)
        listener = ClaimableListener(
            s.database_url, lease_store, waiters, changes, reachability=self.reachability
        )
        self.listener = listener
        await listener.start()
        self._stack.push_async_callback(listener.stop)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await listener.connected.wait()

        # Events and webhooks: one LISTEN on job_events wakes feed streams and the
        # webhook fan-out; both read through the aux pool, never the lease path's.
        self.event_signal = EventSignal()
        self.event_listener = EventListener(s.database_url, self.event_signal.notify_all)
        await self.event_listener.start()
        self._stack.push_async_callback(self.event_listener.stop)
        self.events = EventDatabase(aux_engine)
        self.feed = EventFeed(self.events, self.event_signal)
        policy = AddressPolicy(
            allow_http=s.webhook_allow_http,
            allowlist=parse_allowlist(s.webhook_allowed_addresses),
        )
        self.webhooks = Webhooks(WebhookDatabase(aux_engine), s, policy)
        self.relay: Relay | None = None
        if s.webhook_delivery:
            self.relay = Relay(
                WebhookDatabase(aux_engine), s, self.metrics, self.event_signal, policy, job_json
            )
            await self.relay.start()
            self._stack.push_async_callback(self.relay.stop)

        # Security: authentication before every handler, TLS on the port.
        self.keys: KeyRing | None = None
        self.denylist: DenyList | None = None
        self.tls: ReloadingCertificates | None = None
        authenticator = None
        identities = parse_identities(s.tls_client_roles)
        if s.auth_required:
            self.keys = KeyRing(s)
            self.denylist = DenyList(RevocationDatabase(aux_engine))
            await self.denylist.refresh()
            authenticator = Authenticator(Verifier(s, self.keys), self.denylist, identities)
        else:
            log.warning(
                "authentication is OFF (JOB_SERVICE_AUTH_REQUIRED=false): anyone who reaches "
                "the port can call every RPC"
            )
        if not s.grpc_plaintext:
            self.tls = ReloadingCertificates(s)
        interceptor = AuthInterceptor(authenticator, self.metrics, reflection=s.reflection)
        options = list(SERVER_OPTIONS)
        if s.processes > 1:
            # Several processes share the port on purpose (main.py forks them); the kernel
            # spreads connections over them.
            options = [o for o in options if o[0] != "grpc.so_reuseport"]
            options.append(("grpc.so_reuseport", 1))
        options.extend(connection_age_options(s))
        server = grpc.aio.server(options=options, interceptors=[interceptor])
        # Not the generated add_*_to_server: one registration for every method, whose
        # deserializer never fails (a malformed request is INVALID_ARGUMENT, not UNKNOWN) and
        # which enforces the concurrency caps.
        self.gate = CallGate(max_rpcs=s.max_concurrent_rpcs, max_streams=s.max_watch_streams)
        add_services(
            server,
            {
                "UploadService": UploadServicerWithEvents(
                    self.uploads,
                    s,
                    self.metrics,
                    watch_uploads,
                    feed=self.feed,
                    own_jobs=OwnJobs(self.events, s),
                    admin=self.admin,
                ),
                "WorkerService": WorkerServicer(self.leases, s, self.metrics),
                "AdminService": AdminServicerWithWebhooks(
                    self.admin,
                    s,
                    self.metrics,
                    self.retention,
                    Tenants(TenantDatabase(aux_engine)),
                    webhooks=self.webhooks,
                    wake=self.relay.wake
                    if self.relay is not None
                    else self.event_signal.notify_all,
                ),
            },
            self.gate,
            self.metrics,
        )
        add_health(server, self.health, self.metrics)
        if s.reflection != "off":
            reflection.enable_server_reflection(
                (
                    *SERVICE_NAMES,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        if self.tls is not None:
            self.port = server.add_secure_port(s.grpc_address, self.tls.server_credentials())
        else:
            log.warning(
                "gRPC is PLAINTEXT (JOB_SERVICE_GRPC_PLAINTEXT=true): tokens and data cross the "
                "network unencrypted; use it only on a trusted local network"
            )
            self.port = server.add_insecure_port(s.grpc_address)
        if self.port == 0:
            raise RuntimeError(f"could not bind the gRPC server to {s.grpc_address}")
        await server.start()
        self.server = server
        self._stack.push_async_callback(self._stop_server)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks = [
            asyncio.create_task(
                self._every(s.reaper_interval_seconds, self.leases.rescue_expired), name="reaper"
            ),
            asyncio.create_task(self._every(15.0, self.admin.refresh_gauges), name="gauges"),
        ]
        if self.denylist is not None:
            self._tasks.append(
                asyncio.create_task(
                    self._every(s.auth_revocation_refresh_seconds, self.refresh_auth),
                    name="auth-refresh",
                )
            )
        if s.reconcile_after_seconds > 0:
            self._tasks.append(
                asyncio.create_task(
                    self._every(s.reconcile_interval_seconds, self.uploads.reconcile_stale),
                    name="upload-reconciler",
                )
            )
        if self.relay is not None:
            self._tasks.append(
                asyncio.create_task(
                    self._every(15.0, self.relay.refresh_gauges), name="webhook-gauges"
                )
            )
        if s.events_retention_seconds > 0:
            self._tasks.append(
                asyncio.create_task(
                    self._every(s.retention_interval_seconds, self.purge_events),
                    name="events-retention",
                )
            )
        if s.retention_seconds > 0:
            self._tasks.append(
                asyncio.create_task(
                    self._every(s.retention_interval_seconds, self.retention.run_policy),
                    name="retention",
                )
            )
        if s.metrics_address:
            host, _, port = s.metrics_address.rpartition(":")
            httpd, _thread = start_http_server(int(port), addr=host, registry=self.metrics.registry)
            self.metrics_port = httpd.server_port
            self._stack.callback(httpd.server_close)
            self._stack.callback(httpd.shutdown)
        log.info(
            "job-service listening",
            extra={
                "grpc_address": f"{s.grpc_address.rpartition(':')[0]}:{self.port}",
                "metrics_address": s.metrics_address,
                "pid": os.getpid(),
                "tls": self.tls is not None,
                "mtls": bool(self.tls and self.tls.require_client_auth),
                "auth_required": s.auth_required,
                "auth_kids": self.keys.kids if self.keys else [],
                "reflection": s.reflection,
            },
        )

    async def purge_events(self) -> None:
        """Events older than JOB_SERVICE_EVENTS_RETENTION_SECONDS, in small batches."""
        while True:
            async with self.events.begin() as tx:
                n = await tx.purge_older_than(
                    self.settings.events_retention_seconds, self.settings.retention_batch
                )
            if n < self.settings.retention_batch:
                return

    async def refresh_auth(self) -> None:
        """The revoked-token list, and the JWKS file if it changed (rotation)."""
        if self.denylist is not None:
            await self.denylist.refresh_quietly()
        if self.keys is not None:
            try:
                if self.keys.refresh():
                    log.info("verification keys re-read", extra={"auth_kids": self.keys.kids})
            except Exception:  # a half-written JWKS file: keep the keys we have
                log.warning("could not re-read the verification keys", exc_info=True)

    def reload_credentials(self) -> None:
        """SIGHUP: TLS files at the next handshake; keys and denylist at once."""
        if self.tls is not None:
            self.tls.request_reload()
        if self.keys is not None:
            self._tasks.append(asyncio.create_task(self._force_key_reload(), name="sighup"))

    async def _force_key_reload(self) -> None:
        assert self.keys is not None
        try:
            self.keys.refresh(force=True)
        except Exception:
            log.warning("SIGHUP: could not re-read the verification keys", exc_info=True)
        await self.refresh_auth()

    async def _every(self, seconds: float, fn: object) -> None:
        assert callable(fn)
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # a background task must outlive a database outage
                log.warning("background task %s failed", getattr(fn, "__name__", fn), exc_info=True)
            await asyncio.sleep(seconds)  # the task's period

    async def _stop_server(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        # Parked ClaimJob calls answer (empty) now instead of waiting out the grace, and no
        # call claims from here on: nothing is leased to a caller that is about to be cut off.
        self.waiters.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()
