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
* `PacedAnalyzer` (the chaos suite's) takes a set time per pass and records each pass's start
  and end, with job, worker, pid and clocks, so overlapping analyses can be measured.

Configured through the environment because `load_analyzer` calls the class with no arguments.
"""

from __future__ import annotations

import contextlib
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


# -- chaos: a paced analyzer that records every pass ------------------------------------------

RECORD_FILE_ENV = "TEST_ANALYZER_RECORD_FILE"
QUICK_SECONDS_ENV = "TEST_ANALYZER_QUICK_SECONDS"
DEEP_SECONDS_ENV = "TEST_ANALYZER_DEEP_SECONDS"
WORKER_ID_ENV = "ANALYSIS_WORKER_WORKER_ID"


class PacedAnalyzer(SyntheticAnalyzer):
    """SyntheticAnalyzer whose passes take a set time, recording each pass's start and end.

    The chaos suite needs analyses that outlast leases and faults, on a 2-core machine that
    cannot afford to decode video for minutes: the pace is the thing under test, so it is set
    (`TEST_ANALYZER_QUICK_SECONDS`, `TEST_ANALYZER_DEEP_SECONDS`) rather than burned. The deep
    pass reports progress and polls `should_stop` as a real one does, and raises
    AnalysisAborted when told to stop.

    Every pass appends two JSON lines to `TEST_ANALYZER_RECORD_FILE` (one small O_APPEND write
    each, atomic across processes): {"event": "start"|"stop", "pass", "job", "worker", "pid",
    "mono", "wall"} plus "outcome" (done / aborted) on stops. CLOCK_MONOTONIC is system-wide,
    so intervals from different worker processes can be compared for overlap. A SIGKILLed
    worker leaves a start without a stop; the test knows when it killed it.
    """

    def __init__(self) -> None:
        self.record_file = Path(os.environ[RECORD_FILE_ENV])
        self.quick_seconds = float(os.environ.get(QUICK_SECONDS_ENV, "0.2"))
        self.deep_seconds = float(os.environ.get(DEEP_SECONDS_ENV, "2"))
        self.worker = os.environ.get(WORKER_ID_ENV, "")

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        job = job_id_of(path)
        self._record("start", "quick", job)
        self._pace(self.quick_seconds, lambda: False)
        result = super().quick(path, out_dir)
        self._record("stop", "quick", job, outcome="done")
        return result

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        job = job_id_of(path)
        self._record("start", "deep", job)
        if not self._pace(self.deep_seconds, should_stop, progress):
            self._record("stop", "deep", job, outcome="aborted")
            raise AnalysisAborted("stopped")
        result = super().deep(path, out_dir, progress, lambda: False)
        self._record("stop", "deep", job, outcome="done")
        return result

    @staticmethod
    def _pace(seconds: float, should_stop: StopFn, progress: ProgressFn | None = None) -> bool:
        """Runs for `seconds`; False as soon as `should_stop()` says so."""
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            if should_stop():
                return False
            if progress is not None:
                progress(min(elapsed / seconds, 1.0))
            time.sleep(min(POLL_SECONDS * 2.5, seconds - elapsed))  # the pass's pace
        return True

    def _record(self, event: str, kind: str, job: str, **extra: str) -> None:
        line = {
            "event": event,
            "pass": kind,
            "job": job,
            "worker": self.worker,
            "pid": os.getpid(),
            "mono": time.monotonic(),
            "wall": time.time(),
            **extra,
        }
        fd = os.open(self.record_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)


def job_id_of(path: Path) -> str:
    """The job id from the worker's per-job temp dir, `job-<job id>-<random>/input.ext`."""
    name = path.parent.name
    return name.removeprefix("job-").rpartition("-")[0] or name


def analysis_records(record_file: Path) -> list[dict[str, object]]:
    """Every record PacedAnalyzer wrote so far, in order; a line still being written is skipped."""
    if not record_file.exists():
        return []
    records = []
    for line in record_file.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records
