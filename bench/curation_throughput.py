"""Single-core throughput of the curation pass against a decode floor and a naive two-pass baseline.

Usage:
    python bench/curation_throughput.py DIR [--backend decord|pyav] [--long-video-check] [--json OUT]

On the same video files (everything under DIR with a video extension that `probe` accepts) it measures, in one
process, one core:
1. the decode floor: every frame decoded and thrown away, (a) PyAV without pixel conversion, (b) decord, which
   always converts to RGB at native size;
2. the naive two-pass baseline: `scenedetect.detect(path, ContentDetector())` with PySceneDetect's default backend,
   plus a second PyAV decode feeding Farneback on 256 px wide grey frames at 2 fps;
3. the reelforge path: probe + decode_frames at the working size + ShotDetector + MotionScorer, as
   curation/video_stage.py combines them, without clip assembly, keyframes or encoding;
4. for information only, the full `VideoStage.process` (clip assembly, keyframes and clip encoding included);
5. for reference, the reelforge path with the cheap cascade alone (shots.learned=off) and with TransNetV2 scoring
   every frame (shots.learned=everywhere, one CPU thread).
It prints video-seconds per wall-second for each and the ratios against the targets: reelforge >= 0.7 x decode
floor and >= 1.8 x naive two-pass, per core.

`--long-video-check` encodes synthetic 720p videos of 1 and 10 minutes and runs the full `VideoStage.process` on
each in a fresh subprocess, reporting peak RSS and the 10-min / 1-min ratio (target <= 1.3).

See bench/README.md for what the numbers mean.
"""

import os
import sys

# Thread pools are sized when the libraries load, so these must be set before numpy, cv2 or decord are imported.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# PySceneDetect opens the video with OpenCV, whose FFmpeg reader otherwise uses one decoder thread per CPU.
os.environ["OPENCV_FFMPEG_THREADS"] = "1"

ALL_CPUS = sorted(os.sched_getaffinity(0))
PINNED_CPU: int | None = None
if "--no-pin" not in sys.argv:
    # PySceneDetect decodes in a helper thread and decord in its own worker thread: pinning the process to one CPU
    # before any library starts a thread makes wall time a per-core figure for every path alike.
    PINNED_CPU = ALL_CPUS[-1]
    os.sched_setaffinity(0, {PINNED_CPU})

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from fractions import Fraction  # noqa: E402

import av  # noqa: E402
import cv2  # noqa: E402
import decord  # noqa: E402
import numpy as np  # noqa: E402
from naive_two_pass import floor_pyav, naive_flow, naive_scenedetect  # noqa: E402

from curation.config import VIDEO_EXTENSIONS, CurateConfig  # noqa: E402
from curation.decode import (  # noqa: E402
    DecodeFailed,
    VideoInfo,
    VideoRejected,
    decode_frames,
    probe,
)
from curation.motion import MotionScorer  # noqa: E402
from curation.shots import ShotDetector  # noqa: E402
from curation.video_stage import VideoStage, set_frame_sizes  # noqa: E402

cv2.setNumThreads(1)

TARGET_VS_FLOOR = 0.7
TARGET_VS_NAIVE = 1.8
TARGET_RSS_RATIO = 1.3
LONG_VIDEOS = (("1min", 60), ("10min", 600))
LONG_SIZE = (1280, 720)
LONG_FPS = 24
MIB = 1 << 20


