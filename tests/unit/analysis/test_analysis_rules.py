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


def test_spike_over_quiet_footage_is_a_cut() -> None:
    motion = _noise(100, 0.5, 0.2)
    motion[50] = 30.0
    cuts = detect_cuts(motion, _times(100))

    assert [c.frame for c in cuts] == [50]
    assert cuts[0].time_s == pytest.approx(2.0)


def test_busy_footage_is_not_cut_but_a_spike_above_it_is() -> None:
    motion = _noise(120, 20.0, 2.0)  # a pan: every frame differs a lot, steadily
    assert detect_cuts(motion, _times(120)) == []

    motion[60] = 80.0
    assert [c.frame for c in detect_cuts(motion, _times(120))] == [60]


def test_small_spikes_are_below_the_absolute_minimum() -> None:
    motion = np.zeros(60)
    motion[30] = CutParams().abs_min - 1
    assert detect_cuts(motion, _times(60)) == []


def test_close_cuts_do_not_hide_each_other_and_smeared_cuts_count_once() -> None:
    motion = _noise(100, 0.5, 0.2)
    motion[40], motion[45] = 40.0, 35.0  # two real cuts 5 frames apart
    motion[70], motion[71] = 40.0, 30.0  # one cut spread over two frames
    assert [c.frame for c in detect_cuts(motion, _times(100))] == [40, 45, 70]


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
