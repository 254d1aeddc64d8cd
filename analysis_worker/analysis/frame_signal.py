"""Decoding a whole video into compact per-frame signals (the expensive part of the deep pass).

Speed design (docs/decisions.md, "Analysis speed"): decoding is the floor, so everything else
is kept off its path or made negligible next to it.

* FFmpeg decodes with frame + slice threads (``AUTO``) and skips the H.264/HEVC in-loop
  deblocking filter: at the analysis size its effect is invisible, and it is a large share of
  decode time.
* swscale shrinks each frame to a 64-pixel-wide ``yuv444p`` image in the decoding thread: the
  smallest picture the signals need, whatever the source resolution, so thresholds mean the
  same thing for a phone clip and a 4K master and memory does not grow with resolution.
* Decoding runs in a thread of its own that fills fixed-size chunks of small frames and hands
  them over a bounded queue; the numpy work runs once per chunk (vectorised over its frames),
  overlapping the next chunk's decoding.

Signals, per frame i (all on the 0..255 scale):

* ``brightness`` -- mean luma; ``motion`` -- mean absolute luma difference to frame i-1 at
  64 px wide (the activity signal);
* ``change[k]`` for lags k = 1..4 -- how different frame i is from frame i-k: the mean absolute
  difference of 16-pixel-wide block averages of luma and chroma, plus the L1 distance between
  32-bin luma histograms. Block averages and histograms barely move when a texture scrolls or
  the camera pans, and move a lot when the shot changes. Lags 2..4 let the rules recognise a
  flash (the picture comes back);
* ``span_net[m]`` / ``span_mid[m]`` for the dissolve lags m -- the change between frames i-m
  and i, and how far frame i-m/2 is from the average of those two ends (a cross-dissolve is a
  linear blend, so its middle frame sits on that average).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from av.video.reformatter import VideoReformatter

from analysis_worker.analysis.base import StopFn
from analysis_worker.analysis.errors import AnalysisAborted, InvalidMediaError, MediaIOError
from analysis_worker.analysis.progress import ProgressReporter
from analysis_worker.analysis.pyav_io import (
    DecodeStats,
    iter_frames,
    open_video,
    stream_duration,
    stream_fps,
)
from analysis_worker.analysis.results import JsonDict
from analysis_worker.analysis.signals import CHANGE_LAGS, DISSOLVE_LAGS, FloatArray

GRAY_WIDTH = 64
BLOCK = 4  # block-average factor for the change signal: 64 px -> 16 px wide
MAX_GRAY_HEIGHT = 128  # a very tall frame (9:32) still gets a bounded analysis image
HIST_BINS = 32
HIST_WEIGHT = 25.0  # scales the histogram's L1 distance (0..2) next to the block difference
CHUNK = 64  # frames per hand-over between the decoding thread and the signal maths
MIN_CHUNK = 4  # short videos hand over smaller chunks so progress still moves by ~1 %
QUEUE_CHUNKS = 3  # chunks in flight: memory is bounded by CHUNK * QUEUE_CHUNKS small frames
STOP_CHECK_EVERY = 8  # frames between should_stop() polls in the decoding thread
MAX_PIXELS = 2 * 7680 * 4320  # larger frames are refused (INVALID_MEDIA), not decoded
# Decoded full-size frames in flight (frame threads each hold one, plus references) are the
# deep pass's only memory that grows with resolution: above this many pixels in flight the
# frame-thread count is lowered, down to one.
DECODE_PIXEL_BUDGET = 120_000_000
HISTORY = max(DISSOLVE_LAGS)  # frames of small pictures kept across chunk boundaries

U8 = npt.NDArray[np.uint8]


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
    change: dict[int, FloatArray] = field(default_factory=dict)
    span_net: dict[int, FloatArray] = field(default_factory=dict)
    span_mid: dict[int, FloatArray] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.times.size)

    @property
    def duration_s(self) -> float:
        """Time the decoded frames are on screen (last frame included)."""
        return float(self.times[-1] - self.times[0]) + self.frame_duration if self.frames else 0.0


def gray_size(width: int, height: int, target_width: int = GRAY_WIDTH) -> tuple[int, int]:
    """Analysis size: ``target_width`` wide, the stored aspect ratio, height a multiple of
    ``BLOCK`` between ``BLOCK`` and ``MAX_GRAY_HEIGHT``. Tiny sources are scaled up, which
    costs nothing at this size and keeps one code path for a 1x1 clip and an 8K master."""
    if width <= 0 or height <= 0:
        return target_width, 36
    h = round(height * target_width / width / BLOCK) * BLOCK
    return target_width, min(MAX_GRAY_HEIGHT, max(BLOCK, h))


@dataclass
class _Chunk:
    pictures: U8  # (frames, 3, h, w) yuv444p
    times: list[float]


_END = object()


class _Decoder(threading.Thread):
    """Decodes into chunks of small pictures on its own thread; the consumer iterates them.

    Errors (FFmpeg's, ours) are handed over the queue and re-raised in the consumer, so the
    caller sees exactly what a single-threaded decode would have raised.
    """

    def __init__(self, path: Path, should_stop: StopFn, fast: bool) -> None:
        super().__init__(name="analysis-decode", daemon=True)
        self._fast = fast
        self._path = path
        self._should_stop = should_stop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._cancel = threading.Event()
        self.ready = threading.Event()
        self.fps: float | None = None
        self.total = 0
        self.duration: float | None = None
        self.size = (GRAY_WIDTH, 36)
        self.stats = DecodeStats()

    def run(self) -> None:
        try:
            self._decode()
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
        finally:
            self.ready.set()

    def _put(self, item: Any) -> None:
        while not self._cancel.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _decode(self) -> None:
        with open_video(self._path) as (container, stream):
            ctx = stream.codec_context
            ctx.thread_type = "AUTO"  # frame + slice threads
            if self._fast:
                # Deblocking is invisible at 64 px wide and a large share of H.264 decoding.
                ctx.options = {**ctx.options, "skip_loop_filter": "all"}
            pixels = int(ctx.width) * int(ctx.height)
            if pixels > MAX_PIXELS:
                raise InvalidMediaError(
                    f"{self._path.name!r} has {ctx.width}x{ctx.height} frames, more than the "
                    f"{MAX_PIXELS:,} pixels the analysis accepts; upload a smaller rendition"
                )
            threads = DECODE_PIXEL_BUDGET // max(1, pixels) - 2
            if threads < (os.cpu_count() or 1) + 1:
                ctx.thread_count = max(1, threads)
            self.fps = stream_fps(stream)
            self.duration = stream_duration(container, stream)
            self.total = int(stream.frames) or (
                round(self.duration * self.fps) if self.duration and self.fps else 0
            )
            w, h = gray_size(int(ctx.width), int(ctx.height))
            self.size = (w, h)
            self.ready.set()
            # One reformatter for the whole stream: it keeps its swscale context, which costs
            # more to build than to run (a fresh ``frame.reformat`` builds one per frame).
            scaler = VideoReformatter()
            chunk = min(CHUNK, max(MIN_CHUNK, self.total // 100))
            buf = np.empty((chunk, 3, h, w), dtype=np.uint8)
            times: list[float] = []
            fill = 0
            step = 1.0 / self.fps if self.fps else 1.0
            last_time: float | None = None
            for index, frame in enumerate(iter_frames(container, stream, self.stats)):
                if self._cancel.is_set():
                    return
                if index % STOP_CHECK_EVERY == 0 and self._should_stop():
                    raise AnalysisAborted(f"deep pass stopped on request after {index} frames")
                # yuv444p, not gray: swscale's AREA path to gray is ten times slower here.
                small = scaler.reformat(
                    frame, width=w, height=h, format="yuv444p", interpolation="AREA"
                )
                buf[fill] = small.to_ndarray()
                t = frame.time
                if t is None:  # frames without a timestamp continue from the previous one
                    t = last_time + step if last_time is not None else 0.0
                last_time = float(t)
                times.append(last_time)
                fill += 1
                if fill == chunk:
                    self._put(_Chunk(buf, times))
                    buf = np.empty((chunk, 3, h, w), dtype=np.uint8)
                    times, fill = [], 0
            if fill:
                self._put(_Chunk(buf[:fill], times))

    def chunks(self) -> Iterator[_Chunk]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self._cancel.set()
        while self.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self.join(timeout=0.1)


class _Accumulator:
    """Turns chunks of small pictures into the per-frame signals (vectorised per chunk)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.brightness: list[FloatArray] = []
        self.motion: list[FloatArray] = []
        self.change: dict[int, list[FloatArray]] = {k: [] for k in CHANGE_LAGS}
        self.net: dict[int, list[FloatArray]] = {m: [] for m in DISSOLVE_LAGS}
        self.mid: dict[int, list[FloatArray]] = {m: [] for m in DISSOLVE_LAGS}
        # The last HISTORY frames of the previous chunks: luma, block picture, histogram.
        self._luma: npt.NDArray[np.int16] | None = None
        self._blocks: npt.NDArray[np.float32] | None = None
        self._hist: npt.NDArray[np.float32] | None = None

    def add(self, chunk: _Chunk) -> None:
        pics = chunk.pictures
        n, _, h, w = pics.shape
        luma = pics[:, 0].astype(np.int16)
        blocks = pics.reshape(n, 3, h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(
            axis=(3, 5), dtype=np.float32
        )
        bins = (pics[:, 0].reshape(n, -1) >> 3).astype(np.intp)  # 256 / 32 levels per bin
        bins += (np.arange(n, dtype=np.intp) * HIST_BINS)[:, None]
        hist = np.bincount(bins.ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS)
        hist = hist.astype(np.float32) / (h * w)

        self.times.extend(chunk.times)
        self.brightness.append(luma.mean(axis=(1, 2), dtype=np.float64))
        prev_luma = luma[:1] if self._luma is None else self._luma[-1:]
        all_luma = np.concatenate((prev_luma, luma))
        motion = np.abs(np.diff(all_luma, axis=0)).mean(axis=(1, 2), dtype=np.float64)
        self.motion.append(motion)

        old = 0 if self._blocks is None else len(self._blocks)
        all_blocks = blocks if self._blocks is None else np.concatenate((self._blocks, blocks))
        all_hist = hist if self._hist is None else np.concatenate((self._hist, hist))
        for k in CHANGE_LAGS:
            self.change[k].append(_lag_change(all_blocks, all_hist, k, old, n))
        for m in DISSOLVE_LAGS:
            net, mid = _span(all_blocks, m, old, n)
            self.net[m].append(net)
            self.mid[m].append(mid)
        self._luma = luma[-1:]
        self._blocks = all_blocks[-HISTORY:]
        self._hist = all_hist[-HISTORY:]

    def signal(self, fps: float | None, size: tuple[int, int], errors: int) -> FrameSignal:
        t = np.asarray(self.times, dtype=np.float64)
        t = t - t[0] if t.size else t
        motion = _cat(self.motion)
        if motion.size:
            motion[0] = 0.0  # frame 0 has no previous frame
        return FrameSignal(
            times=t,
            brightness=_cat(self.brightness),
            motion=motion,
            fps=fps,
            frame_duration=_frame_duration(t, fps),
            gray_size=size,
            decode_errors=errors,
            change={k: _cat(v) for k, v in self.change.items()},
            span_net={m: _cat(v) for m, v in self.net.items()},
            span_mid={m: _cat(v) for m, v in self.mid.items()},
        )


def _lag_change(
    blocks: npt.NDArray[np.float32], hist: npt.NDArray[np.float32], k: int, old: int, n: int
) -> FloatArray:
    """change[k] for the n new frames (at offset ``old`` in ``blocks``); 0 where i-k < 0."""
    out = np.zeros(n, dtype=np.float64)
    first = max(old, k)  # first new frame with a frame k before it
    if first < old + n:
        cur, ref = blocks[first:], blocks[first - k : old + n - k]
        d = np.abs(cur - ref).mean(axis=(1, 2, 3), dtype=np.float64)
        hd = np.abs(hist[first:] - hist[first - k : old + n - k]).sum(axis=1, dtype=np.float64)
        out[first - old :] = d + HIST_WEIGHT * hd
    return out


def _span(
    blocks: npt.NDArray[np.float32], m: int, old: int, n: int
) -> tuple[FloatArray, FloatArray]:
    net = np.zeros(n, dtype=np.float64)
    mid = np.zeros(n, dtype=np.float64)
    first = max(old, m)
    if first < old + n:
        end, start = blocks[first:], blocks[first - m : old + n - m]
        middle = blocks[first - m // 2 : old + n - m // 2]
        net[first - old :] = np.abs(end - start).mean(axis=(1, 2, 3), dtype=np.float64)
        mid[first - old :] = np.abs(middle - (end + start) / 2).mean(
            axis=(1, 2, 3), dtype=np.float64
        )
    return net, mid


def _cat(parts: list[FloatArray]) -> FloatArray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def decode_signal(
    path: Path, reporter: ProgressReporter, should_stop: StopFn, *, fast_decode: bool = True
) -> FrameSignal:
    """Decode every frame of ``path`` into the per-frame signals, reporting progress.

    Progress is frames decoded over the header's frame count when there is one (exact for
    mp4), else presentation time over duration. Raises ``AnalysisAborted`` once
    ``should_stop()`` returns True, and whatever opening or decoding raises. ``fast_decode``
    skips the in-loop deblocking filter (see the module docstring).
    """
    decoder = _Decoder(path, should_stop, fast_decode)
    acc = _Accumulator()
    decoder.start()
    try:
        for chunk in decoder.chunks():
            acc.add(chunk)
            if decoder.total:
                reporter.update(len(acc.times) / decoder.total)
            elif decoder.duration and acc.times:
                reporter.update((acc.times[-1] - acc.times[0]) / decoder.duration)
    finally:
        decoder.cancel()
    return acc.signal(decoder.fps, decoder.size, decoder.stats.errors)


def _frame_duration(times: FloatArray, fps: float | None) -> float:
    if times.size > 1:
        step = float(np.median(np.diff(times)))
        if step > 0:
            return step
    return 1.0 / fps if fps else 0.0


def write_signal_json(dest: Path, signal: FrameSignal, extra: JsonDict) -> Path:
    """Write the full per-frame signal (columnar, rounded) atomically: readers never see half."""
    doc: JsonDict = {
        "version": 2,
        "frames": signal.frames,
        "fps": signal.fps,
        "frame_duration_s": round(signal.frame_duration, 6),
        "gray_size": list(signal.gray_size),
        "decode_errors": signal.decode_errors,
        "time_s": [round(v, 6) for v in signal.times.tolist()],
        "brightness": [round(v, 4) for v in signal.brightness.tolist()],
        "motion": [round(v, 4) for v in signal.motion.tolist()],
        "change": [round(v, 4) for v in signal.change.get(1, np.zeros(0)).tolist()],
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