def cpu_seconds() -> float:
    """User + system time of the whole process, every thread included (shows any hidden parallelism)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def backend_order(backend: str) -> list[str]:
    """The configured backend first, then the others, as VideoStage falls back on DecodeFailed."""
    return [backend] + [b for b in CurateConfig().decode.backends if b != backend]


# --- the measured paths: each decodes one file and returns the number of frames it decoded -------------------------


def floor_decord(path: str, info: VideoInfo, backend: str) -> int:
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    count = 0
    while True:
        try:
            reader.next()
        except StopIteration:
            break
        count += 1
    return count


def reelforge_path(path: str, info: VideoInfo, backend: str, work_picture: bool = False, learned: str = "") -> int:
    """decode + shots + motion exactly as VideoStage._run_backend feeds them, minus clip assembly and encoding.

    The probe is timed too: VideoStage.process pays it for every video. With `work_picture`, every frame's
    working-size picture is made as well, as VideoStage does for keyframes and clip encoding.
    """
    config = CurateConfig()
    config.shots.learned = learned or config.shots.learned
    info = probe(path, config.decode)
    set_frame_sizes(info, config)
    failures = []
    for name in backend_order(backend):
        shots = ShotDetector(config.shots, info.fps)
        motion = MotionScorer(config.motion, info.fps)
        count = 0
        try:
            for frame in decode_frames(path, info, name, config.decode):
                if motion.wants(frame.index, frame.time_s):
                    motion.push(frame.index, frame.time_s, frame.analysis)
                shots.push(frame.index, frame.analysis)
                if work_picture:
                    frame.rgb  # noqa: B018 - made on first read
                count += 1
        except DecodeFailed as err:
            failures.append(f"{name}: {err}")
            continue
        shots.finish()
        shots.boundaries()
        if failures:
            print(f"  note: {os.path.basename(path)} fell back to {name} ({'; '.join(failures)})", file=sys.stderr)
        return count
    raise DecodeFailed("; ".join(failures))


def reelforge_with_work_picture(path: str, info: VideoInfo, backend: str) -> int:
    """The reelforge path plus the working-size picture of every frame: what VideoStage pays before clip work."""
    return reelforge_path(path, info, backend, work_picture=True)


def reelforge_cheap_only(path: str, info: VideoInfo, backend: str) -> int:
    """The reelforge path with the cheap cascade alone (shots.learned=off): what the verify step adds."""
    return reelforge_path(path, info, backend, learned="off")


def reelforge_learned_everywhere(path: str, info: VideoInfo, backend: str) -> int:
    """The reelforge path with TransNetV2 scoring every frame on one CPU thread (shots.learned=everywhere)."""
    return reelforge_path(path, info, backend, learned="everywhere")


def reelforge_decode_only(path: str, info: VideoInfo, backend: str) -> int:
    """The reelforge path's probe, decode and scaling to the analysis size alone: splits its cost from the analysis."""
    config = CurateConfig()
    info = probe(path, config.decode)
    set_frame_sizes(info, config)
    failures = []
    for name in backend_order(backend):
        try:
            return sum(1 for _ in decode_frames(path, info, name, config.decode))
        except DecodeFailed as err:
            failures.append(f"{name}: {err}")
    raise DecodeFailed("; ".join(failures))


def full_stage(path: str, info: VideoInfo, backend: str) -> int:
    config = CurateConfig()
    config.decode.backends = backend_order(backend)
    config.decode.isolate = False  # the stage's own work, without the sandbox child's start-up per measured call
    stage = VideoStage(config)
    stage.setup()
    row = stage.process(f"bench-{os.path.basename(path)}", path, os.path.getsize(path))
    if row["status"] != "ok":
        raise RuntimeError(f"VideoStage quarantined it: {row['error_class']}: {row['error_message']}")
    return int(row["num_frames"])


@dataclass
class Measurement:
    key: str
    label: str
    parts: list[Callable[[str, VideoInfo, str], int]]
    target: bool = True  # False: reported for information, no target applies
    wall: dict[str, float] = field(default_factory=dict)  # per file: the fastest round
    cpu: dict[str, float] = field(default_factory=dict)  # per file: CPU time of that fastest round
    part_wall: dict[str, list[float]] = field(default_factory=dict)
    frames: dict[str, int] = field(default_factory=dict)


