"""How big `make bench` measures: the full run's sizes, the --quick run's toy ones, and the
callers every section uses."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sizes:
    seconds: float  # per throughput measurement
    echo_seconds: float
    raw_seed: int
    svc_seed: int
    pgq_jobs_1: int
    pgq_jobs_n: int
    pgq_processes: int
    wake_rounds: int
    parked: tuple[int, int]
    parked_wait: float
    history: tuple[int, int]
    history_rounds: int
    fleet_steps: tuple[int, ...]
    fleet_heartbeat: float
    fleet_job: float
    fleet_ramp: float
    fleet_window: float
    uploads: int
    #: The worker cycle on the fair and on the FIFO service: rounds each (taking turns), and
    #: the tenants its seeded jobs are spread over.
    fair_cycle_rounds: int
    fair_cycle_tenants: int
    #: The fair claim's cost: tenants x queued jobs each, seconds per claim loop.
    cost_tenants: int
    cost_per_tenant: int
    cost_seconds: float
    #: The fairness line: tenant A's backlog, and what B and C each submit behind it.
    fair_backlog: int
    fair_late: int


FULL = Sizes(
    seconds=6.0,
    echo_seconds=4.0,
    raw_seed=40_000,
    svc_seed=20_000,
    pgq_jobs_1=15_000,
    pgq_jobs_n=25_000,
    pgq_processes=4,
    wake_rounds=100,
    parked=(100, 1000),
    parked_wait=10.0,
    history=(10_000, 1_000_000),
    history_rounds=200,
    fleet_steps=(1000, 2000, 3000, 4000, 5000, 10_000),
    fleet_heartbeat=10.0,
    fleet_job=30.0,
    fleet_ramp=10.0,
    fleet_window=30.0,
    uploads=400,
    fair_cycle_rounds=6,
    fair_cycle_tenants=10,
    cost_tenants=1000,
    cost_per_tenant=1000,
    cost_seconds=5.0,
    fair_backlog=20_000,
    fair_late=200,
)
QUICK = Sizes(
    seconds=0.5,
    echo_seconds=0.5,
    raw_seed=2000,
    svc_seed=500,
    pgq_jobs_1=300,
    pgq_jobs_n=600,
    pgq_processes=2,
    wake_rounds=10,
    parked=(20, 100),
    parked_wait=1.0,
    history=(1_000, 10_000),
    history_rounds=20,
    fleet_steps=(20,),
    fleet_heartbeat=1.0,
    fleet_job=3.0,
    fleet_ramp=1.0,
    fleet_window=3.0,
    uploads=20,
    fair_cycle_rounds=2,
    fair_cycle_tenants=3,
    cost_tenants=20,
    cost_per_tenant=100,
    cost_seconds=0.5,
    fair_backlog=1000,
    fair_late=20,
)
CALLERS = 8
CLAIM_CALLERS = 16
LEASES_PER_HEARTBEAT = 32
PARKED_CALLERS = 8
HB_P99_MS = 100.0
