"""`make bench --quick` inside `make test`: the bench runs end to end and prints every line.

No timing thresholds here -- speed is measured by `make bench`, never by a timed test. This only
proves the bench cannot rot: every measurement still runs against the real service, Postgres,
PgQueuer and moto, and lands in the table with a figure (or an explicit n/a).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.report import KEYS, STEP_PREFIX

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"\d")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_bench_prints_every_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = json.loads((tmp_path / "results-quick.json").read_text())
    keys = [line["key"] for line in lines]
    steps = tuple(STEP_PREFIX.values())
    assert [k for k in keys if not k.startswith(steps)] == list(KEYS)
    for prefix in steps:  # both fleet sweeps ran at least one step
        assert any(k.startswith(prefix) for k in keys), prefix
    table = (tmp_path / "results-quick.md").read_text()
    assert table in proc.stdout + "\n"
    for line in lines:
        # A figure, or an explicit n/a with the reason beside it (the one-call report on a
        # service that does not support it yet).
        assert NUMBER.search(line["figure"]) or (line["figure"] == "n/a" and line["beside"]), line
        assert f"| {line['what']}" in table
        if line["target"]:
            assert line["met"] in (True, False) or line["figure"] == "n/a", line
    # The tenant lines put the fair claim beside FIFO, measured in this run.
    by_key = {line["key"]: line for line in lines}
    assert "of FIFO" in by_key["cycle_fair_fifo"]["figure"]
    assert "FIFO" in by_key["fair_claim_cost"]["beside"]
    for tenant in "ABC":
        assert f"{tenant} p50" in by_key["fairness"]["figure"]
        assert f"{tenant} p50" in by_key["fairness"]["beside"]
    assert by_key["fairness"]["beside"].startswith("FIFO claim, same run")
