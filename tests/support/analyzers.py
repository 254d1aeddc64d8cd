"""Analyzer plug-ins for tests, loaded by spec string exactly as a deployment loads its own
(`ANALYSIS_WORKER_ANALYZER=tests.support.analyzers:GatedAnalyzer`), which also proves the plug-in
mechanism works for code outside the worker package.

* `GatedAnalyzer` wraps a real analyzer (PyAV by default); its deep pass blocks until a gate file
  appears, so a test can act (kill, SIGTERM, cancel) while a job is deterministically in
  DEEP_RUNNING. Every quick/deep call is appended to a log file, so a test can prove the quick
  pass was not redone on resume — even across worker processes.
* `BusyGatedAnalyzer` spins the CPU in Python while gated: a stand-in for a CPU-bound pass.
* `SyntheticAnalyzer` returns made-up results without decoding (fast, no media needed).
* `AlwaysRetryableFailure` fails every pass with a retryable FLAKY_ANALYSIS.

Configured through the environment because `load_analyzer` calls the class with no arguments.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from analysis_worker.analysis import (
    AnalysisAborted,
    AnalysisError,
    Analyzer,
    DeepResult,
    MediaProbe,
    ProgressFn,
    QuickResult,
    SignalStats,
    StopFn,
)

GATE_DIR_ENV = "TEST_ANALYZER_GATE_DIR"
MAX_GATE_SECONDS_ENV = "TEST_ANALYZER_MAX_GATE_SECONDS"
GATE_FILE = "open"
CALLS_FILE = "calls.log"
POLL_SECONDS = 0.02


def open_gate(gate_dir: Path) -> None:
    """Lets every gated deep pass (current and future) run."""
    (gate_dir / GATE_FILE).touch()


def recorded_calls(gate_dir: Path) -> list[tuple[str, str]]:
    """(pass, input file name) for every call so far, in order, across processes."""
    path = gate_dir / CALLS_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(kind, name) for kind, _, name in (line.partition(" ") for line in lines)]


class GatedAnalyzer:
    """Delegates to `inner`, recording each call; the deep pass waits for the gate file.

    While gated it polls `should_stop` and raises AnalysisAborted as a real analyzer does. A gate
    that stays shut longer than `max_gate_seconds` fails the pass (GATE_TIMEOUT), so a test whose
    worker misbehaves fails instead of hanging.
    """

    busy = False

    def __init__(
        self,
        inner: Analyzer | None = None,
        gate_dir: Path | None = None,
        max_gate_seconds: float | None = None,
    ) -> None:
        if gate_dir is None:
            configured = os.environ.get(GATE_DIR_ENV)
            if not configured:
                raise ValueError(f"{GATE_DIR_ENV} must name a directory")
            gate_dir = Path(configured)
        gate_dir.mkdir(parents=True, exist_ok=True)
        self.gate_dir = gate_dir
        if max_gate_seconds is None:
            max_gate_seconds = float(os.environ.get(MAX_GATE_SECONDS_ENV, "120"))
        self.max_gate_seconds = max_gate_seconds
        if inner is None:
            from analysis_worker.analysis import PyAVAnalyzer

            inner = PyAVAnalyzer()
        self.inner = inner

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        self._record("quick", path)
        return self.inner.quick(path, out_dir)

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        self._record("deep", path)
        self._wait_for_gate(should_stop)
        return self.inner.deep(path, out_dir, progress, should_stop)

    def _wait_for_gate(self, should_stop: StopFn) -> None:
        gate = self.gate_dir / GATE_FILE
        give_up = time.monotonic() + self.max_gate_seconds
        while not gate.exists():
            if time.monotonic() > give_up:
                self._record("gate-timeout", Path("-"))
                raise AnalysisError("the test never opened the gate", code="GATE_TIMEOUT")
            if should_stop():
                self._record("aborted", Path("-"))
                raise AnalysisAborted("stopped while gated")
            if self.busy:
                _burn_cpu(POLL_SECONDS)
            else:
                time.sleep(POLL_SECONDS)  # waiting for the test to open the gate

    def _record(self, kind: str, path: Path) -> None:
        # One small O_APPEND write per line: atomic, so concurrent workers never interleave.
        fd = os.open(self.gate_dir / CALLS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{kind} {path.parent.name}/{path.name}\n".encode())
        finally:
            os.close(fd)


class BusyGatedAnalyzer(GatedAnalyzer):
    """GatedAnalyzer that keeps a core busy with pure-Python work while gated.

    Pure Python holds the GIL between switch intervals, the worst case for the event loop;
    if heartbeats still flow during this pass, they flow during any analysis.
    """

    busy = True


def _burn_cpu(seconds: float) -> None:
    end = time.perf_counter() + seconds
    acc = 0
    while time.perf_counter() < end:
        for i in range(2_000):
            acc = (acc * 31 + i) % 1_000_003


class SyntheticAnalyzer:
    """Writes small fake artefacts and returns fixed results; decodes nothing."""

    frames = 48

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        thumbs = []
        for index in range(2):
            thumb = out_dir / f"thumb_{index}.jpg"
            thumb.write_bytes(b"\xff\xd8\xff" + bytes([index]) * 32)
            thumbs.append(thumb)
        probe = MediaProbe(
            container_format="mp4",
            duration_s=2.0,
            width=160,
            height=120,
            fps=24.0,
            codec="h264",
            bit_rate=None,
            rotation=0,
            frame_count=self.frames,
            has_audio=False,
        )
        return QuickResult(probe=probe, thumbnails=tuple(thumbs))

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        out_dir.mkdir(parents=True, exist_ok=True)
        for step in range(1, 5):
            if should_stop():
                raise AnalysisAborted("stopped")
            progress(step / 4)
        signal = out_dir / "signal.json"
        signal.write_text(json.dumps({"brightness": [1.0] * self.frames}))
        stats = SignalStats(mean=1.0, std=0.0, min=1.0, max=1.0, p95=1.0)
        return DeepResult(
            frames_decoded=self.frames,
            duration_s=2.0,
            decode_errors=0,
            brightness=stats,
            motion=stats,
            cuts=(),
            activity=(),
            signal_path=signal,
        )


class AlwaysRetryableFailure:
    """Every pass fails with a retryable error, to exercise retries and max attempts."""

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        raise AnalysisError("flaky quick pass", code="FLAKY_ANALYSIS", retryable=True)

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        raise AnalysisError("flaky deep pass", code="FLAKY_ANALYSIS", retryable=True)
