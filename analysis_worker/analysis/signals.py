"""Turning per-frame signals into cuts, gradual transitions and activity (pure numpy).

Kept apart from the decoder so the rules can be tested on hand-made arrays and reused by other
analyzers. The inputs are described in ``frame_signal``: ``change[k][i]`` says how different
frame i is from frame i-k (block averages of luma + chroma, plus a luma histogram distance),
``span_net[m]``/``span_mid[m]`` describe the window of m frames ending at frame i.

**Hard cuts** (adaptive, like PySceneDetect's AdaptiveDetector but with robust baselines):
frame i starts a new shot when ``change[1][i]`` is a local peak, is at least ``abs_min``, and is
at least ``ratio`` times the larger of the medians of the ``window`` frames on each side (plus
``floor``). Why this shape:

* a cut changes the picture at once, so it stands out against *both* neighbouring shots; taking
  the larger side baseline means a cut into busy footage (a scrolling texture, a pan) is judged
  against that footage, and a shot that is busy throughout never produces one;
* medians, unlike means, ignore a second cut or a flash a few frames away;
* the change signal is made of block averages and histograms, which moving texture barely
  alters, so fast motion keeps a low baseline while a change of shot does not.

Of two cuts closer than ``min_gap`` frames the stronger is kept (a new shot can open with a
burst of change).

**Flashes**: a candidate is dropped when the picture comes back within 1-3 frames: frame i-1
matches a frame among i+1..i+3 (a flash starts at i), or frame i matches one among i-2..i-4 (a
flash ends at i). "Matches" means ``change`` between them is below ``flash_ratio`` times the
candidate's own change. A flash is reported nowhere (it is not an edit).

**Dissolves** (gradual transitions): a cross-dissolve over m frames is a linear blend, so the
frame in its middle sits on the average of its two ends (``span_mid`` small next to
``span_net``), and the two ends differ much more than the footage on either side differs over
the same number of frames. For each lag m the score is ``min(net / (2 mid + floor),
contrast * net / (max(net[i-m], net[i+m]) + floor))``; windows with a hard cut or a flash inside
are skipped, and so are windows without a full window of footage on each side (a fade at the
very start or end of a video is not reported); a window scoring at least ``threshold`` is a
transition from frame i-m to frame i, the best-scoring lag wins, overlapping windows keep the
best. A transition with a nearly black end is a fade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis_worker.analysis.results import (
    ActivitySegment,
    SceneCut,
    SignalStats,
    Transition,
)

FloatArray = npt.NDArray[np.float64]

CHANGE_LAGS = (1, 2, 3, 4)  # lag 1: cuts; lags 2-4: recognising 1-3 frame flashes
DISSOLVE_LAGS = (8, 12, 18, 24, 36)  # window lengths (frames) a dissolve is looked for over


@dataclass(frozen=True, slots=True)
class CutParams:
    """Tuning for :func:`detect_cuts` (tuned on the bench's clip set, docs/decisions.md)."""

    window: int = 8  # frames on each side for the baselines (~1/3 s at 24 fps)
    ratio: float = 2.0  # a cut's change is at least this many times the busier side's median
    floor: float = 1.0  # added to the baseline so static footage needs a real change
    abs_min: float = 6.0  # minimum change (0..255 scale) for a cut at all
    flash_ratio: float = 0.5  # "the picture came back": change below this share of the spike
    min_gap: int = 3  # frames; of two cuts closer than this, keep the stronger


@dataclass(frozen=True, slots=True)
class TransitionParams:
    """Tuning for :func:`detect_transitions`."""

    threshold: float = 1.75
    floor: float = 4.0
    contrast: float = 1.5
    abs_min: float = 10.0  # the two ends must differ at least this much


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
    change: dict[int, FloatArray], times: FloatArray, params: CutParams | None = None
) -> tuple[list[SceneCut], list[tuple[int, int]]]:
    """Hard cuts in frame order, and the flashes ([first, end) frames) that were not cuts.

    ``change`` maps each lag in ``CHANGE_LAGS`` to its per-frame array (lag 1 is required).
    """
    p = params or CutParams()
    x = change[1]
    n = int(x.size)
    cuts: list[SceneCut] = []
    flashes: list[tuple[int, int]] = []
    # Only frames clearing the absolute minimum can be cuts: the median work stays on a
    # handful of frames even for hour-long videos.
    for i in np.flatnonzero(x >= p.abs_min).tolist():
        if i == 0:
            continue
        value = float(x[i])
        if x[i - 1] > value or (i + 1 < n and x[i + 1] >= value):
            continue
        left = x[max(1, i - p.window) : i]
        right = x[i + 1 : i + 1 + p.window]
        base = max(
            float(np.median(left)) if left.size else 0.0,
            float(np.median(right)) if right.size else 0.0,
        )
        score = value / (base + p.floor)
        if score < p.ratio:
            continue
        flash = _flash_at(change, i, value * p.flash_ratio, n)
        if flash is not None:
            flashes.append(flash)
            continue
        cuts.append(SceneCut(frame=i, time_s=float(times[i]), diff=value, score=score))
    # A new shot can start with a burst of change (a simulation settling, a camera finding
    # focus): a second peak right after a cut is that burst, not another edit.
    kept: list[SceneCut] = []
    for cut in sorted(cuts, key=lambda c: (-c.score, c.frame)):
        if all(abs(cut.frame - other.frame) >= p.min_gap for other in kept):
            kept.append(cut)
    return sorted(kept, key=lambda c: c.frame), sorted(set(flashes))


