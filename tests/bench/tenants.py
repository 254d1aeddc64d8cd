"""`make bench`'s tenant lines: the worker cycle on a service with the fair claim beside the
same cycle on one with JOB_SERVICE_FAIR_CLAIM=false, taking turns; and the two measurements of
tests/bench/fairness.py (the fair claim's cost, the fairness line) as table lines."""

from __future__ import annotations

import re
import statistics

from tests.bench import fairness, service, sql
from tests.bench.infra import BenchInfra
from tests.bench.report import Line, div, note, rate, ratio
from tests.bench.sizes import CALLERS, Sizes

#: The issue's target: the worker cycle with fairness on within 10% of the cycle without it.
FAIR_CYCLE_SHARE = 0.90
BATCH = 10


async def cycle_fair_fifo(infra: BenchInfra, s: Sizes) -> Line:
    """The bundled worker's cycle (ClaimJob max_jobs=10, one quick->deep ReportProgress,
    CompleteJob; 8 callers) against a service with the fair claim and one without, each on a
    database of its own, seeded alike (jobs spread over several tenants) before each of its
    rounds. The two take turns, each first in every other round; medians of the rounds."""
    sides = {True: "fair", False: "FIFO"}
    dbs = {fair: infra.new_database(f"cycle_{name.lower()}") for fair, name in sides.items()}
    procs = {
        fair: await infra.start_service(db, fair_claim=str(fair).lower())
        for fair, db in dbs.items()
    }
    refused = [
        code
        for fair in sides
        if (code := await service.one_call_refusal(procs[fair].address, infra.dsn(dbs[fair])))
    ]
    figures: dict[bool, list[float]] = {True: [], False: []}
    for r in range(s.fair_cycle_rounds):
        for fair in (True, False) if r % 2 == 0 else (False, True):
            await sql.seed(
                infra.dsn(dbs[fair]), s.svc_seed, settle=True, tenants=s.fair_cycle_tenants
            )
            jobs = await service.worker_cycle(
                procs[fair].address, s.seconds, CALLERS, BATCH, one_call=not refused
            )
            figures[fair].append(jobs)
            note(f"cycle round {r + 1}, {sides[fair]} claim: {jobs:,.0f} jobs/s")
    for fair in sides:
        infra.retire(procs[fair], dbs[fair])
    on, off = statistics.median(figures[True]), statistics.median(figures[False])
    share = div(on, off)
    report = (
        f"2 x ReportProgress (the one-call report refused: {refused[0]})"
        if refused
        else "ReportProgress(DEEP_RUNNING, result)"
    )
    rounds = "; ".join(
        f"{sides[x]} " + ", ".join(f"{v:,.0f}" for v in figures[x]) for x in (True, False)
    )
    return Line(
        "cycle_fair_fifo",
        f"worker cycle: ClaimJob max_jobs={BATCH}, {report}, CompleteJob, {CALLERS} callers, "
        f"jobs of {s.fair_cycle_tenants} tenants: fair claim vs JOB_SERVICE_FAIR_CLAIM=false",
        f"fair {share:.1%} of FIFO",  # one decimal: 89.9% is not within 10%
        f"fair {rate(on, 'jobs/s')}, FIFO {rate(off, 'jobs/s')}: medians of "
        f"{s.fair_cycle_rounds} rounds each, taking turns ({rounds})",
        "within 10% (fair ≥ 90% of FIFO)",
        share >= FAIR_CYCLE_SHARE,
    )


def _scan(cost: fairness.ClaimCost) -> str:
    """'Index Scan using ix_..., 10 rows in 0.029 ms' out of the plan's scan node."""
    name = cost.scan.removeprefix("->").strip().split(" on ")[0]
    actual = re.search(r"actual time=[\d.]+\.\.([\d.]+) rows=(\d+)", cost.scan)
    return name + (f", {actual.group(2)} rows in {actual.group(1)} ms" if actual else "")


def _ms(line: str) -> str:
    """'0.08 ms' out of EXPLAIN's 'Execution Time: 0.080 ms'."""
    return line.split(":", 1)[-1].strip()


async def claim_cost(infra: BenchInfra, s: Sizes) -> Line:
    small, large = await fairness.claim_cost(
        infra.pg, s.cost_tenants, s.cost_per_tenant, s.cost_seconds
    )
    plan = f"{_scan(large)}{', SORTS' if large.sorts else ', no Sort'}"
    return Line(
        "fair_claim_cost",
        f"fair claim 10 and roll back (lease_sql), 1 conn, {large.tenants:,} tenants x "
        f"{large.jobs // large.tenants:,} = {large.jobs:,} queued jobs",
        rate(large.fair, "jobs/s"),
        f"FIFO claim {rate(large.fifo, 'jobs/s')} on them ({ratio(large.fair, large.fifo)}); "
        f"fair at {small.jobs:,} jobs ({small.tenants} tenants) {rate(small.fair, 'jobs/s')} "
        f"({div(large.fair, small.fair):.2f}x); fair plan: {plan}, execution "
        f"{_ms(large.execution)} (at {small.jobs:,} jobs: {_ms(small.execution)})",
    )


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 1 else f"{seconds:,.1f} s"


def _dwell(result: fairness.Fairness) -> str:
    order = ("B", "C", "A")  # the late tenants first: theirs is the figure fairness is about
    dwell = ", ".join(
        f"{t} p50 {_duration(result.tenants[t].p50_s)} / p99 {_duration(result.tenants[t].p99_s)}"
        for t in order
    )
    shares = " ".join(f"{t} {result.tenants[t].share:.0%}" for t in ("A", "B", "C"))
    return f"{dwell}; claims {shares}"


async def fairness_line(infra: BenchInfra, s: Sizes) -> Line:
    fair = await fairness.fairness(infra.pg, fair=True, backlog=s.fair_backlog, late=s.fair_late)
    note(fair.describe())
    fifo = await fairness.fairness(infra.pg, fair=False, backlog=s.fair_backlog, late=s.fair_late)
    note(fifo.describe())
    per_s = 1 / fairness.SUBMIT_EVERY_S
    return Line(
        "fairness",
        f"fairness: A {s.fair_backlog:,} queued, then B and C submit {s.fair_late:,} each (at "
        f"most {per_s:.0f}/s); {fairness.CLAIMERS} claimers x 10, 1 ms per job; dwell queued "
        "-> first claim, fair claim",
        _dwell(fair),
        "FIFO claim, same run: " + _dwell(fifo),
    )
