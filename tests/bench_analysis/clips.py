"""The benchmark's clip set: ffmpeg lavfi sources joined at known frames (ground truth by
construction).

A clip is a list of shots. Consecutive shots are joined by a hard cut or by a cross-dissolve
(``xfade``), and white flashes of 1-3 frames are painted over chosen frames. Shots are drawn from
sources that are hard for a cut detector: moving test patterns (``testsrc2``), zooms
(``mandelbrot``), high-contrast textures that change everywhere every frame (``life``,
``cellauto``, ``sierpinski``), fast pans (a moving crop of a larger frame) and scrolling
textures. Hue shifts make two shots from one source different shots.

Each source is rendered small and scaled up, so generating 1080p stays cheap; the encoder is
x264 ``veryfast`` with its default GOP and B-frames, so decoding costs what real footage costs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

FPS = 24


@dataclass(frozen=True)
class Shot:
    source: str  # key of SOURCES
    frames: int
    hue: int = 0  # degrees; the same source with another hue is another shot
    join: str = "cut"  # how this shot starts after the previous one: "cut" or "dissolve"
    dissolve: int = 0  # frames of overlap when join == "dissolve"


@dataclass(frozen=True)
class ClipSpec:
    name: str
    shots: tuple[Shot, ...]
    flashes: tuple[tuple[int, int], ...] = ()  # (first frame, length) of white flashes


@dataclass
class Truth:
    """What the clip contains, in output frame numbers."""

    name: str
    frames: int
    fps: int
    cuts: list[int] = field(default_factory=list)  # first frame of each new shot
    dissolves: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of overlap
    flashes: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "frames": self.frames,
            "fps": self.fps,
            "cuts": self.cuts,
            "dissolves": self.dissolves,
            "flashes": self.flashes,
        }


_PALETTE = ("0x3050e0", "0xe0a030", "0x20a060", "0xc03070", "0x80c0e0", "0x604020")


def _src(w: int, h: int, kind: str, seed: int) -> str:
    """A filter chain producing ``w`` x ``h`` yuv420p at FPS (rendered smaller when costly)."""
    lw, lh = max(64, w // 4) // 2 * 2, max(36, h // 4) // 2 * 2
    up = f"scale={w}:{h}:flags=bicubic"
    upn = f"scale={w}:{h}:flags=neighbor"
    if kind == "testsrc2":
        return f"testsrc2=s={w}x{h}:r={FPS}"
    if kind == "mandelbrot":
        return f"mandelbrot=s={lw}x{lh}:r={FPS}:start_scale={2.5 + seed % 3}:end_scale=0.001,{up}"
    if kind == "life":
        return (
            f"life=s={lw}x{lh}:r={FPS}:seed={seed}:ratio=0.3:mold=8:"
            f"life_color=#ffd040:death_color=#202080:mold_color=#106010,{upn}"
        )
    if kind == "cellauto":
        return f"cellauto=s={lw}x{lh}:r={FPS}:rule={(30, 110, 90)[seed % 3]}:seed={seed},{upn}"
    if kind == "sierpinski":
        shape = ("carpet", "triangle")[seed % 2]
        return f"sierpinski=s={lw}x{lh}:r={FPS}:seed={seed}:jump=30:type={shape},{upn}"
    if kind == "pan":  # a fast pan: a moving window over a frame twice as wide
        return f"testsrc2=s={2 * w}x{h}:r={FPS},crop={w}:{h}:x='mod(t*{w // 3},{w})':y=0"
    if kind == "scroll":  # a high-contrast texture scrolling diagonally
        return (
            f"cellauto=s={lw}x{lh}:r={FPS}:rule=150:seed={seed}:scroll=0,"
            f"{upn},scroll=h=0.013:v=0.021"
        )
    if kind == "gradients":
        # Colours and the gradient line given: ffmpeg draws them at random whatever the seed,
        # which made the clip (and what a detector finds in it) change from run to run.
        c0, c1 = _PALETTE[seed % len(_PALETTE)], _PALETTE[(seed + 3) % len(_PALETTE)]
        return (
            f"gradients=s={w}x{h}:r={FPS}:speed=0.05:seed={seed}:c0={c0}:c1={c1}:"
            f"x0={w // 8}:y0={h // 8}:x1={w - w // 8}:y1={h - h // 8}"
        )
    raise ValueError(kind)


SOURCES = ("testsrc2", "mandelbrot", "life", "cellauto", "sierpinski", "pan", "scroll", "gradients")


def clip_set(quick: bool = False) -> list[ClipSpec]:
    """The clips every tool is scored on. ``quick`` keeps the same kinds of events, shorter."""
    if quick:
        return [
            ClipSpec(
                "quick-mix",
                (
                    Shot("testsrc2", 30),
                    Shot("scroll", 30, seed_hue(1)),
                    Shot("life", 30),
                    Shot("mandelbrot", 30, join="dissolve", dissolve=12),
                    Shot("pan", 30),
                ),
                flashes=((12, 2),),
            )
        ]
    return [
        ClipSpec(
            "textures",
            (
                Shot("testsrc2", 60),
                Shot("mandelbrot", 72),
                Shot("life", 48),
                Shot("cellauto", 60),
                Shot("scroll", 72, 40),
                Shot("sierpinski", 60),
                Shot("testsrc2", 48, 120),
                Shot("scroll", 40, 200),
                Shot("life", 60, 180),
                Shot("gradients", 72),
                Shot("cellauto", 50, 90),
            ),
            flashes=((30, 2), (400, 1)),
        ),
        ClipSpec(
            "motion",
            (
                Shot("pan", 72),
                Shot("mandelbrot", 60, 60),
                Shot("pan", 48, 240),
                Shot("sierpinski", 72, 100),
                Shot("scroll", 60),
                Shot("pan", 60, 300),
                Shot("life", 48, 60),
                Shot("testsrc2", 60, 200),
            ),
            flashes=((100, 3), (330, 2)),
        ),
        ClipSpec(
            "dissolves",
            (
                Shot("testsrc2", 60),
                Shot("gradients", 72, join="dissolve", dissolve=24),
                Shot("life", 60),
                Shot("mandelbrot", 72, 120, join="dissolve", dissolve=24),
                Shot("pan", 60),
                Shot("sierpinski", 72, 60, join="dissolve", dissolve=12),
                Shot("testsrc2", 60, 90),
            ),
            flashes=((20, 2),),
        ),
    ]


def seed_hue(k: int) -> int:
    return (k * 67) % 360


def build_filter(spec: ClipSpec, w: int, h: int) -> tuple[str, Truth]:
    parts: list[str] = []
    truth = Truth(spec.name, 0, FPS)
    for k, shot in enumerate(spec.shots):
        chain = _src(w, h, shot.source, seed=k + 1)
        if shot.hue:
            chain += f",hue=h={shot.hue}"
        parts.append(
            f"{chain},format=yuv420p,trim=end_frame={shot.frames},setpts=N/({FPS}*TB),"
            f"settb=1/{FPS}[s{k}]"
        )
    length = spec.shots[0].frames
    current = "s0"
    for k, shot in enumerate(spec.shots[1:], start=1):
        out = f"j{k}"
        if shot.join == "dissolve":
            d = shot.dissolve
            start = length - d
            parts.append(
                f"[{current}][s{k}]xfade=transition=fade:duration={d / FPS}:"
                f"offset={start / FPS},settb=1/{FPS}[{out}]"
            )
            truth.dissolves.append((start, length))
            length += shot.frames - d
        else:
            parts.append(f"[{current}][s{k}]concat=n=2:v=1:a=0,settb=1/{FPS}[{out}]")
            truth.cuts.append(length)
            length += shot.frames
        current = out
    tail = f"[{current}]"
    for first, n in spec.flashes:
        tail += (
            f"drawbox=x=0:y=0:w=iw:h=ih:color=white@1:t=fill:"
            f"enable='between(n,{first},{first + n - 1})',"
        )
        truth.flashes.append((first, first + n))
    parts.append(tail + "null[out]")
    # filter graphs list source chains without an input label
    graph = ";".join(parts)
    truth.frames = length
    return graph, truth


def generate(spec: ClipSpec, w: int, h: int, dest: Path) -> Truth:
    """Write ``dest`` (H.264 mp4) and ``dest``.json (the truth); reuse both when present."""
    graph, truth = build_filter(spec, w, h)
    meta = dest.with_suffix(".json")
    if dest.exists() and meta.exists() and json.loads(meta.read_text()).get("graph") == graph:
        return truth
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg not found: run scripts/ensure_system_deps.sh")
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        ffmpeg, "-v", "error", "-y", "-filter_complex", graph, "-map", "[out]",
        "-frames:v", str(truth.frames), "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
        "-pix_fmt", "yuv420p", "-r", str(FPS), str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed for {dest.name}: {proc.stderr[-2000:]}")
    meta.write_text(json.dumps({"graph": graph, **truth.to_dict()}))
    return truth
