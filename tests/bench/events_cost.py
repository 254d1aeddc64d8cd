"""`python -m tests.bench.events_cost`: what the events outbox costs the lease path.

The bench's worker cycle (ClaimJob max_jobs=10, 2 x ReportProgress, CompleteJob; 8 workers) on
one service process and one database, alternating the outbox trigger off and on
(`ALTER TABLE … DISABLE/ENABLE TRIGGER`), so both sides see the same machine state; medians of
the rounds and their ratio. A completion then writes one event row (and a NOTIFY) in its
transaction; claims, heartbeats and progress write none."""

from __future__ import annotations

import argparse
import asyncio
import statistics

import asyncpg

from tests.bench import service, sql
from tests.bench.infra import BenchInfra

TRIGGERS = ("video_analysis_jobs_event_insert", "video_analysis_jobs_event_update")


async def set_trigger(dsn: str, on: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name in TRIGGERS:
            verb = "ENABLE" if on else "DISABLE"
            await conn.execute(f"ALTER TABLE video_analysis_jobs {verb} TRIGGER {name}")
    finally:
        await conn.close()


async def main(rounds: int, seconds: float, seed: int) -> None:
    infra = BenchInfra(None, {"JOB_SERVICE_WEBHOOK_DELIVERY": "false"})
    try:
        await infra.start()
        db = infra.new_database("events")
        dsn = infra.dsn(db)
        proc = await infra.start_service(db)
        figures: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):
                await set_trigger(dsn, on)
                await sql.seed(dsn, seed, settle=True)
                rate = await service.worker_cycle(proc.address, seconds, 8, 10, one_call=False)
                figures[on].append(rate)
                print(f"round {r + 1} trigger {'on ' if on else 'off'}: {rate:,.0f} jobs/s")
        off, on = statistics.median(figures[False]), statistics.median(figures[True])
        print(
            f"worker cycle (ClaimJob max_jobs=10, 2 x ReportProgress, CompleteJob), median of "
            f"{rounds}: outbox off {off:,.0f} jobs/s, on {on:,.0f} jobs/s ({on / off:.1%})"
        )
    finally:
        await infra.finish_retiring()
        infra.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=20_000)
    a = p.parse_args()
    asyncio.run(main(a.rounds, a.seconds, a.seed))
