"""Video analysis, independent of how jobs arrive or where files are stored.

The worker imports only this package's public API: it loads an ``Analyzer`` with
``load_analyzer`` (default: the PyAV implementation), runs ``quick`` then ``deep`` on a local
file, and records the ``to_dict()`` of each result or the ``AnalysisError`` raised.
"""

from analysis_worker.analysis.base import (
    DEFAULT_ANALYZER_SPEC,
    Analyzer,
    ProgressFn,
    StopFn,
    load_analyzer,
)
from analysis_worker.analysis.errors import (
    AnalysisAborted,
    AnalysisError,
    InvalidMediaError,
    MediaIOError,
)
from analysis_worker.analysis.pyav_analyzer import PyAVAnalyzer
from analysis_worker.analysis.results import (
    ActivitySegment,
    DeepResult,
    MediaProbe,
    QuickResult,
    SceneCut,
    SignalStats,
    Transition,
)
from analysis_worker.analysis.signals import ActivityParams, CutParams, TransitionParams

__all__ = [
    "DEFAULT_ANALYZER_SPEC",
    "ActivityParams",
    "ActivitySegment",
    "AnalysisAborted",
    "AnalysisError",
    "Analyzer",
    "CutParams",
    "DeepResult",
    "InvalidMediaError",
    "MediaIOError",
    "MediaProbe",
    "ProgressFn",
    "PyAVAnalyzer",
    "QuickResult",
    "SceneCut",
    "SignalStats",
    "StopFn",
    "Transition",
    "TransitionParams",
    "load_analyzer",
]