def measurements(backend: str, with_full_stage: bool) -> list[Measurement]:
    out = [
        Measurement("floor_pyav", "decode floor, PyAV (no pixel conversion)", [floor_pyav]),
        Measurement("floor_decord", "decode floor, decord (RGB at native size)", [floor_decord]),
        Measurement("naive", "naive two-pass: scenedetect.detect + PyAV/Farneback 2 fps",
                    [naive_scenedetect, naive_flow]),
        Measurement("reelforge", f"reelforge decode+shots+motion ({backend})", [reelforge_path]),
    ]
    # Diagnostics: no target applies, they show where the reelforge path's time goes.
    out.append(Measurement("reelforge_decode", f"  diagnostic: reelforge probe+decode_frames only ({backend})",
                           [reelforge_decode_only], target=False))
    out.append(Measurement("reelforge_work", f"  info: reelforge + working-size picture per frame ({backend})",
                           [reelforge_with_work_picture], target=False))
    out.append(Measurement("reelforge_cheap", f"  info: reelforge, cheap cascade alone, shots.learned=off ({backend})",
                           [reelforge_cheap_only], target=False))
    out.append(Measurement("reelforge_everywhere",
                           f"  reference: reelforge, TransNetV2 on every frame, learned=everywhere ({backend})",
                           [reelforge_learned_everywhere], target=False))
    if with_full_stage:
        out.append(Measurement("full_stage", f"info: full VideoStage.process incl. clips+keyframes+encode ({backend})",
                               [full_stage], target=False))
    return out


# --- the throughput run ----------------------------------------------------------------------------------------------


def find_videos(root: str) -> tuple[list[tuple[str, VideoInfo]], list[tuple[str, str]]]:
    extensions = tuple(e.lower() for e in VIDEO_EXTENSIONS)
    paths = []
    for dirpath, _, names in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in names if n.lower().endswith(extensions) and not n.startswith(".")]
    accepted, skipped = [], []
    for path in sorted(paths):
        try:
            accepted.append((path, probe(path, CurateConfig().decode)))
        except VideoRejected as err:
            skipped.append((path, err.reason))
    return accepted, skipped


def video_seconds(info: VideoInfo) -> float:
    if info.duration_s:
        return info.duration_s
    return info.num_frames / info.fps if info.fps > 0 else 0.0


