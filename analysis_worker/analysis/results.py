"""Result types returned by analyzers.

They are frozen so a result can be handed between threads (the analysis runs off the event
loop) without anyone mutating it, and each has ``to_dict()`` producing plain JSON types
(str/int/float/bool/None/list/dict, no NaN) so the worker can store or send it without
knowing the plug-in that produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JsonDict = dict[str, Any]


def json_float(value: float, digits: int = 6) -> float:
    """Round for stable, readable JSON; refuse NaN/inf, which JSON cannot carry."""
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"non-finite value {value!r} cannot be stored as JSON")
    return round(f, digits)


def _opt_float(value: float | None) -> float | None:
    return None if value is None else json_float(value)


@dataclass(frozen=True, slots=True)
class MediaProbe:
    """Container and video-stream metadata, as stored (not rotated for display).

    ``rotation`` is the clockwise turn in degrees (0, 90, 180 or 270) a player applies to show
    the picture upright -- the convention of the legacy ``rotate`` tag phones write.
    ``frame_count`` is an estimate: exact when the container indexes frames (mp4), otherwise
    derived from duration x fps. Unknown values are ``None`` rather than a made-up zero.
    """

    container_format: str
    duration_s: float | None
    width: int
    height: int
    fps: float | None
    codec: str
    bit_rate: int | None
    rotation: int
    frame_count: int | None
    has_audio: bool

    def to_dict(self) -> JsonDict:
        return {
            "container_format": self.container_format,
            "duration_s": _opt_float(self.duration_s),
            "width": self.width,
            "height": self.height,
            "fps": _opt_float(self.fps),
            "codec": self.codec,
            "bit_rate": self.bit_rate,
            "rotation": self.rotation,
            "frame_count": self.frame_count,
            "has_audio": self.has_audio,
        }


@dataclass(frozen=True, slots=True)
class QuickResult:
    """Outcome of the quick pass: metadata plus a few thumbnails written into ``out_dir``."""

    probe: MediaProbe
    thumbnails: tuple[Path, ...]

    def to_dict(self) -> JsonDict:
        return {
            "probe": self.probe.to_dict(),
            "thumbnails": [str(p) for p in self.thumbnails],
        }


@dataclass(frozen=True, slots=True)
class SignalStats:
    """Summary of one per-frame signal (values on the 0..255 luma scale)."""

    mean: float
    std: float
    min: float
    max: float
    p95: float

    def to_dict(self) -> JsonDict:
        return {
            "mean": json_float(self.mean),
            "std": json_float(self.std),
            "min": json_float(self.min),
            "max": json_float(self.max),
            "p95": json_float(self.p95),
        }


@dataclass(frozen=True, slots=True)
class SceneCut:
    """A hard cut: ``frame``/``time_s`` is the first frame of the new shot.

    ``diff`` is the change to the previous frame (``change[1]`` in ``frame_signal``, 0..255
    scale); ``score`` is how many times it exceeds the busier neighbouring shot's baseline
    (2.0 is the detection threshold).
    """

    frame: int
    time_s: float
    diff: float
    score: float

    def to_dict(self) -> JsonDict:
        return {
            "frame": self.frame,
            "time_s": json_float(self.time_s),
            "diff": json_float(self.diff),
            "score": json_float(self.score),
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """A gradual change of shot: ``kind`` is "dissolve", "fade_in" (from black) or "fade_out"
    (to black). It runs from ``start_frame`` (the last frame of the old shot alone) to
    ``end_frame`` (the first of the new shot alone); ``score`` is how clearly the window looks
    like a blend (1.75 is the detection threshold)."""

    kind: str
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    score: float
    change: float  # between its first and last frame, on the ``change`` scale

    def to_dict(self) -> JsonDict:
        return {
            "kind": self.kind,
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "start_s": json_float(self.start_s),
            "end_s": json_float(self.end_s),
            "score": json_float(self.score),
            "change": json_float(self.change),
        }


@dataclass(frozen=True, slots=True)
class ActivitySegment:
    """A span with sustained frame-to-frame change (``mean_motion`` on the 0..255 scale)."""

    start_s: float
    end_s: float
    mean_motion: float

    def to_dict(self) -> JsonDict:
        return {
            "start_s": json_float(self.start_s),
            "end_s": json_float(self.end_s),
            "mean_motion": json_float(self.mean_motion),
        }


@dataclass(frozen=True, slots=True)
class DeepResult:
    """Outcome of the deep pass. The full per-frame signal is in the JSON at ``signal_path``;
    this object only carries what fits in a job record."""

    frames_decoded: int
    duration_s: float
    decode_errors: int
    brightness: SignalStats
    motion: SignalStats
    cuts: tuple[SceneCut, ...]
    activity: tuple[ActivitySegment, ...]
    signal_path: Path
    transitions: tuple[Transition, ...] = ()
    flashes: int = 0  # short flashes seen and not reported as cuts

    def to_dict(self) -> JsonDict:
        return {
            "frames_decoded": self.frames_decoded,
            "duration_s": json_float(self.duration_s),
            "decode_errors": self.decode_errors,
            "brightness": self.brightness.to_dict(),
            "motion": self.motion.to_dict(),
            "cuts": [c.to_dict() for c in self.cuts],
            "activity": [a.to_dict() for a in self.activity],
            "signal_path": str(self.signal_path),
            "transitions": [t.to_dict() for t in self.transitions],
            "flashes": self.flashes,
        }
