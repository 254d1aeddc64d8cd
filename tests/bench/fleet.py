"""`make bench`'s fleet capacity: simulated workers (load processes, tests/bench/load.py) in
steps until Heartbeat p99 reaches 100 ms or a lease is lost, on the service's default process
count and then on the other one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from tests.bench import sql
from tests.bench.infra import BenchInfra, load
from tests.bench.report import STEP_PREFIX, Line, note, p50, pct
from tests.bench.sizes import HB_P99_MS, Sizes


async def fleet(infra: BenchInfra, s: Sizes, quick: bool, add: Callable[[Line], None]) -> None:
    # The service's default process count first, then the other count (2, or 1 when the
    # bench runs with --processes 2) from the step where the first stopped: whether a
    # second process buys fleet capacity on this machine, measured rather than assumed.
    steps = s.fleet_steps
    mine = infra.processes or 1
    other = 2 if mine == 1 else 1
    mine_label = (
        f"{infra.processes} service process(es)"
        if infra.processes
        else "the service's default process count"
    )
    best = await sweep(infra, s, quick, add, "fleet", steps, None, mine_label)
    failed = [x for x in steps if x > best]  # from the first failed step on
    label = f"JOB_SERVICE_PROCESSES={other}"
    await sweep(infra, s, quick, add, "fleet_processes", failed or steps[-1:], str(other), label)


async def sweep(
    infra: BenchInfra,
    s: Sizes,
    quick: bool,
    add: Callable[[Line], None],
    key: str,
    steps: Sequence[int],
    processes: str | None,
    label: str,
) -> int:
    """Fleet steps in order until one fails; adds a line per step and the capacity line
    `key`; returns the largest step that passed (0: none)."""
    best = 0
    scale = (
        f"Heartbeat every {s.fleet_heartbeat:.0f} s, {s.fleet_job:.0f} s jobs with 4 lease "
        f"RPCs each, {s.fleet_window:.0f} s window per step"
    )
    scale = ("time compressed 10x (quick): " if quick else "real time: ") + scale
    overrides = {} if processes is None else {"processes": processes}
    for size in steps:
        await infra.finish_retiring()  # nothing else runs while a fleet step is measured
        db = infra.new_database("fleet")
        await sql.seed(infra.dsn(db), 2 * size + 100)
        proc = await infra.start_service(db, **overrides)
        # Two load processes past 1,000 workers (and in --quick, so both paths stay run).
        n_proc = 1 if size <= 1000 and not quick else 2
        share = [size // n_proc + (1 if i < size % n_proc else 0) for i in range(n_proc)]
        outs = await asyncio.gather(
            *(
                load(
                    "fleet",
                    address=proc.address,
                    workers=k,
                    n_channels=max(1, k // 25),
                    heartbeat_s=s.fleet_heartbeat,
                    job_s=s.fleet_job,
                    ramp_s=s.fleet_ramp,
                    window_s=s.fleet_window,
                    offset=i * size,
                )
                for i, k in enumerate(share)
            )
        )
        infra.retire(proc, db)
        lat: dict[str, list[float]] = {}
        for out in outs:
            for name, values in out["latencies"].items():
                lat.setdefault(name, []).extend(values)
        lost = sum(o["lost"] + o["abandoned"] for o in outs)
        errors: dict[str, int] = {}
        for o in outs:
            for k, v in o["errors"].items():
                errors[k] = errors.get(k, 0) + v
            for k, detail in o.get("details", {}).items():
                note(f"fleet step {size:,}: first {k}: {detail}")
        hb = lat["Heartbeat"]
        fenced = lat["ReportProgress"] + lat["CompleteJob"]
        served = sum(len(v) for v in lat.values()) / s.fleet_window
        ok = bool(hb) and pct(hb, 0.99) < HB_P99_MS and lost == 0
        add(
            Line(
                f"{STEP_PREFIX[key]}{size}",
                f"fleet step: {size:,} simulated workers, {n_proc} load process(es), {label}",
                f"Heartbeat p50 {p50(hb):.0f} / p99 {pct(hb, 0.99):.0f} ms",
                f"p99 ClaimJob {pct(lat['ClaimJob'], 0.99):.0f} ms, ReportProgress/CompleteJob"
                f" {pct(fenced, 0.99):.0f} ms; {served:,.0f} RPC/s served; {lost} leases lost"
                + (f"; failed attempts {errors}" if errors else ""),
                "HB p99 < 100 ms, none lost",
                ok,
            )
        )
        if not ok:
            break
        best = size
    top = steps[-1]
    figure = f"{best:,} workers" + (" (largest step tried)" if best == top else "")
    if best == 0:
        figure = f"< {steps[0]:,} workers (the first step tried failed)"
    add(
        Line(
            key,
            f"fleet capacity, {label}: Heartbeat p99 < 100 ms, no lease lost",
            figure,
            f"one service instance; {scale}",
            "≥ 5,000 workers",
            best >= 5000,
        )
    )
    return best