def _flash_at(
    change: dict[int, FloatArray], i: int, limit: float, n: int
) -> tuple[int, int] | None:
    """The flash explaining a spike at i, as [first, end) frames, or None."""
    for k in CHANGE_LAGS[1:]:
        lag = change.get(k)
        if lag is None:
            continue
        # A flash starting at i: frame i-1+k looks like frame i-1 again.
        if i - 1 + k < n and lag[i - 1 + k] < limit:
            return i, i - 1 + k
        # A flash ending at i: frame i looks like frame i-k, from before the flash.
        if i - k >= 0 and lag[i] < limit:
            return i - k + 1, i
    return None


def detect_transitions(
    span_net: dict[int, FloatArray],
    span_mid: dict[int, FloatArray],
    brightness: FloatArray,
    times: FloatArray,
    cut_frames: list[int],
    flashes: list[tuple[int, int]],
    params: TransitionParams | None = None,
) -> list[Transition]:
    """Gradual transitions (dissolves, fades) in frame order; see the module docstring."""
    p = params or TransitionParams()
    n = int(brightness.size)
    best = np.zeros(n)
    best_lag = np.zeros(n, dtype=np.int64)
    for m in sorted(span_net):
        net, mid = span_net[m], span_mid[m]
        if net.size != n or n <= m:
            continue
        before = np.zeros(n)
        before[m:] = net[:-m]
        after = np.zeros(n)
        after[:-m] = net[m:]
        linear = net / (2 * mid + p.floor)
        contrast = p.contrast * net / (np.maximum(before, after) + p.floor)
        score = np.minimum(linear, contrast)
        # Both neighbouring windows must exist: at the ends of the video, missing footage
        # would read as "nothing changes there" and make any smooth change look like a blend.
        score[: 2 * m] = 0.0
        score[max(0, n - m) :] = 0.0
        score[net < p.abs_min] = 0.0
        for c in cut_frames:  # a window holding a hard cut is that cut, not a dissolve
            score[c : c + m] = 0.0
        for a, b in flashes:
            score[a : b + m] = 0.0
        better = score > best
        best[better] = score[better]
        best_lag[better] = m
    picked: list[Transition] = []
    taken = np.zeros(n, dtype=bool)
    for i in np.argsort(-best, kind="stable").tolist():
        if best[i] < p.threshold:
            break
        start = i - int(best_lag[i])
        if taken[start : i + 1].any():
            continue
        taken[start : i + 1] = True
        kind = "dissolve"
        if brightness[start] < 16:
            kind = "fade_in"
        elif brightness[i] < 16:
            kind = "fade_out"
        picked.append(
            Transition(
                kind=kind,
                start_frame=start,
                end_frame=i,
                start_s=float(times[start]),
                end_s=float(times[i]),
                score=float(best[i]),
                change=float(span_net[int(best_lag[i])][i]),
            )
        )
    return sorted(picked, key=lambda t: t.start_frame)


def absorb_cuts(
    cuts: list[SceneCut], transitions: list[Transition], ratio: float = 2.0
) -> list[SceneCut]:
    """Drop a "cut" inside (or on the first frame of) a dissolve that changes the picture
    ``ratio`` times more: the first blended frame can jump (a histogram of few levels spreads
    at once), but it belongs to the transition, not to an edit of its own. The ends of a
    transition are known to within about half its length, hence the margin after it."""
    return [
        c
        for c in cuts
        if not any(
            t.start_frame - 1 <= c.frame <= t.end_frame + (t.end_frame - t.start_frame) // 2
            and t.change >= ratio * c.diff
            for t in transitions
        )
    ]


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
