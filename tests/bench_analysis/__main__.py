"""`make bench-analysis` (`python -m tests.bench_analysis`): the deep pass beside its peers.

Generates the clip set (tests/bench_analysis/clips.py) with ffmpeg, then measures in one run, on
the same files: PyAV decode-only (AUTO threads; the floor), our deep pass (and the same pass
with exact decoding, deblocking on), PySceneDetect's ContentDetector and AdaptiveDetector
(OpenCV backend, defaults) and ffmpeg's ``select='gt(scene,0.3)'`` filter. Prints frames/s, the
ratio to decode-only, cut precision/recall/F1, dissolves found, and the quick pass's time to
the first thumbnail and wall time. Every timed tool runs ``--rounds`` times, interleaved, and the
best round counts: the machine is shared, so only same-run ratios mean anything.

Scoring: a detection within ``TOLERANCE`` frames of a true cut is a hit (each true cut matches
once); detections inside a cross-dissolve (± the tolerance) are neither hits nor false
positives for any tool -- the dissolve is scored separately.

``--quick`` (inside `make test`) uses one short 360p clip and one round; its figures prove the
bench runs, not how fast anything is.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av

from analysis_worker.analysis import PyAVAnalyzer
from tests.bench_analysis.clips import Truth, clip_set, generate

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 2
SIZES = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
DEEP = "our deep pass"
DEEP_EXACT = "our deep pass, exact decode"
DECODE = "PyAV decode only (AUTO threads)"
CONTENT = "PySceneDetect ContentDetector"
ADAPTIVE = "PySceneDetect AdaptiveDetector"
FFMPEG = "ffmpeg select=gt(scene,0.3)"


@dataclass
class Detected:
    cuts: list[int]
    dissolves: list[tuple[int, int]] = field(default_factory=list)


Tool = Callable[[Path], Detected]


def decode_only(path: Path) -> Detected:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _frame in container.decode(stream):
            pass
    return Detected([])


def deep(fast: bool) -> Tool:
    analyzer = PyAVAnalyzer(fast_decode=fast)

    def run(path: Path) -> Detected:
        out = Path(tempfile.mkdtemp(prefix="bench-deep-"))
        try:
            r = analyzer.deep(path, out, lambda _f: None, lambda: False)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return Detected(
            [c.frame for c in r.cuts], [(t.start_frame, t.end_frame) for t in r.transitions]
        )

    return run


def scenedetect_tool(kind: str) -> Tool | None:
    try:
        from scenedetect import AdaptiveDetector, ContentDetector, SceneManager, open_video
    except ImportError:
        return None

    def run(path: Path) -> Detected:
        video = open_video(str(path), backend="opencv")
        manager = SceneManager()
        manager.add_detector(AdaptiveDetector() if kind == "adaptive" else ContentDetector())
        manager.detect_scenes(video)
        scenes = manager.get_scene_list()
        return Detected([start.frame_num for start, _end in scenes[1:]])

    return run


_PTS = re.compile(r"pts_time:([0-9.]+)")


def ffmpeg_scene(path: Path) -> Detected:
    proc = subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostats", "-i", str(path), "-vf",
         "select='gt(scene,0.3)',showinfo", "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    fps = 24.0
    return Detected([round(float(m) * fps) for m in _PTS.findall(proc.stderr)])


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    dissolves_found: int = 0
    dissolves: int = 0

    def add(self, truth: Truth, found: Detected) -> None:
        used: set[int] = set()
        for f in found.cuts:
            if any(a - TOLERANCE <= f <= b + TOLERANCE for a, b in truth.dissolves):
                continue
            hit = next((c for c in truth.cuts if abs(c - f) <= TOLERANCE and c not in used), None)
            if hit is None:
                self.fp += 1
            else:
                self.tp += 1
                used.add(hit)
        self.fn += len(truth.cuts) - len(used)
        self.dissolves += len(truth.dissolves)
        for a, b in truth.dissolves:
            as_transition = any(s <= b and e >= a for s, e in found.dissolves)
            self.dissolves_found += as_transition

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def quick_pass(path: Path) -> tuple[float, float]:
    """(seconds to the first thumbnail on disk, quick-pass wall seconds)."""
    out = Path(tempfile.mkdtemp(prefix="bench-quick-"))
    try:
        start = time.time()
        PyAVAnalyzer().quick(path, out)
        wall = time.time() - start
        first = (out / "thumb_00.jpg").stat().st_mtime - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return max(0.0, first), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "analysis")
    parser.add_argument("--sizes", default="360p,720p,1080p")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("ffmpeg is missing: run scripts/ensure_system_deps.sh", file=sys.stderr)
        return 2

    sizes = ["360p"] if args.quick else args.sizes.split(",")
    rounds = 1 if args.quick else args.rounds
    tools: dict[str, Tool | None] = {
        DECODE: decode_only,
        DEEP: deep(True),
        DEEP_EXACT: deep(False),
        CONTENT: scenedetect_tool("content"),
        ADAPTIVE: scenedetect_tool("adaptive"),
        FFMPEG: ffmpeg_scene,
    }
    missing = [name for name, tool in tools.items() if tool is None]
    if missing:
        print("!" * 78)
        print(f"!! NOT MEASURED (pip install -e '.[analysis-bench]'): {', '.join(missing)}")
        print("!" * 78)

    lines: list[dict[str, object]] = []
    pooled: dict[str, Score] = {}
    for size in sizes:
        w, h = SIZES[size]
        clips = [
            (generate(spec, w, h, args.out / size / f"{spec.name}.mp4"), spec.name)
            for spec in clip_set(quick=args.quick)
        ]
        frames = sum(t.frames for t, _ in clips)
        best: dict[str, float] = {}
        scores: dict[str, Score] = {}
        for _ in range(rounds):
            for name, tool in tools.items():
                if tool is None:
                    continue
                score = Score()
                started = time.perf_counter()
                for truth, clip in clips:
                    found = tool(args.out / size / f"{clip}.mp4")
                    score.add(truth, found)
                elapsed = time.perf_counter() - started
                best[name] = min(best.get(name, float("inf")), elapsed)
                scores[name] = score
        quick = [quick_pass(args.out / size / f"{clip}.mp4") for _, clip in clips]
        floor = frames / best[DECODE]
        for name in tools:
            if name not in best:
                lines.append({"size": size, "tool": name, "measured": False})
                continue
            fps = frames / best[name]
            s = scores[name]
            if name != DECODE:
                pooled.setdefault(name, Score())
                for attr in ("tp", "fp", "fn", "dissolves_found", "dissolves"):
                    setattr(pooled[name], attr, getattr(pooled[name], attr) + getattr(s, attr))
            lines.append(
                {
                    "size": size,
                    "tool": name,
                    "measured": True,
                    "frames": frames,
                    "fps": round(fps, 1),
                    "ratio": round(fps / floor, 3),
                    "precision": None if name == DECODE else round(s.precision, 3),
                    "recall": None if name == DECODE else round(s.recall, 3),
                    "f1": None if name == DECODE else round(s.f1, 3),
                    "dissolves": None if name == DECODE else f"{s.dissolves_found}/{s.dissolves}",
                }
            )
        lines.append(
            {
                "size": size,
                "tool": "quick pass",
                "first_thumbnail_s": round(max(q[0] for q in quick), 3),
                "wall_s": round(max(q[1] for q in quick), 3),
            }
        )

    table = render(lines, pooled)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.out / f"results{suffix}.md").write_text(table + "\n")
    (args.out / f"results{suffix}.json").write_text(json.dumps({"lines": lines}, indent=1))
    return 0


def render(lines: list[dict[str, object]], pooled: dict[str, Score]) -> str:
    out = [
        "| clips | tool | frames/s | x decode-only | precision | recall | cut F1 | dissolves |",
        "|---|---|---|---|---|---|---|---|",
    ]
    quick: list[str] = []
    for line in lines:
        if line["tool"] == "quick pass":
            quick.append(f"| {line['size']} | {line['first_thumbnail_s']} s | {line['wall_s']} s |")
            continue
        if not line["measured"]:
            out.append(f"| {line['size']} | {line['tool']} | not measured (not installed) |||||")
            continue
        cells = [
            line["size"], line["tool"], line["fps"], f"{line['ratio']:.2f}",
            line["precision"] if line["precision"] is not None else "—",
            line["recall"] if line["recall"] is not None else "—",
            line["f1"] if line["f1"] is not None else "—",
            line["dissolves"] or "—",
        ]  # fmt: skip
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.append("")
    out.append("| all clips pooled | cut precision | recall | cut F1 | dissolves as transitions |")
    out.append("|---|---|---|---|---|")
    for name, s in pooled.items():
        out.append(
            f"| {name} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | "
            f"{s.dissolves_found}/{s.dissolves} |"
        )
    out.append("")
    out.append("| quick pass (slowest clip) | time to first thumbnail | wall time |")
    out.append("|---|---|---|")
    out.extend(quick)
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
