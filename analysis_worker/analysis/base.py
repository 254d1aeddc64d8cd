"""The plug-in interface between the worker and whatever analyses a video.

The worker only knows this module: it loads an analyzer by a "package.module:ClassName" spec
(so a deployment can swap the implementation without touching worker code), calls ``quick``
then ``deep`` on a local file in a thread, and maps the result or ``AnalysisError`` onto the
job. Nothing here may know about gRPC, S3 or jobs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from analysis_worker.analysis.results import DeepResult, QuickResult

__all__ = [
    "DEFAULT_ANALYZER_SPEC",
    "Analyzer",
    "ProgressFn",
    "StopFn",
    "load_analyzer",
]

DEFAULT_ANALYZER_SPEC = "analysis_worker.analysis.pyav_analyzer:PyAVAnalyzer"

ProgressFn = Callable[[float], None]
"""Receives the completed fraction 0..1, non-decreasing, throttled (not once per frame)."""

StopFn = Callable[[], bool]
"""Polled during long work; returning True makes the analyzer raise ``AnalysisAborted``."""


@runtime_checkable
class Analyzer(Protocol):
    """What the worker needs from an analysis plug-in.

    Both methods are synchronous and CPU-bound (the worker runs them in a thread). They write
    any artefacts into ``out_dir`` (created if missing) and return paths inside it. Failures a
    job should record are raised as ``AnalysisError`` subclasses.
    """

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        """Probe metadata and write a few thumbnails; must stay fast on long videos."""
        ...

    def deep(
        self,
        path: Path,
        out_dir: Path,
        progress: ProgressFn,
        should_stop: StopFn,
    ) -> DeepResult:
        """Decode the whole video, reporting ``progress`` and honouring ``should_stop``."""
        ...


def load_analyzer(spec: str = DEFAULT_ANALYZER_SPEC) -> Analyzer:
    """Import ``package.module:ClassName`` and instantiate it with no arguments.

    Every failure becomes a ``ValueError`` naming the spec, because a bad spec is a deployment
    configuration mistake and the operator needs to see which setting to fix.
    """
    module_name, sep, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"invalid analyzer spec {spec!r}: expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"analyzer spec {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    try:
        factory = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(
            f"analyzer spec {spec!r}: module {module_name!r} has no attribute {attr!r}"
        ) from exc
    if not callable(factory):
        raise ValueError(f"analyzer spec {spec!r}: {attr!r} is not a class")
    try:
        instance = factory()
    except TypeError as exc:
        raise ValueError(
            f"analyzer spec {spec!r}: {attr!r} cannot be instantiated without arguments ({exc})"
        ) from exc
    if not isinstance(instance, Analyzer):
        raise ValueError(
            f"analyzer spec {spec!r}: {attr!r} does not implement Analyzer "
            "(needs quick(path, out_dir) and deep(path, out_dir, progress, should_stop))"
        )
    return instance
