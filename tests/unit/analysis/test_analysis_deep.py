"""Deep pass: cuts, activity, progress, abort and the per-frame signal file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from analysis_worker.analysis import AnalysisAborted, DeepResult, PyAVAnalyzer
from localinfra.media import VideoInfo, make_damaged_copy


def _run(analyzer: PyAVAnalyzer, video: VideoInfo, out: Path) -> DeepResult:
    return analyzer.deep(video.path, out, lambda _f: None, lambda: False)


def test_finds_the_generated_cuts(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path
) -> None:
    result = _run(analyzer, cuts_video, tmp_path)

    assert cuts_video.cut_frames == [18, 30, 48, 60]
    assert len(result.cuts) == len(cuts_video.cut_frames)
    for cut, frame, t in zip(result.cuts, cuts_video.cut_frames, cuts_video.cut_times, strict=True):
        assert abs(cut.frame - frame) <= 1
        assert cut.time_s == pytest.approx(t, abs=1.01 / cuts_video.fps)
        assert cut.score > 6 and cut.diff >= 10
    assert result.frames_decoded == cuts_video.frame_count
    assert result.duration_s == pytest.approx(cuts_video.duration_s, abs=1e-6)


def test_static_video_has_no_cuts_and_no_activity(
    analyzer: PyAVAnalyzer, static_video: VideoInfo, tmp_path: Path
) -> None:
    result = _run(analyzer, static_video, tmp_path)

    assert result.frames_decoded == static_video.frame_count
    assert result.cuts == ()
    assert result.activity == ()
    assert result.motion.max < 0.5


def test_activity_segments_follow_the_moving_square(
    analyzer: PyAVAnalyzer, activity_video: VideoInfo, tmp_path: Path
) -> None:
    result = _run(analyzer, activity_video, tmp_path)
    frame = 1 / activity_video.fps

    assert result.cuts == ()  # the square starting/stopping is not a change of shot
    assert activity_video.moving_spans == [(1.0, 2.0), (3.0, 3.5)]
    assert len(result.activity) == 2
    for seg, (start, end) in zip(result.activity, activity_video.moving_spans, strict=True):
        assert seg.start_s == pytest.approx(start, abs=2 * frame)
        assert seg.end_s == pytest.approx(end, abs=2 * frame)
        assert seg.mean_motion > 1.0


def test_progress_is_throttled_monotonic_and_ends_at_one(
    analyzer: PyAVAnalyzer, activity_video: VideoInfo, tmp_path: Path
) -> None:
    seen: list[float] = []
    analyzer.deep(activity_video.path, tmp_path, seen.append, lambda: False)

    assert seen[-1] == 1.0
    assert all(0.0 < v < 1.0 for v in seen[:-1])
    assert all(b > a for a, b in itertools.pairwise(seen))
    assert len(seen) >= 10  # reported while decoding, not only at the end
    assert len(seen) <= 101 + 1  # at most one call per percent


def test_should_stop_before_start_aborts(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path
) -> None:
    with pytest.raises(AnalysisAborted) as info:
        analyzer.deep(cuts_video.path, tmp_path, lambda _f: None, lambda: True)

    assert info.value.code == "ABORTED" and info.value.retryable is True
    assert not (tmp_path / "signal.json").exists()


def test_should_stop_mid_decode_aborts_without_output(
    analyzer: PyAVAnalyzer, activity_video: VideoInfo, tmp_path: Path
) -> None:
    seen: list[float] = []
    polls = 0

    def stop_halfway() -> bool:
        nonlocal polls
        polls += 1
        return bool(seen) and seen[-1] >= 0.5

    with pytest.raises(AnalysisAborted):
        analyzer.deep(activity_video.path, tmp_path, seen.append, stop_halfway)

    assert polls > 2 and 0.5 <= max(seen) < 0.7
    assert list(tmp_path.iterdir()) == []


def test_signal_json_holds_the_full_per_frame_signal(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path
) -> None:
    result = _run(analyzer, cuts_video, tmp_path)
    doc = json.loads(result.signal_path.read_text())

    assert result.signal_path.parent == tmp_path
    n = cuts_video.frame_count
    assert doc["frames"] == n
    assert len(doc["time_s"]) == len(doc["brightness"]) == len(doc["motion"]) == n
    assert doc["time_s"][1] - doc["time_s"][0] == pytest.approx(1 / cuts_video.fps, abs=1e-6)
    assert doc["motion"][0] == 0.0
    assert doc["brightness"][20] > 200  # the white scene
    assert doc["cuts"] == [c.to_dict() for c in result.cuts]
    assert doc["activity"] == [a.to_dict() for a in result.activity]


def test_deep_result_is_json_safe_and_deterministic(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path
) -> None:
    first = _run(analyzer, cuts_video, tmp_path / "a")
    second = _run(PyAVAnalyzer(), cuts_video, tmp_path / "b")

    doc = json.loads(json.dumps(first.to_dict(), allow_nan=False))
    # Backward compatible: every field the first schema had, plus the added ones.
    assert set(doc) == {
        "frames_decoded", "duration_s", "decode_errors", "brightness", "motion",
        "cuts", "activity", "signal_path", "transitions", "flashes",
    }  # fmt: skip
    assert set(doc["cuts"][0]) == {"frame", "time_s", "diff", "score"}
    assert set(doc["motion"]) == {"mean", "std", "min", "max", "p95"}
    doc_b = second.to_dict()
    assert doc.pop("signal_path") != doc_b.pop("signal_path")
    assert doc == doc_b
    assert first.signal_path.read_bytes() == second.signal_path.read_bytes()


def test_damaged_tail_is_skipped_and_counted(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path
) -> None:
    damaged = make_damaged_copy(cuts_video.path, tmp_path / "damaged.mp4", from_fraction=0.6)
    result = analyzer.deep(damaged, tmp_path / "out", lambda _f: None, lambda: False)

    assert 0 < result.frames_decoded < cuts_video.frame_count
    assert result.decode_errors > 0
    assert result.cuts and result.cuts[0].frame == cuts_video.cut_frames[0]


def test_each_pass_hands_freed_memory_back(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc keeps freed frame buffers in per-thread arenas; each pass trims them (the soak in
    scripts/soak_analysis.py measures the effect), also when the pass fails."""
    from analysis_worker.analysis import memory, pyav_analyzer

    assert memory.release_free_memory() is True  # glibc here: malloc_trim is really called
    calls: list[int] = []
    monkeypatch.setattr(pyav_analyzer, "release_free_memory", lambda: calls.append(1) or True)
    analyzer.quick(cuts_video.path, tmp_path / "q")
    _run(analyzer, cuts_video, tmp_path / "d")
    with pytest.raises(AnalysisAborted):
        analyzer.deep(cuts_video.path, tmp_path / "x", lambda _f: None, lambda: True)
    assert len(calls) == 3
