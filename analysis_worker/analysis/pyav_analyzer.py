"""The default analyzer: PyAV (FFmpeg) for decoding, numpy for the signal maths.

This module only orchestrates; decoding/probing live in ``pyav_io``, thumbnails in
``thumbnails``, the per-frame signal in ``frame_signal`` and the cut/activity rules in
``signals``. Output is deterministic for the same input file (no randomness, no wall clock).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import av

from analysis_worker.analysis.base import ProgressFn, StopFn
from analysis_worker.analysis.errors import AnalysisAborted, InvalidMediaError, MediaIOError
from analysis_worker.analysis.frame_signal import decode_signal, write_signal_json
from analysis_worker.analysis.memory import release_free_memory
from analysis_worker.analysis.progress import ProgressReporter
from analysis_worker.analysis.pyav_io import (
    DecodeStats,
    iter_frames,
    open_video,
    probe,
    translate_error,
)
from analysis_worker.analysis.results import DeepResult, QuickResult
from analysis_worker.analysis.signals import (
    ActivityParams,
    CutParams,
    TransitionParams,
    absorb_cuts,
    detect_cuts,
    detect_transitions,
    find_activity,
    summarize,
)
from analysis_worker.analysis.thumbnails import (
    THUMBNAIL_COUNT,
    grab_frames,
    thumbnail_targets,
    write_thumbnails,
)

SIGNAL_FILE = "signal.json"


class PyAVAnalyzer:
    """Quick pass: probe + thumbnails. Deep pass: full decode into brightness/motion signals,
    scene cuts and activity segments. Constructible without arguments, as plug-ins must be."""

    def __init__(
        self,
        cut_params: CutParams | None = None,
        activity_params: ActivityParams | None = None,
        thumbnail_count: int = THUMBNAIL_COUNT,
        transition_params: TransitionParams | None = None,
        fast_decode: bool = True,
    ) -> None:
        self.cut_params = cut_params or CutParams()
        self.activity_params = activity_params or ActivityParams()
        self.transition_params = transition_params or TransitionParams()
        self.thumbnail_count = thumbnail_count
        #: Skip H.264/HEVC deblocking in the deep pass (invisible at the analysis size).
        self.fast_decode = fast_decode

    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        try:
            return self._quick(path, out_dir)
        finally:
            release_free_memory()

    def _quick(self, path: Path, out_dir: Path) -> QuickResult:
        _prepare(out_dir)
        try:
            with open_video(path) as (container, stream):
                first = _first_frame(container, stream)
                if first is None:
                    raise InvalidMediaError(
                        f"{path.name!r} has a video stream but no decodable frames"
                    )
                info = probe(container, stream, first)
                origin = float(first.time or 0.0)
                sar = float(stream.sample_aspect_ratio or 1)
            targets = thumbnail_targets(info.duration_s, self.thumbnail_count)
            frames = grab_frames(path, origin, targets, info.fps)
            thumbnails = write_thumbnails(frames, out_dir, info.rotation, sar)
        except av.FFmpegError as exc:
            raise translate_error(exc, path, "decode") from exc
        return QuickResult(probe=info, thumbnails=thumbnails)

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        try:
            return self._deep(path, out_dir, progress, should_stop)
        finally:
            release_free_memory()

    def _deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        if should_stop():
            raise AnalysisAborted("deep pass stopped on request before it started")
        _prepare(out_dir)
        reporter = ProgressReporter(progress)
        try:
            signal = decode_signal(path, reporter, should_stop, fast_decode=self.fast_decode)
        except av.FFmpegError as exc:
            raise translate_error(exc, path, "decode") from exc
        if signal.frames == 0:
            raise InvalidMediaError(f"{path.name!r} has a video stream but no decodable frames")
        cuts, flashes = detect_cuts(signal.change, signal.times, self.cut_params)
        transitions = detect_transitions(
            signal.span_net,
            signal.span_mid,
            signal.brightness,
            signal.times,
            [c.frame for c in cuts],
            flashes,
            self.transition_params,
        )
        cuts = absorb_cuts(cuts, transitions)
        activity = find_activity(
            signal.motion,
            signal.times,
            signal.frame_duration,
            [c.frame for c in cuts],
            self.activity_params,
        )
        if should_stop():
            raise AnalysisAborted("deep pass stopped on request before writing results")
        signal_path = write_signal_json(
            out_dir / SIGNAL_FILE,
            signal,
            {
                "cuts": [c.to_dict() for c in cuts],
                "activity": [a.to_dict() for a in activity],
                "transitions": [t.to_dict() for t in transitions],
                "flashes": [list(f) for f in flashes],
                "params": {
                    "cuts": asdict(self.cut_params),
                    "transitions": asdict(self.transition_params),
                    "activity": asdict(self.activity_params),
                },
            },
        )
        result = DeepResult(
            frames_decoded=signal.frames,
            duration_s=signal.duration_s,
            decode_errors=signal.decode_errors,
            brightness=summarize(signal.brightness),
            motion=summarize(signal.motion[1:]),  # motion[0] has no previous frame
            cuts=tuple(cuts),
            activity=tuple(activity),
            signal_path=signal_path,
            transitions=tuple(transitions),
            flashes=len(flashes),
        )
        reporter.finish()
        return result


def _prepare(out_dir: Path) -> None:
    """Create the output directory; failing here is an environment problem, so retryable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MediaIOError(f"cannot create output directory {out_dir}: {exc}") from exc


def _first_frame(container: Any, stream: Any) -> Any | None:
    """Decode just enough to prove the stream is decodable and read frame-level side data."""
    frames = iter_frames(container, stream, DecodeStats())
    try:
        return next(frames, None)
    finally:
        frames.close()