def run_throughput(root: str, backend: str, repeats: int, with_full_stage: bool) -> dict:
    videos, skipped = find_videos(root)
    if not videos:
        raise SystemExit(f"no video under {root} passes probe()")
    items = measurements(backend, with_full_stage)
    failed: dict[str, str] = {}
    # Interleaved rounds: every measurement runs over every file before the next round starts, so slow drift
    # (other processes, CPU clocks) hits all measurements alike; per file the fastest round is kept.
    for round_no in range(repeats):
        for m in items:
            for path, info in videos:
                if path in failed:
                    continue
                walls, total_cpu, frames = [], 0.0, 0
                try:
                    for part in m.parts:
                        start_wall, start_cpu = time.perf_counter(), cpu_seconds()
                        frames = max(frames, part(path, info, backend))
                        walls.append(time.perf_counter() - start_wall)
                        total_cpu += cpu_seconds() - start_cpu
                except Exception as err:  # noqa: BLE001 - one file a path cannot read is dropped from all paths
                    failed[path] = f"{m.key}: {type(err).__name__}: {err}"
                    print(f"  dropping {path}: {failed[path]}", file=sys.stderr)
                    continue
                wall = sum(walls)
                if path not in m.wall or wall < m.wall[path]:
                    m.wall[path], m.cpu[path], m.part_wall[path], m.frames[path] = wall, total_cpu, walls, frames
            print(f"  round {round_no + 1}/{repeats}: {m.key} done", file=sys.stderr)
    used = [(p, i) for p, i in videos if p not in failed]
    if not used:
        raise SystemExit("every file failed in some path")
    total_video = sum(video_seconds(i) for _, i in used)

    figures = {}
    for m in items:
        wall = sum(m.wall[p] for p, _ in used)
        cpu = sum(m.cpu[p] for p, _ in used)
        entry = {
            "label": m.label,
            "target_applies": m.target,
            "wall_s": wall,
            "cpu_s": cpu,
            "video_s_per_wall_s": total_video / wall,
            "cpu_per_wall": cpu / wall,
            "per_file": {
                os.path.basename(p): {"wall_s": m.wall[p], "video_s_per_wall_s": video_seconds(i) / m.wall[p],
                                      "frames": m.frames[p]}
                for p, i in used
            },
        }
        if len(m.parts) > 1:
            entry["parts_wall_s"] = {part.__name__: sum(m.part_wall[p][k] for p, _ in used)
                                     for k, part in enumerate(m.parts)}
        figures[m.key] = entry

    speed = {k: v["video_s_per_wall_s"] for k, v in figures.items()}
    ratios = {
        "reelforge_vs_floor_pyav": {"value": speed["reelforge"] / speed["floor_pyav"], "target_min": TARGET_VS_FLOOR},
        "reelforge_vs_floor_decord": {"value": speed["reelforge"] / speed["floor_decord"],
                                      "target_min": TARGET_VS_FLOOR},
        "reelforge_vs_naive": {"value": speed["reelforge"] / speed["naive"], "target_min": TARGET_VS_NAIVE},
    }
    ratios["reelforge_vs_own_decode"] = {"value": speed["reelforge"] / speed["reelforge_decode"], "target_min": None}
    ratios["reelforge_cheap_vs_floor_pyav"] = {"value": speed["reelforge_cheap"] / speed["floor_pyav"],
                                               "target_min": None}
    ratios["reelforge_everywhere_vs_floor_pyav"] = {"value": speed["reelforge_everywhere"] / speed["floor_pyav"],
                                                    "target_min": None}
    ratios["reelforge_work_vs_floor_pyav"] = {"value": speed["reelforge_work"] / speed["floor_pyav"],
                                              "target_min": None}
    if "full_stage" in speed:
        ratios["full_stage_vs_floor_pyav"] = {"value": speed["full_stage"] / speed["floor_pyav"], "target_min": None}
        ratios["full_stage_vs_naive"] = {"value": speed["full_stage"] / speed["naive"], "target_min": None}
    # The same ratios by process CPU time: on a machine other work shares, wall time counts the waits for a CPU
    # while CPU time counts only this process's work (compare them: equal when the pinned CPU was free).
    cpu_speed = {k: total_video / v["cpu_s"] for k, v in figures.items()}
    for key, (a, b) in {"reelforge_vs_floor_pyav_by_cpu": ("reelforge", "floor_pyav"),
                        "reelforge_cheap_vs_floor_pyav_by_cpu": ("reelforge_cheap", "floor_pyav"),
                        "reelforge_everywhere_vs_floor_pyav_by_cpu": ("reelforge_everywhere", "floor_pyav")}.items():
        ratios[key] = {"value": cpu_speed[a] / cpu_speed[b], "target_min": None}
    for r in ratios.values():
        r["meets_target"] = None if r["target_min"] is None else r["value"] >= r["target_min"]
    return {
        "dir": os.path.abspath(root),
        "backend": backend,
        "repeats": repeats,
        "timing": "interleaved rounds; per (measurement, file) the fastest round is kept",
        "files": [{"path": p, "width": i.width, "height": i.height, "fps": i.fps, "duration_s": video_seconds(i),
                   "codec": i.codec} for p, i in used],
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "failed": [{"path": p, "error": e} for p, e in failed.items()],
        "video_seconds": total_video,
        "measurements": figures,
        "ratios": ratios,
    }


