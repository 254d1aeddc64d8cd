"""Picking and writing preview thumbnails for the quick pass.

Seeking keeps the quick pass cheap on long videos (only a GOP per thumbnail is decoded). Some
files cannot seek (no index, broken timestamps), so any seek failure falls back to one decode
from the start. JPEGs are encoded by FFmpeg's ``mjpeg`` encoder through PyAV, so Pillow is not
needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from analysis_worker.analysis.errors import InvalidMediaError, MediaIOError
from analysis_worker.analysis.pyav_io import DecodeStats, iter_frames, open_video

THUMBNAIL_COUNT = 3
MAX_THUMBNAIL_WIDTH = 320
BLANK_SCAN_S = 2.0  # how far past a black or white target frame to look for a real picture
BLANK_STD = 4.0  # luma standard deviation below which a frame is uniform


def thumbnail_targets(duration_s: float | None, count: int = THUMBNAIL_COUNT) -> list[float]:
    """Evenly spaced interior times (1/4, 2/4, 3/4 for three) -- the ends are often black."""
    if not duration_s or duration_s <= 0:
        return [0.0]
    return [duration_s * (k + 1) / (count + 1) for k in range(count)]


def thumbnail_size(
    width: int, height: int, rotation: int, sar: float = 1.0, max_width: int = MAX_THUMBNAIL_WIDTH
) -> tuple[int, int]:
    """Size to scale the *stored* frame to so that, once rotated upright, the picture keeps its
    display aspect ratio and is at most ``max_width`` wide. Even sizes keep 4:2:0 JPEG happy."""
    disp_w, disp_h = width * (sar if sar > 0 else 1.0), float(height)
    turned = rotation in (90, 270)
    if turned:
        disp_w, disp_h = disp_h, disp_w
    out_w = min(float(max_width), disp_w)
    out_h = disp_h * out_w / disp_w
    w, h = max(2, int(out_w) // 2 * 2), max(2, round(out_h / 2) * 2)
    return (h, w) if turned else (w, h)


def grab_frames(path: Path, origin_s: float, targets: list[float], fps: float | None) -> list[Any]:
    """One decoded frame per target time (seconds from the first frame), by seeking if possible."""
    tolerance = 0.5 / fps if fps else 1e-3
    absolute = [origin_s + t for t in targets]
    # A thumbnail need not show the exact target: the keyframe the seek lands on will do when
    # it is within half the spacing of the targets (thumbnails stay distinct and evenly
    # spread), which saves decoding up to a whole GOP per thumbnail.
    spacing = targets[1] - targets[0] if len(targets) > 1 else 0.0
    early = max(tolerance, spacing / 2)
    try:
        with open_video(path) as (container, stream):
            stream.thread_type = "AUTO"
            frames = _grab_by_seeking(container, stream, absolute, early)
        if frames is not None:
            return frames
    except av.FFmpegError:
        pass  # fall through to the sequential decode, which does not depend on the index
    return grab_frames_sequentially(path, absolute, tolerance)


def _grab_by_seeking(
    container: Any, stream: Any, targets: list[float], tolerance: float
) -> list[Any] | None:
    """None means "seeking did not produce a frame": the caller decodes from the start."""
    if not stream.time_base:
        return None
    grabbed = []
    for target in targets:
        offset = max(0, int(Fraction(target) / Fraction(stream.time_base)))
        container.seek(offset, stream=stream, backward=True, any_frame=False)
        frame = _first_at_or_after(container.decode(stream), target, tolerance)
        if frame is None:
            return None
        grabbed.append(frame)
    return grabbed


def is_blank(frame: Any) -> bool:
    """Black or white and featureless: a fade, a flash, a title card's empty frame."""
    small = frame.reformat(width=32, height=18, format="gray").to_ndarray()
    mean, std = float(small.mean()), float(small.std())
    return std < BLANK_STD and (mean < 24 or mean > 232)


def _first_at_or_after(frames: Iterable[Any], target: float, tolerance: float) -> Any | None:
    """First frame shown at ``target`` -- or, when that one is blank, the first non-blank
    frame within ``BLANK_SCAN_S`` after it (else the blank one); the last frame if the video
    ends before ``target``."""
    last = None
    found = None
    for frame in frames:
        last = frame
        if found is None:
            if frame.time is None or frame.time >= target - tolerance:
                found = frame
                if not is_blank(frame):
                    return frame
            continue
        if frame.time is not None and found.time is not None:
            if frame.time - found.time > BLANK_SCAN_S:
                return found
        if not is_blank(frame):
            return frame
    return found if found is not None else last


def grab_frames_sequentially(path: Path, targets: list[float], tolerance: float) -> list[Any]:
    """Decode from the start, taking the first frame at or after each (ascending) target."""
    picked: list[Any] = []
    last = None
    with open_video(path) as (container, stream):
        for frame in iter_frames(container, stream, DecodeStats()):
            last = frame
            while len(picked) < len(targets) and (
                frame.time is None or frame.time >= targets[len(picked)] - tolerance
            ):
                picked.append(frame)
            if len(picked) == len(targets):
                break
    if last is None:
        raise InvalidMediaError(f"{path.name!r} has a video stream but no decodable frames")
    return picked + [last] * (len(targets) - len(picked))


def write_thumbnails(
    frames: list[Any], out_dir: Path, rotation: int, sar: float = 1.0
) -> tuple[Path, ...]:
    """Write each distinct frame as ``thumb_NN.jpg``, scaled and turned upright."""
    paths: list[Path] = []
    seen: set[int] = set()
    for frame in frames:
        if frame.pts is not None:
            if frame.pts in seen:
                continue  # a short video can map several targets to one frame
            seen.add(int(frame.pts))
        dest = out_dir / f"thumb_{len(paths):02d}.jpg"
        try:
            encode_jpeg(frame, dest, rotation, sar)
        except OSError as exc:  # PyAV's file errors are OSErrors too
            raise MediaIOError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        paths.append(dest)
    return tuple(paths)


def encode_jpeg(frame: Any, dest: Path, rotation: int, sar: float = 1.0) -> None:
    """Scale, rotate (numpy, so any decoder output works) and encode one JPEG with ``mjpeg``."""
    width, height = thumbnail_size(frame.width, frame.height, rotation, sar)
    small = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    if rotation:
        # np.rot90 turns counter-clockwise for positive k; ``rotation`` is clockwise.
        upright = np.ascontiguousarray(np.rot90(small.to_ndarray(), k=-(rotation // 90)))
        small = av.VideoFrame.from_ndarray(upright, format="rgb24")
    small.save(str(dest))
