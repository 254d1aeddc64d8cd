"""Opening a file with PyAV and reading what it claims about itself.

Centralises the translation of FFmpeg's errors into ``AnalysisError`` so both passes tell the
user the same thing, and keeps the defensive metadata reads (every container omits something)
in one place. PyAV ships no stubs the project type-checks against, so its objects are ``Any``.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from analysis_worker.analysis.errors import InvalidMediaError, MediaIOError
from analysis_worker.analysis.results import MediaProbe

_FIX_HINT = "the upload may be corrupt, truncated or not a video"


@contextmanager
def open_video(path: Path) -> Iterator[tuple[Any, Any]]:
    """Yield ``(container, video_stream)`` for ``path``, closing the container afterwards.

    Raises ``InvalidMediaError`` when FFmpeg cannot parse the file or it has no real video
    stream, and ``MediaIOError`` when the local file itself cannot be read.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MediaIOError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise InvalidMediaError(f"{path.name!r} is empty (0 bytes); {_FIX_HINT}")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as exc:
        raise translate_error(exc, path, "open") from exc
    try:
        yield container, _pick_video_stream(container, path)
    finally:
        container.close()


def translate_error(exc: Exception, path: Path, doing: str) -> Exception:
    """Map an FFmpeg error to our taxonomy: OS-level failures may pass on retry, the rest won't."""
    reason = getattr(exc, "strerror", None) or str(exc)
    if isinstance(exc, OSError):
        return MediaIOError(f"cannot {doing} {path}: {reason}")
    return InvalidMediaError(
        f"FFmpeg cannot {doing} {path.name!r} as a video ({reason}); {_FIX_HINT}"
    )


def _pick_video_stream(container: Any, path: Path) -> Any:
    """First video stream that is real footage, not cover art embedded in an audio file."""
    attached_pic = int(av.stream.Disposition.attached_pic)
    for stream in container.streams.video:
        if not int(stream.disposition) & attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    raise InvalidMediaError(
        f"{path.name!r} has no video stream (streams found: {', '.join(kinds)}); "
        "upload a video file, not audio or a still image"
    )


@dataclass(slots=True)
class DecodeStats:
    """Counts damaged packets skipped while decoding, reported on the deep result."""

    errors: int = 0


def iter_frames(container: Any, stream: Any, stats: DecodeStats) -> Generator[Any, None, None]:
    """Decode ``stream`` in presentation order, skipping packets the decoder rejects.

    A single damaged packet should not throw away an otherwise watchable video, so decode
    errors are counted instead of raised; a demux error ends reading (the rest of the file is
    unreachable) after draining the frames the decoder still holds. OS-level read errors are
    raised: they say nothing about the media, and a retry may well succeed.
    """
    demuxer = container.demux(stream)
    while True:
        try:
            packet = next(demuxer)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            if isinstance(exc, OSError):
                raise  # the local file became unreadable: not the media's fault, retry
            stats.errors += 1
            break
        try:
            frames = packet.decode()
        except av.FFmpegError:
            stats.errors += 1
            continue
        yield from frames
    try:
        yield from stream.decode(None)
    except av.FFmpegError:
        stats.errors += 1


def seconds(value: Any, time_base: Any) -> float | None:
    """``value * time_base`` in seconds, or None when either is missing."""
    if value is None or time_base is None:
        return None
    return float(Fraction(value) * Fraction(time_base))


def stream_duration(container: Any, stream: Any) -> float | None:
    """Stream duration, else the container's (in AV_TIME_BASE units), else unknown."""
    duration = seconds(stream.duration, stream.time_base)
    if duration is None and container.duration:
        duration = float(container.duration) / av.time_base
    return duration if duration and duration > 0 else None


def stream_fps(stream: Any) -> float | None:
    """Average frame rate, falling back to FFmpeg's guess; None when nothing is known."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            fps = float(rate)
            if fps > 0:
                return fps
    return None


def display_rotation(stream: Any, frame: Any | None) -> int:
    """Clockwise degrees (0/90/180/270) to turn the picture upright.

    FFmpeg exposes the display matrix on decoded frames as a counter-clockwise angle; older
    demuxers only leave the legacy clockwise ``rotate`` tag. Either may be missing or odd, so
    any failure means "not rotated" rather than an error.
    """
    ccw: Any = None
    if frame is not None:
        try:
            ccw = frame.rotation
        except (AttributeError, ValueError, TypeError):
            ccw = None
    if ccw:
        return _quarter_turns(-float(ccw))
    tag = (stream.metadata or {}).get("rotate")
    try:
        return _quarter_turns(float(tag)) if tag else 0
    except ValueError:
        return 0


def _quarter_turns(degrees: float) -> int:
    return (round(degrees / 90.0) * 90) % 360


def probe(container: Any, stream: Any, first_frame: Any | None) -> MediaProbe:
    """Collect ``MediaProbe`` from an open container; ``first_frame`` supplies the rotation."""
    ctx = stream.codec_context
    duration = stream_duration(container, stream)
    fps = stream_fps(stream)
    frame_count: int | None = int(stream.frames) if stream.frames else None
    if frame_count is None and duration and fps:
        frame_count = round(duration * fps)
    bit_rate = container.bit_rate or ctx.bit_rate or None
    return MediaProbe(
        container_format=str(container.format.name),
        duration_s=duration,
        width=int(ctx.width or (first_frame.width if first_frame is not None else 0)),
        height=int(ctx.height or (first_frame.height if first_frame is not None else 0)),
        fps=fps,
        codec=str(ctx.name),
        bit_rate=int(bit_rate) if bit_rate else None,
        rotation=display_rotation(stream, first_frame),
        frame_count=frame_count,
        has_audio=len(container.streams.audio) > 0,
    )