def print_throughput(result: dict) -> None:
    print(f"\n== curation throughput, one core: {result['dir']}")
    print(f"files: {len(result['files'])} measured, {len(result['skipped'])} rejected by probe, "
          f"{len(result['failed'])} dropped after a failure; {result['video_seconds']:.1f} video-seconds in all")
    for f in result["files"]:
        print(f"  {os.path.basename(f['path'])}: {f['width']}x{f['height']} {f['fps']:.2f} fps "
              f"{f['duration_s']:.1f} s {f['codec']}")
    for f in result["skipped"]:
        print(f"  skipped {f['path']}: {f['reason']}")
    print(f"timing: {result['timing']} ({result['repeats']} rounds)")
    print(f"\n{'measurement':<72} {'wall s':>7} {'cpu s':>7} {'video-s/wall-s':>15} {'cpu/wall':>9}")
    for m in result["measurements"].values():
        print(f"{m['label']:<72} {m['wall_s']:>7.2f} {m['cpu_s']:>7.2f} {m['video_s_per_wall_s']:>15.2f} "
              f"{m['cpu_per_wall']:>9.2f}")
        for part, wall in m.get("parts_wall_s", {}).items():
            print(f"    of which {part:<60} {wall:>7.2f}")
    names = list(result["measurements"])
    print(f"\nper file, video-s/wall-s:\n{'file':<28}" + "".join(f"{n:>17}" for n in names))
    for f in result["files"]:
        base = os.path.basename(f["path"])
        print(f"{base[:27]:<28}" + "".join(
            f"{result['measurements'][n]['per_file'][base]['video_s_per_wall_s']:>17.2f}" for n in names))
    print("\nratios of throughput (video-s per wall-s, one core):")
    for key, r in result["ratios"].items():
        verdict = "" if r["target_min"] is None else (
            f"target >= {r['target_min']}: " + ("met" if r["meets_target"] else "MISSED"))
        print(f"  {key:<28} {r['value']:6.2f}   {verdict}")


# --- the long-video memory check -------------------------------------------------------------------------------------


def make_long_video(path: str, seconds: int) -> None:
    """Deterministic 720p test video: panning striped backgrounds, two moving shapes, a hard cut every few seconds.

    The cuts make VideoStage open, encode and close clips all along the video, the path whose memory must not grow
    with the video's length.
    """
    width, height = LONG_SIZE
    scene_lengths = [5, 7, 4, 9, 6, 8]  # seconds; cycled
    pan_max = 8 * width  # pixels of background a scene may pan over
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(LONG_FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # x264's output depends on its thread count, which defaults to the CPUs it sees: fix it for identical bytes.
        stream.options = {"preset": "ultrafast", "crf": "23", "threads": "4"}
        frame_no, scene, total = 0, 0, seconds * LONG_FPS
        while frame_no < total:
            rng = np.random.default_rng(scene)
            length = scene_lengths[scene % len(scene_lengths)] * LONG_FPS
            # One precomputed wide background per scene; each frame is a window into it, so the pan is nearly free.
            columns = np.arange(width + pan_max, dtype=np.float32)
            period = float(rng.uniform(40, 160))
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * columns / period)
            ramp = np.linspace(0.3, 1.0, height, dtype=np.float32)[:, None]
            colours = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
            mix = (ramp * stripes[None, :])[..., None]
            background = (colours[0] * (1 - mix) + colours[1] * mix).astype(np.uint8)
            pan = float(rng.choice([0.0, 2.0, 5.0]))  # px per frame; some scenes hold still
            pos = rng.uniform([0, 0, 0, 0], [width - 200, height - 200, width - 120, height - 120])
            vel = rng.uniform(-9, 9, size=4)
            rect_colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            disc_colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            for k in range(min(length, total - frame_no)):
                offset = int(pan * k) % pan_max
                rgb = np.ascontiguousarray(background[:, offset:offset + width])
                pos = pos + vel
                for axis, limit in ((0, width - 200), (1, height - 200), (2, width - 120), (3, height - 120)):
                    if not 0 <= pos[axis] <= limit:
                        vel[axis] = -vel[axis]
                        pos[axis] = min(max(pos[axis], 0), limit)
                x, y = int(pos[0]), int(pos[1])
                cv2.rectangle(rgb, (x, y), (x + 200, y + 140), rect_colour, -1)
                cv2.circle(rgb, (int(pos[2]) + 60, int(pos[3]) + 60), 60, disc_colour, -1)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = frame_no
                for packet in stream.encode(frame):
                    container.mux(packet)
                frame_no += 1
            scene += 1
        for packet in stream.encode():
            container.mux(packet)


