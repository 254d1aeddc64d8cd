"""The decoding-free rules: cut detection, activity segments, progress and thumbnail sizing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis_worker.analysis.progress import ProgressReporter
from analysis_worker.analysis.results import json_float
from analysis_worker.analysis.signals import (
    ActivityParams,
    CutParams,
    detect_cuts,
    find_activity,
    summarize,
)
from analysis_worker.analysis.thumbnails import thumbnail_size, thumbnail_targets

FPS = 25.0


def _times(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / FPS


def _noise(n: int, level: float, spread: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    motion = np.abs(level + rng.normal(0.0, spread, n))
    motion[0] = 0.0
    return motion


def _cuts(change: np.ndarray, n: int) -> list[int]:
    return [c.frame for c in detect_cuts({1: change}, _times(n))[0]]


def test_spike_over_quiet_footage_is_a_cut() -> None:
    motion = _noise(100, 0.5, 0.2)
    motion[50] = 30.0
    cuts, flashes = detect_cuts({1: motion}, _times(100))

    assert [c.frame for c in cuts] == [50]
    assert cuts[0].time_s == pytest.approx(2.0)
    assert flashes == []


def test_busy_footage_is_not_cut_but_a_spike_above_it_is() -> None:
    motion = _noise(120, 20.0, 2.0)  # a pan: every frame differs a lot, steadily
    assert _cuts(motion, 120) == []

    motion[60] = 80.0
    assert _cuts(motion, 120) == [60]


def test_a_cut_into_busy_footage_is_judged_against_that_footage() -> None:
    change = np.concatenate((_noise(50, 1.0, 0.2), _noise(50, 30.0, 2.0, seed=2)))
    change[50] = 45.0  # 1.4 x the busy shot's level: that shot's own frames look like this
    assert _cuts(change, 100) == []
    change[50] = 90.0
    assert _cuts(change, 100) == [50]


def test_small_spikes_are_below_the_absolute_minimum() -> None:
    motion = np.zeros(60)
    motion[30] = CutParams().abs_min - 1
    assert _cuts(motion, 60) == []


def test_close_cuts_do_not_hide_each_other_and_smeared_cuts_count_once() -> None:
    motion = _noise(100, 0.5, 0.2)
    motion[40], motion[45] = 40.0, 35.0  # two real cuts 5 frames apart
    motion[70], motion[71] = 40.0, 30.0  # one cut spread over two frames
    assert _cuts(motion, 100) == [40, 45, 70]


def _with_lags(frames: np.ndarray) -> dict[int, np.ndarray]:
    """change[k][i] = |frame i - frame i-k| for 1-value "pictures" (0 where i < k)."""
    out = {}
    for k in (1, 2, 3, 4):
        lag = np.zeros(frames.size)
        lag[k:] = np.abs(frames[k:] - frames[:-k])
        out[k] = lag
    return out


@pytest.mark.parametrize("length", [1, 2, 3])
def test_a_flash_of_one_to_three_frames_is_not_a_cut(length: int) -> None:
    picture = np.full(80, 60.0) + _noise(80, 0.3, 0.1)
    picture[40 : 40 + length] = 250.0  # white, then the same shot again
    cuts, flashes = detect_cuts(_with_lags(picture), _times(80))

    assert cuts == []
    assert (40, 40 + length) in flashes


def test_a_cut_right_after_a_long_white_stretch_is_still_a_cut() -> None:
    picture = np.full(80, 60.0)
    picture[40:50] = 250.0  # ten frames are a shot, not a flash
    picture[50:] = 120.0
    cuts, flashes = detect_cuts(_with_lags(picture), _times(80))

    assert [c.frame for c in cuts] == [40, 50]
    assert flashes == []


def test_activity_bridges_short_gaps_but_not_cuts_or_blips() -> None:
    n = 150
    motion = np.zeros(n)
    motion[10:30] = 3.0
    motion[35:50] = 3.0  # 5-frame (0.2 s) pause: same segment
    motion[100:104] = 3.0  # 0.16 s blip: dropped
    motion[120:130] = 3.0
    motion[131:140] = 3.0  # separated by a cut at 130: two segments
    motion[130] = 60.0
    segments = find_activity(motion, _times(n), 1 / FPS, [130], ActivityParams())

    spans = [(round(s.start_s * FPS), round(s.end_s * FPS)) for s in segments]
    assert spans == [(10, 50), (120, 130), (131, 140)]
    assert segments[0].mean_motion == pytest.approx(3.0 * 35 / 40)
    assert segments[1].mean_motion == pytest.approx(3.0)


def test_long_pauses_split_activity() -> None:
    motion = np.zeros(100)
    motion[10:30] = 2.0
    motion[60:80] = 2.0
    assert len(find_activity(motion, _times(100), 1 / FPS, [])) == 2


def test_summary_of_empty_signal_is_zeros_and_non_finite_is_rejected() -> None:
    assert summarize(np.array([])).to_dict() == dict.fromkeys(
        ("mean", "std", "min", "max", "p95"), 0.0
    )
    with pytest.raises(ValueError):
        json_float(math.nan)


def test_progress_reporter_throttles_clamps_and_finishes() -> None:
    seen: list[float] = []
    reporter = ProgressReporter(seen.append, step=0.1)
    for f in (0.05, 0.1, 0.15, 0.3, 0.2, 1.5, 2.0):
        reporter.update(f)
    reporter.finish()
    reporter.finish()

    assert seen == [0.1, 0.3, 0.99, 1.0]


@pytest.mark.parametrize(
    ("size", "rotation", "sar", "expected"),
    [
        ((1920, 1080), 0, 1.0, (320, 180)),
        ((160, 120), 0, 1.0, (160, 120)),  # never upscaled
        # Sizes are before rotation: a turned landscape frame is upright portrait 320x568 ...
        ((1920, 1080), 90, 1.0, (568, 320)),
        # ... and a portrait-stored frame turned by 270 is upright landscape 320x180.
        ((1080, 1920), 270, 1.0, (180, 320)),
        ((720, 576), 0, 16 / 15, (320, 240)),  # anamorphic PAL shown at 768x576
    ],
)
def test_thumbnail_size(
    size: tuple[int, int], rotation: int, sar: float, expected: tuple[int, int]
) -> None:
    assert thumbnail_size(*size, rotation, sar) == expected


def test_thumbnail_targets_are_interior_and_even() -> None:
    assert thumbnail_targets(4.0) == [1.0, 2.0, 3.0]
    assert thumbnail_targets(None) == [0.0]
