"""`make bench` (`python -m tests.bench`): the lease path's figures beside same-run baselines.

One bounded run on a durable Postgres cluster of its own (fsync and synchronous_commit on), with
moto for S3 and real `python -m job_service` processes driven only through the gRPC API. Every
line stands beside its baselines measured in the same run, and beside the targets from issues 11
and 18, so machine noise cancels in the ratios. `--quick` runs every line at toy sizes (and the
fleet on a compressed time scale) so `make test` proves the bench still works; its figures mean
nothing.

Writes the table to stdout and to .bench/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from tests.bench import fleet, pgq, service, sql, tenants
from tests.bench.infra import PGQ_DATABASE, ROOT, BenchInfra, load, machine
from tests.bench.report import KEYS, STEP_PREFIX, Line, div, note, p50, pct, rate, ratio, render
from tests.bench.sizes import (
    CALLERS,
    CLAIM_CALLERS,
    FULL,
    LEASES_PER_HEARTBEAT,
    PARKED_CALLERS,
    QUICK,
    Sizes,
)

#: --sections NAME -> method; all of them by default, in this order.
SECTIONS = {
    "throughput": "throughput",
    "idle": "idle_and_wake",
    "history": "history",
    "tenants": "tenant_lines",
    "fleet": "fleet_capacity",
}


class Bench:
    def __init__(self, infra: BenchInfra, sizes: Sizes, quick: bool) -> None:
        self.infra = infra
        self.s = sizes
        self.quick = quick
        self.lines: dict[str, Line] = {}

    def add(self, line: Line) -> None:
        self.lines[line.key] = line
        note(f"{line.what}: {line.figure}  {line.beside}")

    async def run(self, sections: Sequence[str]) -> None:
        for name in sections:
            await getattr(self, SECTIONS[name])()

    # -- throughput: echo, raw floor, PgQueuer, worker cycle, claims, heartbeats -------------

    async def throughput(self) -> None:
        s, infra = self.s, self.infra
        raw_db, svc_db = infra.new_database("raw"), infra.new_database("svc")
        raw, svc = infra.dsn(raw_db), infra.dsn(svc_db)
        proc = await infra.start_service(svc_db)
        address = proc.address

        echo = (
            await load(
                "echo", address=address, seconds=s.echo_seconds, concurrency=16, n_channels=4
            )
        )["calls_per_s"]
        self.add(
            Line(
                "echo",
                "gRPC echo ceiling: health Check, 2nd process, 16 in flight",
                rate(echo, "calls/s"),
                "transport ceiling",
            )
        )

        # Each measurement starts from a settled table (seeded, vacuumed, checkpointed), and
        # the subject is measured right after its floor, so drift between them stays small.
        await sql.seed(raw, s.raw_seed, settle=True)
        floor = await sql.floor(raw, s.seconds, CALLERS, 10, batched_ack=False)
        self.add(
            Line(
                "floor",
                "raw SQL floor: claim CTE batch 10 + fenced UPDATE per job, asyncpg, 8 conns",
                rate(floor, "jobs/s"),
                "database floor",
            )
        )
        one_call_refusal = await service.one_call_refusal(address, svc)
        cycles: dict[str, float] = {}
        variants = [("cycle_10", 10, False, False), ("cycle_1", 1, False, False)]
        if one_call_refusal is None:
            variants += [
                ("cycle_onecall_10", 10, True, False),
                ("cycle_onecall_1", 1, True, False),
                ("cycle_batched_10", 10, True, True),
            ]

        refused: dict[str, str] = {}

        async def cycle(key: str, batch: int, one_call: bool, batched: bool) -> None:
            await sql.seed(svc, s.svc_seed, settle=True)
            try:
                cycles[key] = await service.worker_cycle(
                    address, s.seconds, CALLERS, batch, one_call=one_call, batched=batched
                )
            except grpc.aio.AioRpcError as exc:  # a service from before the batch calls
                if not batched or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                refused[key] = f"this service has no batch calls ({exc.code().name})"
                return
            note(f"{key}: {cycles[key]:,.0f} jobs/s")

        await cycle(*variants[0])

        await sql.seed(raw, s.raw_seed, settle=True)
        floor_b = await sql.floor(raw, s.seconds, CALLERS, 10, batched_ack=True)
        self.add(
            Line(
                "floor_batched",
                "raw SQL, claim batch 10 + one batched ack per claim",
                rate(floor_b, "jobs/s"),
                f"{div(floor_b, floor):.1f}x the floor",
            )
        )

        pgq_dsn = infra.dsn("pgqueuer")
        pgq1 = await pgq.throughput(pgq_dsn, s.pgq_jobs_1, 1)
        self.add(
            Line(
                "pgq_1",
                "PgQueuer 1.6 claim + ack (its consumer loop), 1 process",
                rate(pgq1, "jobs/s"),
                f"{ratio(pgq1, floor)} of the raw floor",
            )
        )
        n = s.pgq_processes
        pgqn = await pgq.throughput(pgq_dsn, s.pgq_jobs_n, n)
        self.add(
            Line(
                "pgq_n",
                f"PgQueuer 1.6 claim + ack, {n} processes",
                rate(pgqn, "jobs/s"),
                f"{ratio(pgqn, floor)} of the raw floor",
            )
        )
        for variant in variants[1:]:
            await cycle(*variant)

        for key, batch, oc, batched in (
            ("cycle_10", 10, False, False),
            ("cycle_1", 1, False, False),
            ("cycle_onecall_10", 10, True, False),
            ("cycle_onecall_1", 1, True, False),
            ("cycle_batched_10", 10, True, True),
        ):
            if batched:
                label = (
                    "worker cycle: ClaimJob max_jobs={b}, BatchReportProgress(DEEP_RUNNING, "
                    "result), BatchCompleteJobs: 3 calls per claim"
                )
            elif oc:
                label = (
                    "worker cycle: ClaimJob max_jobs={b}, ReportProgress(DEEP_RUNNING, result), "
                    "CompleteJob"
                )
            else:
                label = "worker cycle: ClaimJob max_jobs={b}, 2 x ReportProgress, CompleteJob"
            what = label.format(b=batch) + f", {CALLERS} callers"
            target = "≥ 30% of raw floor" if batch == 10 else ""
            if key not in cycles:
                self.add(
                    Line(
                        key,
                        what,
                        "n/a",
                        refused.get(
                            key, f"this service refuses the one-call report ({one_call_refusal})"
                        ),
                        target,
                        None,
                    )
                )
                continue
            jobs = cycles[key]
            beside = (
                f"{ratio(jobs, floor)} of raw floor; {div(jobs, pgq1):.2f}x PgQueuer 1p, "
                f"{div(jobs, pgqn):.2f}x PgQueuer {n}p"
            )
            if batched:
                beside += f"; {ratio(jobs, floor_b)} of the batched-ack floor"
            met = div(jobs, floor) >= 0.30 if batch == 10 else None
            self.add(Line(key, what, rate(jobs, "jobs/s"), beside, target, met))

        await sql.seed(raw, s.raw_seed, settle=True)
        raw_claims = await sql.claim_one(raw, s.seconds, CLAIM_CALLERS)
        self.add(
            Line(
                "raw_claim_one",
                "raw claim-one (claim CTE LIMIT 1), 16 conns",
                rate(raw_claims, "claims/s"),
                "database floor",
            )
        )
        await sql.seed(svc, s.svc_seed, settle=True)
        claims = await service.claim_one(address, s.seconds, CLAIM_CALLERS)
        self.add(
            Line(
                "claim_one",
                "ClaimJob max_jobs=1, 16 callers",
                rate(claims, "claims/s"),
                f"{ratio(claims, raw_claims)} of raw claim-one",
                "≥ 50% of raw claim-one",
                div(claims, raw_claims) >= 0.5,
            )
        )

        await sql.seed(raw, CALLERS * LEASES_PER_HEARTBEAT, settle=True)
        raw_renew = await sql.renew(raw, s.seconds, CALLERS, LEASES_PER_HEARTBEAT)
        self.add(
            Line(
                "raw_renew",
                "raw batched renew, 32 leases per UPDATE, 8 conns",
                rate(raw_renew, "renewals/s"),
                "database floor",
            )
        )
        await sql.seed(svc, CALLERS * LEASES_PER_HEARTBEAT, settle=True)
        renew = await service.heartbeat(address, s.seconds, CALLERS, LEASES_PER_HEARTBEAT)
        self.add(
            Line(
                "heartbeat",
                "Heartbeat, 32 leases per call, 8 callers",
                rate(renew, "renewals/s"),
                f"{ratio(renew, raw_renew)} of raw renew",
            )
        )
        infra.retire(proc, svc_db)

        # The same cycle on a service with the other process count (JOB_SERVICE_PROCESSES):
        # whether a second process helps on this machine, measured rather than assumed.
        mine = infra.processes or 1
        other = 2 if mine == 1 else 1
        mine_label = (
            f"{infra.processes} process(es)" if infra.processes else "the service's default"
        )
        multi_db = infra.new_database("multi")
        await sql.seed(infra.dsn(multi_db), s.svc_seed, settle=True)
        multi = await infra.start_service(multi_db, processes=str(other))
        jobs = await service.worker_cycle(multi.address, s.seconds, CALLERS, 10, one_call=False)
        infra.retire(multi, multi_db)
        self.add(
            Line(
                "cycle_10_processes",
                f"worker cycle max_jobs=10 (2 x ReportProgress) on {other} service process(es)",
                rate(jobs, "jobs/s"),
                f"{div(jobs, cycles['cycle_10']):.2f}x the figure on {mine_label}; "
                f"{ratio(jobs, floor)} of raw floor",
            )
        )
        infra.drop_database(raw_db)

    # -- an idle queue: parked calls' database load, wake-up latency, uploads ----------------

    async def idle_and_wake(self) -> None:
        s, infra = self.s, self.infra
        db = infra.new_database("idle")
        proc = await infra.start_service(db)
        address = proc.address

        async def statements() -> tuple[int, int]:
            return await infra.statements(db)

        for key, parked in zip(("parked_small", "parked_large"), s.parked, strict=True):
            qps, non_tx, failed = await service.parked_queries(
                statements, address, parked, s.parked_wait
            )
            large = key == "parked_large"
            beside = f"{non_tx:.1f}/s without BEGIN/COMMIT; {s.parked_wait:.0f} s long-poll wait"
            if failed:
                beside += f"; calls failed: {failed}"
            self.add(
                Line(
                    key,
                    f"database queries/s, {parked:,} parked ClaimJob calls, idle queue",
                    f"{qps:.1f} queries/s",
                    beside,
                    "≤ 2 queries/s" if large else "",
                    (qps <= 2.0 and not failed) if large else None,
                )
            )

        pgq_lat = await pgq.commit_to_start(infra.dsn("pgqueuer"), s.wake_rounds)
        self.add(
            Line(
                "pgq_wake",
                "PgQueuer commit -> entrypoint start (1 process)",
                f"p50 {p50(pgq_lat):.1f} / p99 {pct(pgq_lat, 0.99):.1f} ms",
                "baseline",
            )
        )
        raw_wake = await sql.wake_up(infra.dsn(db), s.wake_rounds)
        r50 = p50(raw_wake)
        self.add(
            Line(
                "raw_wake",
                "raw wake-up: commit -> LISTEN -> claim statement returned (asyncpg)",
                f"p50 {r50:.1f} / p99 {pct(raw_wake, 0.99):.1f} ms",
                "database floor of the wake-up",
            )
        )
        wake = await service.wake_up(address, infra.dsn(db), PARKED_CALLERS, s.wake_rounds)
        w50, q50 = p50(wake), p50(pgq_lat)
        self.add(
            Line(
                "wake",
                f"wake-up: commit (enqueue) -> lease received, {PARKED_CALLERS} parked callers",
                f"p50 {w50:.1f} / p99 {pct(wake, 0.99):.1f} ms",
                f"{div(w50, q50):.1f}x PgQueuer commit->start p50; raw floor + {w50 - r50:.1f} ms",
                "p50 ≤ 3 ms and ≤ 2x PgQueuer",
                w50 <= 3.0 and w50 <= 2 * q50,
            )
        )

        uploads = await service.prepare_uploads(address, s.uploads, CALLERS)
        heads = await service.head_objects(
            infra.s3.endpoint_url,
            infra.s3.access_key,
            infra.s3.secret_key,
            "videos",
            [key for _, key in uploads],
            CALLERS,
        )
        self.add(
            Line(
                "head_object",
                "raw HeadObject on moto (aioboto3), 8 in flight",
                rate(heads, "calls/s"),
                "S3 floor",
            )
        )
        completes = await service.complete_uploads(address, uploads, CALLERS)
        self.add(
            Line(
                "complete_upload",
                "CompleteUpload (preflight + queue), 8 callers",
                rate(completes, "calls/s"),
                f"{ratio(completes, heads)} of raw HeadObject",
            )
        )
        infra.retire(proc, db)

    # -- history ------------------------------------------------------------------------------

    async def history(self) -> None:
        """Claim latency beside 10k and beside 1M finished rows: two databases, each with its own
        service, sampled alternately round by round so machine noise hits both sizes alike."""
        s, infra = self.s, self.infra
        sizes = s.history
        dbs = [infra.new_database(f"history{i}") for i in range(2)]
        dsns = [infra.dsn(db) for db in dbs]
        for dsn, size in zip(dsns, sizes, strict=True):
            note(f"inserting {size:,} finished jobs (one generate_series INSERT)")
            await sql.seed(dsn, size, status="done", settle=True)
        procs = [await infra.start_service(db) for db in dbs]
        ours = await service.claim_latency([p.address for p in procs], dsns, s.history_rounds)
        raw = await sql.claim_latency(dsns, s.history_rounds)
        for proc, db in zip(procs, dbs, strict=True):
            infra.retire(proc, db)
        grow = p50(ours[1]) / p50(ours[0])
        raw_grow = p50(raw[1]) / p50(raw[0])
        for i, key in enumerate(("history_small", "history_large")):
            beside = f"raw claim statement p50 {p50(raw[i]):.2f} ms"
            if i:
                beside += f" ({raw_grow:.2f}x); ClaimJob {grow:.2f}x its latency at {sizes[0]:,}"
            self.add(
                Line(
                    key,
                    f"ClaimJob latency, {sizes[i]:,} finished rows",
                    f"p50 {p50(ours[i]):.2f} / p99 {pct(ours[i], 0.99):.2f} ms",
                    beside,
                    f"≤ 1.2x at {sizes[0]:,}" if i else "",
                    grow <= 1.2 if i else None,
                )
            )

    # -- tenants: the fair claim's cost on the worker cycle and alone, and fairness itself ---

    async def tenant_lines(self) -> None:
        await self.infra.finish_retiring()  # the history's 1M rows dropped before, not during
        self.add(await tenants.cycle_fair_fifo(self.infra, self.s))
        self.add(await tenants.claim_cost(self.infra, self.s))
        self.add(await tenants.fairness_line(self.infra, self.s))

    async def fleet_capacity(self) -> None:
        # Fleet capacity: simulated workers in steps (tests/bench/fleet.py).
        await fleet.fleet(self.infra, self.s, self.quick, self.add)


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def amain(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.fleet_steps:
        sizes = dataclasses.replace(
            sizes, fleet_steps=tuple(int(x) for x in args.fleet_steps.split(","))
        )
    env = dict(kv.split("=", 1) for kv in args.service_env)
    sections = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    infra = BenchInfra(args.processes, env)
    started = time.perf_counter()
    try:
        await infra.start()
        await pgq.install(infra.dsn(PGQ_DATABASE))
        bench = Bench(infra, sizes, args.quick)
        await bench.run(sections)
    finally:
        await infra.finish_retiring()
        infra.close()
    took = time.perf_counter() - started
    header = [
        f"# make bench{' --quick (toy sizes: figures mean nothing)' if args.quick else ''}",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {git_rev()}, "
        f"{machine()}, Postgres fsync=on synchronous_commit=on, "
        f"service processes: {args.processes or 'service default'}, took {took:.0f} s",
    ]
    missing = [k for k in KEYS if k not in bench.lines]
    ordered = []
    for key in KEYS:
        if key in STEP_PREFIX:
            ordered += [x for k, x in bench.lines.items() if k.startswith(STEP_PREFIX[key])]
        if key in bench.lines:
            ordered.append(bench.lines[key])
    table = render(ordered, header)
    print(table)
    out_dir = Path(args.out) if args.out else ROOT / ".bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "results-quick" if args.quick else "results"
    (out_dir / f"{name}.md").write_text(table + "\n")
    (out_dir / f"{name}.json").write_text(
        json.dumps([dataclasses.asdict(x) for x in ordered], indent=1) + "\n"
    )
    if missing and len(sections) == len(SECTIONS):
        print(f"missing lines: {missing}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, for make test")
    parser.add_argument("--processes", type=int, help="JOB_SERVICE_PROCESSES for the service")
    parser.add_argument(
        "--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)"
    )
    parser.add_argument("--out", help="directory for results.md/.json (default .bench/)")
    parser.add_argument("--fleet-steps", help="comma-separated fleet sizes to try, in order")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra JOB_SERVICE_* variable for every service process",
    )
    return asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