def proc_status_mib(field_name: str) -> float:
    """A field of /proc/self/status in MiB (VmRSS: now, VmHWM: this process image's own peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0), best effort.

    Linux carries the parent's high-water mark into a child's ru_maxrss across fork + exec, so a bulky parent
    would set a floor under the child's figure.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_child(path: str, backend: str) -> None:
    """Runs in a fresh process: the full VideoStage on one video, then its peak RSS as one JSON line on stdout."""
    maxrss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    rss_after_imports = proc_status_mib("VmRSS")
    config = CurateConfig()
    config.decode.backends = backend_order(backend)
    config.decode.isolate = False  # this process is the sandbox: its RSS is the decoding process's RSS
    stage = VideoStage(config)
    stage.setup()
    start = time.perf_counter()
    row = stage.process(f"rss-{os.path.basename(path)}", path, os.path.getsize(path))
    wall = time.perf_counter() - start
    clips = row.get("clips") or []
    print(json.dumps({
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vm_hwm_mib": proc_status_mib("VmHWM"),
        "ru_maxrss_at_start_mib": maxrss_at_start,
        "rss_after_imports_mib": rss_after_imports,
        "status": row["status"],
        "error": row.get("error_message"),
        "backend": row.get("backend"),
        "num_frames": row.get("num_frames"),
        "duration_s": row.get("duration_s"),
        "clips": len(clips),
        "kept_clips": sum(1 for c in clips if c["kept"]),
        "encoded_mib": sum(len(c["video_bytes"] or b"") for c in clips) / MIB,
        "keyframe_mib": sum(len(k) for c in clips for k in c["keyframes"]) / MIB,
        "wall_s": wall,
        "torch_imported": "torch" in sys.modules,
    }))


def run_child(args: list[str]) -> str:
    cmd = [sys.executable, os.path.abspath(__file__), *args] + (["--no-pin"] if PINNED_CPU is None else [])
    reset_peak_rss()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def run_long_video_check(backend: str, video_dir: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="reelforge-long-") as tmp:
        where = video_dir or tmp
        os.makedirs(where, exist_ok=True)
        results = {}
        for name, seconds in LONG_VIDEOS:
            path = os.path.join(where, f"synthetic_720p_{name}.mp4")
            if not os.path.exists(path):
                start = time.perf_counter()
                # In a child, so this process's own peak RSS stays small (see reset_peak_rss).
                run_child(["--_generate", path + ".part.mp4", str(seconds)])
                os.replace(path + ".part.mp4", path)
                print(f"  generated {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            # A fresh interpreter per video, so one run's peak cannot hide inside the other's.
            child = json.loads(run_child(["--_rss-child", path, "--backend", backend]).strip().splitlines()[-1])
            child.update(path=path, file_mib=os.path.getsize(path) / MIB, video_seconds=seconds)
            results[name] = child
            print(f"  {name}: peak RSS {child['peak_rss_mib']:.0f} MiB in {child['wall_s']:.0f} s", file=sys.stderr)
    short, long = results["1min"], results["10min"]
    ratio = long["peak_rss_mib"] / short["peak_rss_mib"]
    return {
        "backend": backend, "size": list(LONG_SIZE), "fps": LONG_FPS, "videos": results,
        "peak_rss_ratio_10min_vs_1min": ratio, "target_max": TARGET_RSS_RATIO,
        "meets_target": ratio <= TARGET_RSS_RATIO,
        "vm_hwm_ratio_10min_vs_1min": long["vm_hwm_mib"] / short["vm_hwm_mib"],
        "growth_above_imports_ratio": (long["peak_rss_mib"] - long["rss_after_imports_mib"]) / max(
            1e-9, short["peak_rss_mib"] - short["rss_after_imports_mib"]),
    }


def print_long_video_check(result: dict) -> None:
    print(f"\n== long-video memory check: full VideoStage(CurateConfig()).process, 720p {result['fps']} fps, "
          f"backend {result['backend']}, one fresh subprocess per video")
    print(f"{'video':<7} {'file MiB':>9} {'frames':>7} {'clips':>6} {'kept':>5} {'encoded MiB':>12} "
          f"{'RSS after imports':>18} {'peak RSS MiB':>13} {'VmHWM MiB':>10} {'wall s':>7} {'video-s/wall-s':>15}")
    for name, v in result["videos"].items():
        print(f"{name:<7} {v['file_mib']:>9.1f} {v['num_frames'] or 0:>7} {v['clips']:>6} {v['kept_clips']:>5} "
              f"{v['encoded_mib']:>12.1f} {v['rss_after_imports_mib']:>18.0f} {v['peak_rss_mib']:>13.0f} "
              f"{v['vm_hwm_mib']:>10.0f} {v['wall_s']:>7.1f} {v['video_seconds'] / v['wall_s']:>15.2f}")
        if v["status"] != "ok":
            print(f"        status {v['status']}: {v['error']}")
        if v["ru_maxrss_at_start_mib"] > 1.05 * v["rss_after_imports_mib"] + 8:
            print(f"        note: ru_maxrss started at {v['ru_maxrss_at_start_mib']:.0f} MiB (the parent's peak)")
    verdict = "met" if result["meets_target"] else "MISSED"
    print(f"peak RSS (ru_maxrss) 10min / 1min = {result['peak_rss_ratio_10min_vs_1min']:.2f}   "
          f"target <= {result['target_max']}: {verdict}")
    print(f"VmHWM 10min / 1min = {result['vm_hwm_ratio_10min_vs_1min']:.2f}; growth above the post-import RSS, "
          f"10min / 1min = {result['growth_above_imports_ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", help="directory searched recursively for video files")
    parser.add_argument("--backend", choices=["decord", "pyav"], default=CurateConfig().decode.backends[0],
                        help="decode backend of the reelforge path (the other one is the fallback, as in VideoStage)")
    parser.add_argument("--long-video-check", action="store_true",
                        help="peak RSS of the full VideoStage on synthetic 1-min and 10-min 720p videos")
    parser.add_argument("--long-video-dir", help="keep (and reuse) the synthetic videos here instead of a temp dir")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest per file is kept")
    parser.add_argument("--no-full-stage", action="store_true", help="skip the informational full VideoStage number")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    parser.add_argument("--_rss-child", dest="rss_child", help=argparse.SUPPRESS)
    parser.add_argument("--_generate", dest="generate", nargs=2, metavar=("PATH", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.rss_child:
        rss_child(args.rss_child, args.backend)
        return
    if args.generate:
        # Generation is not measured: let the encoder's threads use every CPU.
        os.sched_setaffinity(0, ALL_CPUS)
        make_long_video(args.generate[0], int(args.generate[1]))
        return
    if not args.dir and not args.long_video_check:
        parser.error("give DIR, --long-video-check, or both")

    out: dict = {
        "environment": {
            "pinned_cpu": PINNED_CPU, "cpus_available": len(ALL_CPUS),
            "omp_num_threads": os.environ["OMP_NUM_THREADS"],
            "opencv_threads": cv2.getNumThreads(), "python": sys.version.split()[0], "av": av.__version__,
            "decord": decord.__version__, "scenedetect": importlib.metadata.version("scenedetect"),
            "opencv": cv2.__version__,
        },
    }
    pinned = f"pinned to CPU {PINNED_CPU}" if PINNED_CPU is not None else "not pinned"
    print(f"{pinned} of {len(ALL_CPUS)}; OMP_NUM_THREADS=1, cv2 threads {cv2.getNumThreads()}, decoder threads 1")
    # The memory check goes first, while this process is still small: a child's ru_maxrss starts at our RSS.
    if args.long_video_check:
        out["long_video_check"] = run_long_video_check(args.backend, args.long_video_dir)
        print_long_video_check(out["long_video_check"])
    if args.dir:
        out["throughput"] = run_throughput(args.dir, args.backend, max(1, args.repeats), not args.no_full_stage)
        print_throughput(out["throughput"])
    out["environment"]["torch_imported"] = "torch" in sys.modules
    if out["environment"]["torch_imported"]:
        # Expected: the TransNetV2 rows (and the verify step, on a candidate it is unsure of) run torch, with one
        # thread (curation.transnet.load_transnet sets it) on the one pinned CPU.
        import torch

        print(f"note: torch got imported (TransNetV2), {torch.get_num_threads()} thread(s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
