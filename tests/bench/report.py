"""The bench's table: every line beside its same-run baselines and the issue's target."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence


@dataclasses.dataclass
class Line:
    key: str  # stable id: the quick test checks that every key is printed
    what: str
    figure: str
    beside: str = ""
    target: str = ""
    met: bool | None = None  # None: no target on this line

    @property
    def verdict(self) -> str:
        if self.met is None:
            return ""
        return "met" if self.met else "NOT MET"


def pct(samples: Sequence[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p50(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b else "n/a"


def note(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def render(lines: Sequence[Line], header: Sequence[str]) -> str:
    cols = ("what", "figure", "beside it (same run)", "target", "")
    rows = [(x.what, x.figure, x.beside, x.target, x.verdict) for x in lines]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def fmt(r: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(widths[i]) for i, v in enumerate(r)) + " |"

    out = [*header, "", fmt(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(r) for r in rows]
    by_key = {x.key: x for x in lines}
    out += ["", "Targets (issues 11 and 18, each a ratio within this run):"]
    for key, sentence in TARGETS.items():
        x = by_key.get(key)
        if x is None:
            continue
        verdict = x.verdict or "n/a"
        out.append(f"- {verdict}: {sentence} -- {x.figure}; {x.beside}")
    return "\n".join(out)


#: The issue's Targets section, line by line, with the key of the line that measures each.
TARGETS = {
    "cycle_10": "worker cycle, max_jobs=10, at least 30% of the raw SQL floor (5x today)",
    "cycle_onecall_10": "the same with the one-call quick->deep report",
    "cycle_batched_10": "the same with the batch calls (BatchReportProgress, BatchCompleteJobs)",
    "claim_one": "ClaimJob max_jobs=1 at least 50% of the raw claim-one rate",
    "wake": "wake-up p50 at most 3 ms, and at most 2x PgQueuer's commit-to-start",
    "parked_large": "1,000 parked calls: at most 2 database queries/s per instance",
    "fleet": "fleet capacity at least 5,000 simulated workers per instance",
    "fleet_processes": "the same with the other JOB_SERVICE_PROCESSES count",
    "history_large": "claim latency at 1M finished rows at most 1.2x its latency at 10k",
    "cycle_fair_fifo": "the worker cycle with fairness on within 10% of the cycle without it",
}


#: Capacity line key -> the key prefix of its per-step lines (printed just before it).
STEP_PREFIX = {"fleet": "fleet_step_", "fleet_processes": "fleet_processes_step_"}

#: Every line the full bench prints (and the quick one too), in order.
KEYS = (
    "echo",
    "floor",
    "floor_batched",
    "pgq_1",
    "pgq_n",
    "cycle_10",
    "cycle_1",
    "cycle_onecall_10",
    "cycle_onecall_1",
    "cycle_batched_10",
    "cycle_10_processes",
    "cycle_fair_fifo",
    "raw_claim_one",
    "claim_one",
    "raw_renew",
    "heartbeat",
    "pgq_wake",
    "raw_wake",
    "wake",
    "parked_small",
    "parked_large",
    "history_small",
    "history_large",
    "fair_claim_cost",
    "fairness",
    "fleet",
    "fleet_processes",
    "head_object",
    "complete_upload",
)
