"""What the OCR stage costs per clip, and how well it finds text: curation/ocr.py on rendered keyframes.

Usage:
    python bench/ocr.py [--clips N] [--per-kind K] [--threads 1,2] [--repeats R] [--json OUT]

Cost: OcrStage is built as a Ray actor builds it (`setup()` once, onnxruntime threads = num_cpus) and called on
staged video records of 3-keyframe clips (454x256 JPEGs, the working size of a 16:9 video), for each thread count:
- clips without text (the hard negatives of tests/text_frames.py: stripes, grids, foliage, brick, shapes, plain):
  detection only runs, as on most clips of a real dump;
- clips with text in every keyframe (subtitles, titles, scene text, credits, watermarks): detection on 3 keyframes
  plus recognition of the lines of the keyframe with the most text (at most ocr.max_lines);
- the same clips with ocr.recognize false (detection only).
The process is pinned to as many CPUs as threads. Per keyframe: the detector alone on one keyframe. Each figure
is given as wall time and as CPU time (all threads of the process): on a loaded machine only the CPU time means
what one free core would take.

Accuracy: over K rendered keyframes of each text and hard-negative kind (tests/text_frames.py), the recall and
precision of "the keyframe has text" and the share of each kind the default text filter drops. With --videos DIR
(e.g. ../shared/videos), 6 frames of every video under DIR, scaled to a 256 px short side and JPEG-compressed as
keyframes are: the largest text_area per video and what was read, to see what real footage measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from text_frames import NEGATIVE_KINDS, POSITIVE_KINDS, rendered_set  # noqa: E402

from curation import schema  # noqa: E402
from curation.config import FilterConfig, OcrConfig  # noqa: E402
from curation.ocr import OcrStage, TextReader, decode_keyframe  # noqa: E402

CLIP_FIELDS = schema.STAGED.field("clips").type.value_type.names
ALL_CPUS = set(os.sched_getaffinity(0))


def staged(keyframes: list[list[bytes]], per_video: int = 8) -> list[pa.Table]:
    """Staged video records of `per_video` clips each, one record per table (the plan's videos_per_batch 1)."""
    tables = []
    for v in range(0, len(keyframes), per_video):
        clips = []
        for c, frames in enumerate(keyframes[v:v + per_video]):
            clip = dict.fromkeys(CLIP_FIELDS)
            clip.update(clip_id=f"v{v}-{c}", video_id=f"v{v}", keyframes=frames, kept=True)
            clips.append(clip)
        video = dict.fromkeys(schema.STAGED.names)
        video.update(video_id=f"v{v}", uri=f"/bench/v{v}.mp4", status="ok", clips=clips)
        tables.append(pa.Table.from_pylist([video], schema=schema.STAGED))
    return tables


def clip_sets(clips: int) -> dict[str, list[list[bytes]]]:
    """Keyframe triples of clips without text and with text in every keyframe."""
    frames = rendered_set(per_kind=max(1, clips), seed=7)
    negatives = [f.jpeg() for f in frames if not f.has_text]
    positives = [f.jpeg() for f in frames if f.has_text]
    return {"no text": [negatives[3 * i:3 * i + 3] for i in range(clips)],
            "text": [positives[3 * i:3 * i + 3] for i in range(clips)]}


def timed(fn, items: list, repeats: int) -> tuple[float, float]:
    """The fastest of `repeats` passes of fn over items: (wall seconds, CPU seconds of every thread of the
    process). On a loaded machine the CPU time is the figure to trust: it is what a core spends, whoever waits."""
    fn(items[0])  # first-call allocations
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def time_stage(config: OcrConfig, tables: list[pa.Table], repeats: int) -> tuple[float, float]:
    stage = OcrStage(config)
    stage.setup()
    return timed(stage, tables, repeats)


def time_keyframe(threads: int, keyframes: list[bytes], repeats: int) -> tuple[float, float]:
    reader = TextReader(OcrConfig(num_cpus=threads))
    wall, cpu = timed(reader.detect, [decode_keyframe(k) for k in keyframes], repeats)
    return wall / len(keyframes), cpu / len(keyframes)


def cost(args) -> list[dict]:
    sets = clip_sets(args.clips)
    rows = []
    for threads in args.threads:
        os.sched_setaffinity(0, set(sorted(ALL_CPUS)[-threads:]))
        wall, cpu = time_keyframe(threads, [k for clip in sets["no text"] for k in clip], args.repeats)
        rows.append({"threads": threads, "case": "one keyframe, detection", "clips": None, "ms": 1000 * wall,
                     "cpu_ms": 1000 * cpu})
        for case, keyframes, recognize in (("clips without text", sets["no text"], True),
                                          ("clips with text, detection + recognition", sets["text"], True),
                                          ("clips with text, detection only", sets["text"], False)):
            config = OcrConfig(num_cpus=threads, recognize=recognize)
            wall, cpu = time_stage(config, staged(keyframes), args.repeats)
            rows.append({"threads": threads, "case": case, "clips": len(keyframes),
                         "ms": 1000 * wall / len(keyframes), "cpu_ms": 1000 * cpu / len(keyframes)})
    for row in rows:
        per = "keyframe" if row["clips"] is None else "clip"
        print(f"{row['threads']} thread(s)  {row['case']:42s} {row['ms']:7.1f} ms wall, {row['cpu_ms']:7.1f} ms CPU "
              f"per {per}", flush=True)
    return rows


def accuracy(args) -> dict:
    os.sched_setaffinity(0, ALL_CPUS)
    reader = TextReader(OcrConfig(num_cpus=max(args.threads)))
    threshold = FilterConfig().text.max
    frames = rendered_set(per_kind=args.per_kind, seed=11)
    area = {f.name: reader.detect(decode_keyframe(f.jpeg())).area for f in frames}
    positives = [f for f in frames if f.has_text]
    true_pos = sum(area[f.name] > 0 for f in positives)
    false_pos = sum(area[f.name] > 0 for f in frames if not f.has_text)
    result = {"frames": len(frames), "recall": true_pos / len(positives),
              "precision": true_pos / max(1, true_pos + false_pos), "threshold": threshold,
              "dropped": {k: statistics.mean(area[f.name] > threshold for f in frames if f.kind == k)
                          for k in POSITIVE_KINDS + NEGATIVE_KINDS},
              "median_area": {k: statistics.median(area[f.name] for f in frames if f.kind == k)
                              for k in POSITIVE_KINDS}}
    print(f"{len(frames)} rendered keyframes: text present recall {result['recall']:.3f}, precision "
          f"{result['precision']:.3f}; dropped by text(max {threshold}): "
          + ", ".join(f"{k} {v:.0%}" for k, v in result["dropped"].items()))
    print("median text_area: " + ", ".join(f"{k} {v:.3f}" for k, v in result["median_area"].items()))
    return result



def real_videos(directory: Path, threads: int) -> list[dict]:
    import av
    import cv2

    reader = TextReader(OcrConfig(num_cpus=threads))
    rows = []
    for path in sorted(p for p in directory.rglob("*") if p.suffix.lower() in (".mp4", ".mkv", ".mov", ".webm")):
        best = {"video": str(path.relative_to(directory)), "text_area": 0.0, "text": "", "frames": 0}
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                step = max(1.0, float(container.duration or 10e6) / 1e6 / 6)
                due = 0.0
                for frame in container.decode(stream):
                    if float(frame.time or 0.0) < due:
                        continue
                    due = float(frame.time or 0.0) + step
                    image = frame.to_ndarray(format="bgr24")
                    scale = 256 / min(image.shape[:2])
                    if scale < 1:
                        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                    image = decode_keyframe(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
                    found = reader.detect(image)
                    best["frames"] += 1
                    if found.area > best["text_area"]:
                        best.update(text_area=found.area, text=reader.read(image, found.boxes))
                    if best["frames"] == 6:
                        break
        except (av.error.FFmpegError, IndexError) as err:
            best["error"] = f"{type(err).__name__}"
        rows.append(best)
        print(f"{best['video']:45s} frames {best['frames']}  max text_area {best['text_area']:.3f}  "
              f"{best['text'][:60]!r} {best.get('error', '')}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="clips per cost case")
    parser.add_argument("--per-kind", type=int, default=20, help="rendered keyframes per kind for accuracy")
    parser.add_argument("--threads", default="1,2", help="onnxruntime thread counts, comma separated")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per case (the fastest is kept)")
    parser.add_argument("--videos", type=Path, help="also measure 6 frames of every video under this folder")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if max(args.threads) > len(ALL_CPUS):
        raise SystemExit(f"--threads {max(args.threads)}: this process may use {len(ALL_CPUS)} CPUs")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    figures = {"cost": cost(args), "accuracy": accuracy(args), "load_average": os.getloadavg()[0]}
    if args.videos:
        figures["videos"] = real_videos(args.videos, max(args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
