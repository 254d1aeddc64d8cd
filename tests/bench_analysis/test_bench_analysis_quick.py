"""`make bench-analysis --quick` inside `make test`: the bench runs end to end, every tool.

No speed thresholds (speed is `make bench-analysis`'s business and this machine is shared); the
accuracy of our pass on the quick clip is asserted, because the clip's truth is known.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_analysis.__main__ import ADAPTIVE, CONTENT, DECODE, DEEP, DEEP_EXACT, FFMPEG

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_bench_measures_every_tool(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench_analysis", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT MEASURED" not in proc.stdout  # the peers come with [dev]
    lines = json.loads((tmp_path / "results-quick.json").read_text())["lines"]
    tools = {line["tool"]: line for line in lines}
    for name in (DECODE, DEEP, DEEP_EXACT, CONTENT, ADAPTIVE, FFMPEG):
        assert tools[name]["measured"] and tools[name]["fps"] > 0, name
    assert tools[DEEP]["f1"] == 1.0
    assert tools[DEEP]["dissolves"] == "1/1"
    assert tools["quick pass"]["wall_s"] > 0
    table = (tmp_path / "results-quick.md").read_text()
    assert table in proc.stdout + "\n"
