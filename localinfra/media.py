"""Tiny synthetic media files for tests and demos, generated with PyAV.

Videos are built from scenes whose content is known exactly, so a test can assert where the
hard cuts are and when something moves:

* a colour name ("black", "white", "gray", "red", "green", "blue") is a flat frame of that
  colour -- consecutive colour scenes are separated by a hard cut;
* "still" is a white square resting on a dark background, "moving" is the same square sliding
  horizontally (bouncing at the edges). Switching between "still" and "moving" is *not* a cut
  (same picture, the square just starts or stops), while switching to or from a colour is.

Files are a few KB so a test suite can create dozens in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 220),
}
SQUARE_KINDS = ("still", "moving")
_BACKGROUND = (25, 30, 60)
_SQUARE = (255, 255, 255)


@dataclass(frozen=True)
class Scene:
    """``seconds`` of one kind of picture (a colour name, "still" or "moving")."""

    seconds: float
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in COLOURS and self.kind not in SQUARE_KINDS:
            raise ValueError(f"unknown scene kind {self.kind!r}")
        if self.seconds <= 0:
            raise ValueError("scene length must be positive")

    @property
    def background(self) -> str:
        return "square" if self.kind in SQUARE_KINDS else self.kind


@dataclass(frozen=True)
class VideoInfo:
    """What was written: the ground truth tests compare the analysis against."""

    path: Path
    frame_count: int
    fps: int
    width: int
    height: int
    encoder: str  # encoder used to write ("libx264" or the "mpeg4" fallback)
    codec_name: str  # name a decoder reports ("h264" / "mpeg4")
    cut_frames: list[int] = field(default_factory=list)
    moving_spans: list[tuple[float, float]] = field(default_factory=list)
    has_audio: bool = False
    rotation: int = 0

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps

    @property
    def cut_times(self) -> list[float]:
        return [f / self.fps for f in self.cut_frames]


def pick_encoder(preferred: str = "libx264") -> str:
    """``preferred`` if this FFmpeg build can encode it, else the always-built ``mpeg4``."""
    try:
        av.codec.Codec(preferred, "w")
    except Exception:
        return "mpeg4"
    return preferred


def make_video(
    path: Path,
    *,
    seconds: float = 2.0,
    fps: int = 24,
    width: int = 160,
    height: int = 120,
    codec: str = "libx264",
    scenes: Sequence[Scene | tuple[float, str]] | None = None,
    speed: int = 3,
    rotation: int = 0,
    audio: bool = False,
) -> VideoInfo:
    """Write an mp4 made of ``scenes`` (default: one "still" scene of ``seconds``).

    ``rotation`` (clockwise degrees) is stored as a display matrix, like a phone would;
    ``audio`` adds a quiet AAC sine track.
    """
    plan = [s if isinstance(s, Scene) else Scene(*s) for s in (scenes or [(seconds, "still")])]
    encoder = pick_encoder(codec)
    frames_per_scene = [max(1, round(s.seconds * fps)) for s in plan]
    cut_frames: list[int] = []
    moving_spans: list[tuple[float, float]] = []
    start = 0
    for i, (scene, n) in enumerate(zip(plan, frames_per_scene, strict=True)):
        if i and scene.background != plan[i - 1].background:
            cut_frames.append(start)
        if scene.kind == "moving":
            span = (start / fps, (start + n) / fps)
            if moving_spans and moving_spans[-1][1] == span[0]:
                span = (moving_spans[-1][0], span[1])
                moving_spans.pop()
            moving_spans.append(span)
        start += n

    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if encoder == "libx264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        else:
            stream.bit_rate = 400_000
        if rotation:
            stream.set_display_rotation(-rotation)
        # Every stream must exist before the first packet is muxed.
        sound = _add_audio_stream(container) if audio else None
        for index, rgb in enumerate(_render(plan, frames_per_scene, width, height, speed)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if sound is not None:
            _encode_sine(container, sound, start / fps)
        codec_name = str(stream.codec_context.codec.name)
    return VideoInfo(
        path=path,
        frame_count=start,
        fps=fps,
        width=width,
        height=height,
        encoder=encoder,
        codec_name="h264" if codec_name == "libx264" else codec_name,
        cut_frames=cut_frames,
        moving_spans=moving_spans,
        has_audio=audio,
        rotation=rotation % 360,
    )


def _render(plan: list[Scene], counts: list[int], width: int, height: int, speed: int) -> Any:
    """Yield RGB frames for the plan; the square keeps its position across scenes."""
    side = max(4, height // 5)
    x, direction = width // 4, 1
    y = (height - side) // 2
    for scene, n in zip(plan, counts, strict=True):
        for _ in range(n):
            if scene.kind in COLOURS:
                yield np.full((height, width, 3), COLOURS[scene.kind], dtype=np.uint8)
                continue
            if scene.kind == "moving":
                if not 0 <= x + direction * speed <= width - side:
                    direction = -direction
                x += direction * speed
            img = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
            img[y : y + side, x : x + side] = _SQUARE
            yield img


def _add_audio_stream(container: Any, rate: int = 16_000) -> Any:
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    return stream


def _encode_sine(container: Any, stream: Any, seconds: float) -> None:
    """A quiet 440 Hz tone, so the file has a real (decodable) audio track."""
    rate = int(stream.rate)
    total = max(1, round(seconds * rate))
    t = np.arange(total) / rate
    samples = (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    chunk = 1024
    for offset in range(0, total, chunk):
        part = samples[offset : offset + chunk].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(part, format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, offset, Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_audio_only(path: Path, seconds: float = 1.0, rate: int = 16_000) -> Path:
    """An AAC-in-mp4 (``.m4a``) file with no video stream at all."""
    with av.open(str(path), "w", format="mp4") as container:
        _encode_sine(container, _add_audio_stream(container, rate), seconds)
    return path


def make_corrupt_file(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """``size`` bytes that no demuxer should accept (a text marker, then seeded noise)."""
    marker = b"this is not a video\n"
    noise = np.random.default_rng(seed).integers(0, 256, max(0, size - len(marker)), np.uint8)
    path.write_bytes((marker + noise.tobytes())[:size])
    return path


def make_truncated_copy(src: Path, dest: Path, keep_bytes: int) -> Path:
    """The first ``keep_bytes`` of ``src`` -- an upload cut short (mp4 index is at the end)."""
    dest.write_bytes(src.read_bytes()[:keep_bytes])
    return dest


def make_damaged_copy(src: Path, dest: Path, *, from_fraction: float = 0.0) -> Path:
    """Copy an mp4 from :func:`make_video`, zeroing its coded picture data from
    ``from_fraction`` of the ``mdat`` payload onwards. The container still parses; 0.0 gives a
    video stream with no decodable frame, larger values a file whose tail is damaged."""
    data = bytearray(src.read_bytes())
    box = data.index(b"mdat") - 4
    size = int.from_bytes(data[box : box + 4], "big")
    if size < 16:
        raise ValueError(f"{src} has no plain mdat box to damage")
    payload_start, payload_end = box + 8, box + size
    start = payload_start + int((payload_end - payload_start) * from_fraction)
    data[start:payload_end] = bytes(payload_end - start)
    dest.write_bytes(bytes(data))
    return dest
