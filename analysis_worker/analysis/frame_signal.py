"""Decoding a whole video into compact per-frame signals (the expensive part of the deep pass).

Each frame is shrunk to a ~64-pixel-wide grayscale image by swscale before numpy sees it:
that is enough to see shot changes and movement, costs almost nothing next to decoding, and
makes the signal independent of the source resolution (so thresholds mean the same thing for
a phone clip and a 4K master).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis_worker.analysis.base import StopFn
from analysis_worker.analysis.errors import AnalysisAborted, MediaIOError
from analysis_worker.analysis.progress import ProgressReporter
from analysis_worker.analysis.pyav_io import (
    DecodeStats,
    iter_frames,
    open_video,
    stream_duration,
    stream_fps,
)
from analysis_worker.analysis.results import JsonDict
from analysis_worker.analysis.signals import FloatArray

GRAY_WIDTH = 64
STOP_CHECK_EVERY = 8  # frames between should_stop() polls: cheap, yet stops within ~0.3 s


@dataclass(frozen=True, slots=True)
class FrameSignal:
    """Per-frame signals; ``times`` are seconds from the first decoded frame."""

    times: FloatArray
    brightness: FloatArray
    motion: FloatArray
    fps: float | None
    frame_duration: float
    gray_size: tuple[int, int]
    decode_errors: int

    @property
    def frames(self) -> int:
        return int(self.times.size)

    @property
    def duration_s(self) -> float:
        """Time the decoded frames are on screen (last frame included)."""
        return float(self.times[-1] - self.times[0]) + self.frame_duration if self.frames else 0.0


def gray_size(width: int, height: int, target_width: int = GRAY_WIDTH) -> tuple[int, int]:
    """Analysis size keeping the stored aspect ratio; never upscales."""
    if width <= 0 or height <= 0:
        return target_width, max(1, target_width * 9 // 16)
    w = min(target_width, width)
    return w, max(1, round(height * w / width))


def decode_signal(path: Path, reporter: ProgressReporter, should_stop: StopFn) -> FrameSignal:
    """Decode every frame of ``path`` into brightness/motion, reporting progress as it goes.

    Progress is frames decoded over the header's frame count when there is one (exact for
    mp4), else presentation time over duration. Raises ``AnalysisAborted`` once
    ``should_stop()`` returns True.
    """
    with open_video(path) as (container, stream):
        stream.thread_type = "AUTO"  # frame/slice threads: several times faster, same output
        fps = stream_fps(stream)
        duration = stream_duration(container, stream)
        total = int(stream.frames) or (round(duration * fps) if duration and fps else 0)
        size = gray_size(int(stream.codec_context.width), int(stream.codec_context.height))
        stats = DecodeStats()
        times: list[float] = []
        brightness: list[float] = []
        motion: list[float] = []
        previous: np.ndarray[Any, np.dtype[np.int16]] | None = None
        for index, frame in enumerate(iter_frames(container, stream, stats)):
            if index % STOP_CHECK_EVERY == 0 and should_stop():
                raise AnalysisAborted(f"deep pass stopped on request after {index} frames")
            gray = _gray(frame, size)
            times.append(_frame_time(frame, times, fps))
            brightness.append(float(gray.mean()))
            motion.append(0.0 if previous is None else float(np.abs(gray - previous).mean()))
            previous = gray
            if total:
                reporter.update((index + 1) / total)
            elif duration:
                reporter.update((times[-1] - times[0]) / duration)
    t = np.asarray(times, dtype=np.float64)
    t = t - t[0] if t.size else t
    return FrameSignal(
        times=t,
        brightness=np.asarray(brightness, dtype=np.float64),
        motion=np.asarray(motion, dtype=np.float64),
        fps=fps,
        frame_duration=_frame_duration(t, fps),
        gray_size=size,
        decode_errors=stats.errors,
    )


def _gray(frame: Any, size: tuple[int, int]) -> np.ndarray[Any, np.dtype[np.int16]]:
    small = frame.reformat(width=size[0], height=size[1], format="gray", interpolation="AREA")
    return np.asarray(small.to_ndarray(), dtype=np.int16)


def _frame_time(frame: Any, earlier: list[float], fps: float | None) -> float:
    """Presentation time; frames without a timestamp continue from the previous one."""
    if frame.time is not None:
        return float(frame.time)
    step = 1.0 / fps if fps else 1.0
    return earlier[-1] + step if earlier else 0.0


def _frame_duration(times: FloatArray, fps: float | None) -> float:
    if times.size > 1:
        step = float(np.median(np.diff(times)))
        if step > 0:
            return step
    return 1.0 / fps if fps else 0.0


def write_signal_json(dest: Path, signal: FrameSignal, extra: JsonDict) -> Path:
    """Write the full per-frame signal (columnar, rounded) atomically: readers never see half."""
    doc: JsonDict = {
        "version": 1,
        "frames": signal.frames,
        "fps": signal.fps,
        "frame_duration_s": round(signal.frame_duration, 6),
        "gray_size": list(signal.gray_size),
        "decode_errors": signal.decode_errors,
        "time_s": [round(v, 6) for v in signal.times.tolist()],
        "brightness": [round(v, 4) for v in signal.brightness.tolist()],
        "motion": [round(v, 4) for v in signal.motion.tolist()],
        **extra,
    }
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(doc, fh, allow_nan=False, separators=(",", ":"))
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaIOError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    return dest
