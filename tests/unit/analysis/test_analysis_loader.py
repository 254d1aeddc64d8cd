"""load_analyzer: the default plug-in, a custom one, and clear errors for bad specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis_worker.analysis import (
    DEFAULT_ANALYZER_SPEC,
    ActivitySegment,
    Analyzer,
    DeepResult,
    MediaProbe,
    ProgressFn,
    PyAVAnalyzer,
    QuickResult,
    SignalStats,
    StopFn,
    load_analyzer,
)

_PROBE = MediaProbe("fake", 1.0, 2, 2, 1.0, "fake", None, 0, 1, False)
_STATS = SignalStats(0.0, 0.0, 0.0, 0.0, 0.0)


class TinyAnalyzer:
    """A plug-in that does no decoding: proves the worker can run any conforming class."""

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        return QuickResult(probe=_PROBE, thumbnails=())

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        progress(1.0)
        segment = ActivitySegment(0.0, 1.0, 2.0)
        return DeepResult(1, 1.0, 0, _STATS, _STATS, (), (segment,), out_dir / "none.json")


class NotAnAnalyzer:
    def quick(self, path: Path, out_dir: Path) -> None: ...


class NeedsArguments(TinyAnalyzer):
    def __init__(self, setting: str) -> None:
        self.setting = setting


NOT_CALLABLE = 42


def test_default_spec_loads_the_pyav_analyzer() -> None:
    assert DEFAULT_ANALYZER_SPEC == "analysis_worker.analysis.pyav_analyzer:PyAVAnalyzer"
    for analyzer in (load_analyzer(), load_analyzer(DEFAULT_ANALYZER_SPEC)):
        assert isinstance(analyzer, PyAVAnalyzer)
        assert isinstance(analyzer, Analyzer)


def test_custom_analyzer_class_is_loaded_and_usable(tmp_path: Path) -> None:
    analyzer = load_analyzer(f"{__name__}:TinyAnalyzer")

    assert isinstance(analyzer, TinyAnalyzer)
    assert analyzer.quick(tmp_path / "x.mp4", tmp_path).probe.codec == "fake"
    seen: list[float] = []
    result = analyzer.deep(tmp_path / "x.mp4", tmp_path, seen.append, lambda: False)
    assert seen == [1.0] and result.activity[0].mean_motion == 2.0


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("no_colon_here", "expected 'package.module:ClassName'"),
        ("", "expected"),
        (":TinyAnalyzer", "expected"),
        ("analysis_worker.analysis.base:", "expected"),
        ("a:b:c", "expected"),
        ("no_such_module_for_tests:Thing", "cannot import module"),
        ("analysis_worker.analysis.base:NoSuchClass", "has no attribute 'NoSuchClass'"),
        (f"{__name__}:NOT_CALLABLE", "is not a class"),
        (f"{__name__}:NeedsArguments", "without arguments"),
        (f"{__name__}:NotAnAnalyzer", "does not implement Analyzer"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_spec(spec: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        load_analyzer(spec)

    assert repr(spec) in str(info.value)
    assert hint in str(info.value)
