"""Prometheus metrics of the job-service, on a registry of their own (tests build their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OTHER_TENANTS = "other"


class TenantLabels:
    """The dwell metric's `tenant` label, bounded: the first `limit` tenants this instance sees
    by name, every later one as "other" (a label set Prometheus can hold whatever the number of
    sub-tenants uploaders invent)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._named:
            return tenant
        if len(self._named) < self._limit and tenant != OTHER_TENANTS:
            self._named.add(tenant)
            return tenant
        return OTHER_TENANTS


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, tenant_labels: int = 20
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tenant_label = TenantLabels(tenant_labels)
        self.tenant_dwell_seconds = Histogram(
            "job_service_tenant_dwell_seconds",
            "Queued to first claim, per tenant (the first N tenants by name, the rest 'other')",
            ["tenant"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400),
        )
        self.rpc_total = Counter(
            "job_service_rpc_total", "RPCs handled", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "job_service_rpc_seconds",
            "RPC latency (ClaimJob includes its long-poll wait)",
            ["method"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.preflight_total = Counter(
            "job_service_upload_preflight_total",
            "S3 upload preflight outcomes",
            # ok | not_found | empty | size_mismatch | content_type_mismatch | transient |
            # access_denied
            ["outcome"],
            registry=r,
        )
        self.claim_seconds = Histogram(
            "job_service_claim_query_seconds",
            "Time of one claim statement (without the long-poll wait)",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.jobs_claimed_total = Counter(
            "job_service_jobs_claimed_total", "Leases handed out", registry=r
        )
        self.lease_expired_total = Counter(
            "job_service_lease_expired_total",
            "Leases that expired and were taken back",
            ["result"],  # requeued | failed
            registry=r,
        )
        self.job_transitions_total = Counter(
            "job_service_job_transitions_total", "Status changes", ["to"], registry=r
        )
        self.jobs_by_status = Gauge("job_service_jobs", "Jobs by status", ["status"], registry=r)
        self.oldest_queued_seconds = Gauge(
            "job_service_oldest_queued_seconds",
            "Age of the oldest claimable queued job",
            registry=r,
        )
        self.stuck_uploads = Gauge(
            "job_service_stuck_awaiting_upload",
            "Jobs in awaiting_upload longer than the stuck threshold",
            registry=r,
        )
        self.reconciled_total = Counter(
            "job_service_upload_reconciled_total",
            "Stale awaiting_upload jobs checked by the reconciler",
            ["outcome"],  # queued | expired | waiting | error
            registry=r,
        )
        self.claim_waiters = Gauge(
            "job_service_claim_waiters", "ClaimJob calls waiting for work", registry=r
        )
        # Lease path (perf-core): claims whose caller never got the answer, handed back.
        self.leases_handed_back_total = Counter(
            "job_service_leases_handed_back_total",
            "Leases released because the ClaimJob caller was gone or the outcome unknown",
            registry=r,
        )
        # Events and webhooks.
        self.webhook_deliveries_total = Counter(
            "job_service_webhook_deliveries_total",
            "Webhook delivery attempts by outcome",
            ["outcome"],  # delivered | retry | gave_up | gone
            registry=r,
        )
        self.webhook_outbox_lag_seconds = Gauge(
            "job_service_webhook_outbox_lag_seconds",
            "Age of the oldest undelivered event per endpoint (at most 20 endpoints, then other)",
            ["endpoint"],
            registry=r,
        )
        self.webhook_endpoints_disabled = Gauge(
            "job_service_webhook_endpoints_disabled", "Disabled webhook endpoints", registry=r
        )
