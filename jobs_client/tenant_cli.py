"""`jobctl tenants …`: tenants' weights, quotas and figures (docs/tenants.md).

jobctl tenants list                                   backlog, in flight, weight, quota use, dwell
jobctl tenants set TENANT [--weight N] [--max-live-jobs N] [--max-pending-bytes B]
                          [--max-initiates-per-minute N]     0 removes a quota
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobs.v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    from jobs_client.cli import Client, Output


def add_parser(add: Callable[[str, str], argparse.ArgumentParser], parser_class: Any) -> None:
    tenants = add("tenants", "list tenants, or set a tenant's weight and quotas (docs/tenants.md)")
    tenants_sub = tenants.add_subparsers(
        dest="tenants_command", required=True, parser_class=parser_class
    )
    tenants_sub.add_parser("list", help="backlog, in flight, weight, quota use, dwell p50/p99")
    ts = tenants_sub.add_parser("set", help="weight and quotas (0 removes a quota)")
    ts.add_argument("tenant")
    ts.add_argument("--weight", type=int, help="1..1000")
    ts.add_argument("--max-live-jobs", type=int, metavar="N")
    ts.add_argument("--max-pending-bytes", type=int, metavar="BYTES")
    ts.add_argument("--max-initiates-per-minute", type=int, metavar="N")


def _use(used: int, limit: int) -> str:
    return f"{used}/{limit or '-'}"


def _dur(d: Any, present: bool) -> str:
    from jobs_client.cli import human_duration

    return human_duration(d.ToTimedelta().total_seconds()) if present else "-"


def run(c: Client, args: argparse.Namespace, o: Output) -> int:
    from jobs_client.cli import EXIT_OK, as_json

    if args.tenants_command == "set":
        req = pb.SetTenantRequest(tenant=args.tenant)
        for field in ("weight", "max_live_jobs", "max_pending_bytes", "max_initiates_per_minute"):
            value = getattr(args, field)
            if value is not None:
                setattr(req, field, value)
        tenants = [c.jobs.set_tenant(req)]
    else:
        tenants = c.jobs.list_tenants()
    if o.json_mode:
        o.json({"tenants": [as_json(t) for t in tenants]})
        return EXIT_OK
    rows = [
        f"{'TENANT':<32} {'W':>4} {'QUEUED':>8} {'FLIGHT':>7} {'LIVE/MAX':>15} "
        f"{'PENDING_B/MAX':>21} {'INIT/MIN':>9} {'DWELL P50':>10} {'P99':>8}"
    ]
    for t in tenants:
        rows.append(
            f"{t.name or '(none)':<32} {t.weight:>4} {t.queued:>8} {t.in_flight:>7} "
            f"{_use(t.live_jobs, t.max_live_jobs):>15} "
            f"{_use(t.pending_bytes, t.max_pending_bytes):>21} "
            f"{_use(t.initiates_this_minute, t.max_initiates_per_minute):>9} "
            f"{_dur(t.dwell_p50, t.HasField('dwell_p50')):>10} "
            f"{_dur(t.dwell_p99, t.HasField('dwell_p99')):>8}"
        )
    o.result("\n".join(rows))
    return EXIT_OK
