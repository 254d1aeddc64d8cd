"""Odd inputs get a correct result or INVALID_MEDIA, never a hang or an out-of-memory.

Clips are made with ffmpeg (a system dependency, scripts/ensure_system_deps.sh), since the
cases need what only a real muxer writes: variable frame rate, 1x1 frames, 8K frames, a video
stream shorter than its audio, a file cut in half.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis_worker.analysis import DeepResult, InvalidMediaError, PyAVAnalyzer, frame_signal

ROOT = Path(__file__).resolve().parents[3]


def _ffmpeg(*args: str) -> None:
    assert shutil.which("ffmpeg"), "ffmpeg missing: run scripts/ensure_system_deps.sh"
    proc = subprocess.run(
        ["ffmpeg", "-v", "error", "-y", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def _deep(path: Path, out: Path) -> DeepResult:
    return PyAVAnalyzer().deep(path, out, lambda _f: None, lambda: False)


def test_variable_frame_rate_uses_timestamps(tmp_path: Path) -> None:
    """24 fps for 2 s, then every other frame (12 fps) for 2 s; the cut is at 2.0 s."""
    clip = tmp_path / "vfr.mp4"
    _ffmpeg(
        "-filter_complex",
        "testsrc2=s=320x180:r=24:d=2[a];mandelbrot=s=320x180:r=24,trim=end_frame=48[b];"
        "[a][b]concat=n=2:v=1:a=0,select='lt(n\\,24)+not(mod(n\\,2))'[out]",
        "-map", "[out]", "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "ultrafast",
        str(clip),
    )  # fmt: skip
    result = _deep(clip, tmp_path / "out")

    assert result.frames_decoded == 24 + 36
    assert [round(c.time_s, 3) for c in result.cuts] == [2.0]
    assert result.duration_s == pytest.approx(4.0, abs=0.1)
    signal = json.loads(result.signal_path.read_text())
    steps = {round(b - a, 4) for a, b in zip(signal["time_s"], signal["time_s"][1:], strict=False)}
    assert steps == {round(1 / 24, 4), round(2 / 24, 4)}


def test_a_one_pixel_video_is_analysed(tmp_path: Path) -> None:
    clip = tmp_path / "dot.mkv"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=2x2:r=24:d=1,format=yuv444p,scale=1:1",
        "-c:v",
        "ffv1",
        str(clip),
    )
    analyzer = PyAVAnalyzer()
    quick = analyzer.quick(clip, tmp_path / "q")
    deep = _deep(clip, tmp_path / "d")

    assert (quick.probe.width, quick.probe.height) == (1, 1)
    assert len(quick.thumbnails) >= 1 and quick.thumbnails[0].stat().st_size > 0
    assert deep.frames_decoded == 24
    assert deep.cuts == () and deep.transitions == ()


def test_a_video_stream_that_ends_before_the_audio(tmp_path: Path) -> None:
    clip = tmp_path / "short_video.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=s=320x180:r=24:d=1",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
        "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(clip),
    )  # fmt: skip
    analyzer = PyAVAnalyzer()
    quick = analyzer.quick(clip, tmp_path / "q")
    deep = _deep(clip, tmp_path / "d")

    assert quick.probe.has_audio and quick.thumbnails
    assert deep.frames_decoded == 24
    assert deep.duration_s == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("faststart", [False, True])
def test_a_file_cut_in_half(tmp_path: Path, faststart: bool) -> None:
    """Index at the end: nothing to read, INVALID_MEDIA. Index first: the first half is
    analysed, the damage counted."""
    whole = tmp_path / "whole.mp4"
    flags = ["-movflags", "+faststart"] if faststart else []
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=s=320x180:r=24:d=4",
        "-c:v", "libx264", "-preset", "ultrafast", *flags, str(whole),
    )  # fmt: skip
    half = tmp_path / "half.mp4"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    if not faststart:
        with pytest.raises(InvalidMediaError) as info:
            _deep(half, tmp_path / "out")
        assert info.value.code == "INVALID_MEDIA"
        return
    result = _deep(half, tmp_path / "out")
    assert 0 < result.frames_decoded < 96


def test_frames_over_the_pixel_limit_are_invalid_media(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = tmp_path / "small.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=s=320x180:r=24:d=0.5",
        "-c:v", "libx264", "-preset", "ultrafast", str(clip),
    )  # fmt: skip
    monkeypatch.setattr(frame_signal, "MAX_PIXELS", 320 * 180 - 1)
    with pytest.raises(InvalidMediaError, match="320x180 frames"):
        _deep(clip, tmp_path / "out")


_PEAK = """
import resource, sys
from pathlib import Path
from analysis_worker.analysis import PyAVAnalyzer
r = PyAVAnalyzer().deep(Path(sys.argv[1]), Path(sys.argv[2]), lambda f: None, lambda: False)
print(r.frames_decoded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak_mib(clip: Path, out: Path) -> tuple[int, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(clip), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames, peak = proc.stdout.split()
    return int(frames), int(peak)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deep_pass_memory_is_bounded_at_8k(tmp_path: Path) -> None:
    """An 8K clip costs a few frames of 8K in flight, not a queue of them: its peak RSS stays
    within 500 MiB of a 360p clip's (one 7680x4320 yuv420p frame is 47 MiB)."""
    big, small = tmp_path / "8k.mp4", tmp_path / "360p.mp4"
    for clip, size in ((big, "7680x4320"), (small, "640x360")):
        _ffmpeg(
            "-f", "lavfi", "-i", f"testsrc2=s={size}:r=24:d=1",
            "-c:v", "libx264", "-preset", "ultrafast", str(clip),
        )  # fmt: skip
    frames_big, peak_big = _peak_mib(big, tmp_path / "a")
    frames_small, peak_small = _peak_mib(small, tmp_path / "b")

    assert frames_big == frames_small == 24
    assert peak_big - peak_small < 500, (peak_big, peak_small)
