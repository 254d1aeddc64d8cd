"""Prometheus metrics for one worker.

Each `WorkerMetrics` owns its registry instead of using the global one, so main() decides whether
and where they are served and tests can build as many workers as they like in one process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from analysis_worker.config import HostPort

# Video passes run from under a second (a short clip's quick pass) to many minutes.
_PASS_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))


class WorkerMetrics:
    """The worker's counters, gauges and histograms, on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.pass_seconds = Histogram(
            "analysis_worker_pass_seconds",
            "Wall time of one analysis pass.",
            ["pass"],
            buckets=_PASS_BUCKETS,
            registry=r,
        )
        self.claim_calls = Counter(
            "analysis_worker_claim_calls_total",
            "ClaimJob calls by outcome (leased, empty, error).",
            ["outcome"],
            registry=r,
        )
        self.leases_claimed = Counter(
            "analysis_worker_leases_claimed_total", "Leases received from ClaimJob.", registry=r
        )
        self.jobs_completed = Counter(
            "analysis_worker_jobs_completed_total", "Jobs completed (CompleteJob OK).", registry=r
        )
        self.jobs_failed = Counter(
            "analysis_worker_jobs_failed_total",
            "Jobs reported failed, by error code.",
            ["code", "retryable"],
            registry=r,
        )
        self.jobs_released = Counter(
            "analysis_worker_jobs_released_total",
            "Leases released unfinished (graceful shutdown).",
            registry=r,
        )
        self.leases_lost = Counter(
            "analysis_worker_leases_lost_total",
            "Leases found lost (heartbeat LOST or ABORTED); the job was dropped.",
            registry=r,
        )
        self.leases_fenced = Counter(
            "analysis_worker_leases_fenced_total",
            "Jobs the worker stopped itself because their lease ran out unrenewed.",
            registry=r,
        )
        self.infrastructure_failures = Counter(
            "analysis_worker_infrastructure_failures_total",
            "Leases given back with FailJob(FAILURE_KIND_INFRASTRUCTURE), by error code.",
            ["code"],
            registry=r,
        )
        self.object_store_retries = Counter(
            "analysis_worker_storage_retries_total",
            "S3 operations retried inside a lease after infrastructure errors.",
            ["operation"],
            registry=r,
        )
        self.heartbeats = Counter(
            "analysis_worker_heartbeats_total",
            "Heartbeat calls by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.active_jobs = Gauge(
            "analysis_worker_active_jobs", "Leases currently held by this worker.", registry=r
        )


@dataclass
class MetricsServer:
    """The HTTP endpoint serving /metrics; `port` is the bound one (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(metrics: WorkerMetrics, address: HostPort) -> MetricsServer:
    """Starts the /metrics endpoint on `address` (a daemon thread)."""
    server, thread = start_http_server(address.port, addr=address.host, registry=metrics.registry)
    return MetricsServer(server, thread)
