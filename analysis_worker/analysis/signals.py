"""Turning per-frame signals into scene cuts and activity segments (pure numpy, no decoding).

Kept apart from the decoder so the rules can be tested on hand-made arrays and reused by other
analyzers. All signals are on the 0..255 luma scale of a small grayscale copy of each frame:

* ``brightness[i]`` -- mean luma of frame i;
* ``motion[i]`` -- mean absolute luma difference between frame i-1 and frame i (0 for i = 0).

Cut rule (robust spike detection): frame i starts a new shot when ``motion[i]`` is a local peak
and exceeds ``max(abs_min, median + k * max(1.4826 * MAD, spread_floor))``, where median and
MAD are taken over the ``window`` frames on each side of i (i itself and frame 0 excluded).
Why this shape:

* a hard cut changes almost every pixel at once, so it is a single-frame spike against its
  neighbourhood -- comparing to the *local* median adapts to footage that is busy throughout
  (a pan or a shaky camera has large but steady differences, which must not count as cuts);
* median/MAD, unlike mean/std, are not dragged up by the spike itself or by another cut a few
  frames away, so two quick cuts do not hide each other;
* ``spread_floor`` keeps the threshold meaningful on perfectly static footage where MAD is 0,
  and ``abs_min`` rejects tiny "spikes" (a light flickering) that no person would call a cut;
* the local-peak test plus ``min_gap`` keeps one cut when an encoder smears the change over two
  frames.

Gradual transitions (fades, dissolves) are deliberately not reported: they are not spikes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis_worker.analysis.results import ActivitySegment, SceneCut, SignalStats

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CutParams:
    """Tuning for :func:`detect_cuts`; defaults suit the 64-pixel-wide grayscale signal."""

    window: int = 12  # frames on each side used for the local baseline (~0.5 s at 24 fps)
    k: float = 6.0  # robust standard deviations above the local median
    spread_floor: float = 1.0  # minimum spread (luma levels) when the baseline is flat
    abs_min: float = 10.0  # a cut must change the picture by at least this much on average
    min_gap: int = 3  # frames; of two peaks closer than this, keep the stronger


@dataclass(frozen=True, slots=True)
class ActivityParams:
    """Tuning for :func:`find_activity`."""

    threshold: float = 1.0  # mean abs luma change per frame that counts as "moving"
    max_gap_s: float = 0.5  # quieter stretches this short are bridged
    min_duration_s: float = 0.25  # shorter bursts are noise (a flicker, a compression pop)


def summarize(values: FloatArray) -> SignalStats:
    """Summary statistics; all zero for an empty signal so the result stays JSON-safe."""
    if values.size == 0:
        return SignalStats(mean=0.0, std=0.0, min=0.0, max=0.0, p95=0.0)
    return SignalStats(
        mean=float(values.mean()),
        std=float(values.std()),
        min=float(values.min()),
        max=float(values.max()),
        p95=float(np.percentile(values, 95)),
    )


def detect_cuts(
    motion: FloatArray, times: FloatArray, params: CutParams | None = None
) -> list[SceneCut]:
    """Return hard cuts in frame order (see the module docstring for the rule)."""
    p = params or CutParams()
    n = int(motion.size)
    candidates: list[SceneCut] = []
    # Only frames that clear the absolute minimum can be cuts; checking those first keeps the
    # per-frame median work to a handful of frames even on hour-long videos.
    for i in np.flatnonzero(motion >= p.abs_min).tolist():
        if i == 0:
            continue
        value = float(motion[i])
        if motion[i - 1] > value or (i + 1 < n and motion[i + 1] >= value):
            continue
        lo, hi = max(1, i - p.window), min(n, i + p.window + 1)
        neighbours = np.concatenate((motion[lo:i], motion[i + 1 : hi]))
        if neighbours.size == 0:
            baseline, spread = 0.0, p.spread_floor
        else:
            baseline = float(np.median(neighbours))
            mad = float(np.median(np.abs(neighbours - baseline)))
            spread = max(1.4826 * mad, p.spread_floor)
        threshold = max(p.abs_min, baseline + p.k * spread)
        if value >= threshold:
            candidates.append(
                SceneCut(
                    frame=i,
                    time_s=float(times[i]),
                    diff=value,
                    score=(value - baseline) / spread,
                )
            )
    kept: list[SceneCut] = []
    for cut in sorted(candidates, key=lambda c: (-c.score, c.frame)):
        if all(abs(cut.frame - other.frame) >= p.min_gap for other in kept):
            kept.append(cut)
    return sorted(kept, key=lambda c: c.frame)


def find_activity(
    motion: FloatArray,
    times: FloatArray,
    frame_duration: float,
    cut_frames: list[int],
    params: ActivityParams | None = None,
) -> list[ActivitySegment]:
    """Spans where ``motion`` stays above the threshold, split at cuts.

    Frame i is active when it differs from frame i-1, so an active run i..j covers the time
    frames i..j are on screen: ``[times[i], times[j] + frame_duration]``. Cut frames are never
    active (a cut is a change of shot, not movement) and runs are never merged across a cut.
    """
    p = params or ActivityParams()
    active = motion >= p.threshold
    if active.size:
        active[0] = False
    cuts = sorted(set(cut_frames))
    for c in cuts:
        if 0 <= c < active.size:
            active[c] = False

    runs: list[tuple[int, int]] = []
    for start, end in _runs(active):
        if runs:
            prev_start, prev_end = runs[-1]
            gap_s = float(times[start] - times[prev_end]) - frame_duration
            crosses_cut = any(prev_end < c <= start for c in cuts)
            if gap_s <= p.max_gap_s and not crosses_cut:
                runs[-1] = (prev_start, end)
                continue
        runs.append((start, end))

    segments: list[ActivitySegment] = []
    cut_list = np.asarray(cuts, dtype=np.int64)
    for start, end in runs:
        start_s = float(times[start])
        end_s = float(times[end]) + frame_duration
        if end_s - start_s < p.min_duration_s:
            continue
        span = np.arange(start, end + 1)
        span = span[~np.isin(span, cut_list)]
        segments.append(
            ActivitySegment(start_s=start_s, end_s=end_s, mean_motion=float(motion[span].mean()))
        )
    return segments


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Inclusive (start, end) index pairs of the True runs in ``mask``."""
    if mask.size == 0:
        return []
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2] - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
