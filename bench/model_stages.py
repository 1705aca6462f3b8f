"""Throughput of the learned-model stages per worker: clips per second of CaptionStage and ClipScoreStage.

Usage:
    python bench/model_stages.py [--clips N] [--mid-clips N] [--large-clips N] [--clips-per-video K]
        [--videos-per-batch V] [--repeats R] [--large] [--device cpu|cuda] [--precision fp32|fp16|bf16]
        [--threads T] [--no-pin] [--json OUT]

Each case builds one stage exactly as a Ray actor would (`setup()` once), then feeds it staged video records of
K clips each, V records per call (the plan's `videos_per_batch`), and times the calls. Keyframes are synthetic
454x256 JPEGs (the working size of a 16:9 video), three per clip as VideoStage writes them. Cases:
- CaptionStage with the tiny random CoCa (the embedded default) and a random-init coca_ViT-B-32 (mid-size);
  no clip has a sidecar, so every clip is captioned; and the sidecar-only path (every video has a .json sidecar);
- ClipScoreStage with the tiny random CLIP + head (the embedded default) and a random-init ViT-B-32;
- with --large, the production architectures with random weights: coca_ViT-L-14 and ViT-L-14;
- the CPU side alone: JPEG decode + open_clip's 224 px eval transform of 3 keyframes, the per-clip CPU work of a
  ClipScoreStage actor with the real models, whatever its GPU does.
Random weights cost the same FLOPs as trained ones, except that a random CoCa rarely ends a caption early: its
captions run to max_tokens (30), a worst case (trained CoCa captions end after ~10-15 tokens).

By default the process is pinned to one CPU with one torch thread, so the figures are per worker per core.
"""

import os
import sys

THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
# Thread pools are sized when the libraries load, so these go before torch is imported.
os.environ["OMP_NUM_THREADS"] = THREADS
os.environ["MKL_NUM_THREADS"] = THREADS
ALL_CPUS = sorted(os.sched_getaffinity(0))
PINNED = None
if "--no-pin" not in sys.argv:
    PINNED = set(ALL_CPUS[-int(THREADS):])
    os.sched_setaffinity(0, PINNED)

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from curation import schema  # noqa: E402
from curation.captions import CaptionStage  # noqa: E402
from curation.clip_scores import ClipScoreStage  # noqa: E402
from curation.config import CaptionConfig, ClipScoreConfig  # noqa: E402

KEYFRAME_SIZE = (454, 256)


def keyframe(rng: np.random.Generator) -> bytes:
    """A smooth random picture (upscaled noise plus a gradient): JPEG-compresses like real frames, not like noise."""
    small = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(KEYFRAME_SIZE, Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_videos(directory: Path, clips: int, per_video: int, sidecars: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    clip_fields = schema.STAGED.field("clips").type.value_type.names
    videos = []
    for v in range((clips + per_video - 1) // per_video):
        uri = directory / f"video{v:04d}.mp4"
        n = min(per_video, clips - v * per_video)
        rows = []
        for c in range(n):
            row = {name: None for name in clip_fields}
            row.update(clip_id=f"v{v}-{c}", video_id=f"v{v}", start_s=4.0 * c, end_s=4.0 * c + 4.0, kept=True,
                       keyframes=[keyframe(rng) for _ in range(3)])
            rows.append(row)
        if sidecars:
            segments = [{"start_s": r["start_s"], "end_s": r["end_s"], "caption": f"shot {i}"} for i, r in
                        enumerate(rows)]
            uri.with_suffix(".json").write_text(json.dumps({"caption": "a video", "segments": segments}))
        video = {name: None for name in schema.STAGED.names}
        video.update(video_id=f"v{v}", uri=str(uri), status="ok", clips=rows)
        videos.append(video)
    return videos


def cases(large: bool) -> list[tuple[str, str, str, object, bool]]:
    """(stage, size, what, settings, with sidecars); size picks the clip count: --clips, --mid-clips, --large-clips."""
    out = [
        ("CaptionStage", "tiny", "tiny CoCa, random init (embedded default)", CaptionConfig(model_name="tiny"), False),
        ("CaptionStage", "mid", "coca_ViT-B-32, random init", CaptionConfig(model_name="coca_ViT-B-32"), False),
        ("CaptionStage", "tiny", "sidecar captions only (captioner off)", CaptionConfig(enabled=False), True),
        ("ClipScoreStage", "tiny", "tiny CLIP + head, random init (embedded default)",
         ClipScoreConfig(model_name="tiny"), False),
        ("ClipScoreStage", "mid", "ViT-B-32 + head, random init", ClipScoreConfig(model_name="ViT-B-32"), False),
    ]
    if large:
        out += [
            ("CaptionStage", "large", "coca_ViT-L-14, random init", CaptionConfig(model_name="coca_ViT-L-14"),
             False),
            ("ClipScoreStage", "large", "ViT-L-14 + head, random init", ClipScoreConfig(model_name="ViT-L-14"),
             False),
        ]
    return out


def run_case(stage_name: str, size: str, what: str, settings, sidecars: bool, args, directory: Path) -> dict:
    settings.pretrained = None
    settings.device, settings.precision, settings.num_cpus = args.device, args.precision, float(args.threads)
    settings.videos_per_batch = args.videos_per_batch
    clips = {"tiny": args.clips, "mid": args.mid_clips, "large": args.large_clips}[size]
    directory.mkdir()
    videos = make_videos(directory, clips, args.clips_per_video, sidecars)
    batches = [pa.Table.from_pylist(videos[i : i + args.videos_per_batch], schema=schema.STAGED)
               for i in range(0, len(videos), args.videos_per_batch)]
    stage = (CaptionStage if stage_name == "CaptionStage" else ClipScoreStage)(settings)
    start = time.perf_counter()
    stage.setup()
    load_s = time.perf_counter() - start
    warm = dict(videos[0], clips=videos[0]["clips"][:1])
    stage(pa.Table.from_pylist([warm], schema=schema.STAGED))  # first-call allocations, lazy init
    best = float("inf")
    result = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = [stage(b) for b in batches]
        best = min(best, time.perf_counter() - start)
    out_clips = [c for table in result for v in table.to_pylist() for c in v["clips"]]
    row = {"stage": stage_name, "what": what, "clips": len(out_clips), "wall_s": best, "load_s": load_s,
           "clips_per_s": len(out_clips) / best, "ms_per_clip": 1000 * best / len(out_clips),
           "batch_size": settings.batch_size, "videos_per_batch": settings.videos_per_batch}
    captioner = getattr(stage, "captioner", None)
    if captioner is not None:
        tokenizer = captioner.loaded.tokenizer
        row["tokens_per_caption"] = float(np.mean([len(tokenizer.encode(c["caption"])) for c in out_clips]))
    report(row)
    return row


def run_cpu_side(args) -> dict:
    """JPEG decode + open_clip's eval transform at 224 px (ViT-B/32, ViT-L/14) of 3 keyframes: the CPU work of a
    ClipScoreStage actor per clip whatever the GPU does (CaptionStage does it for 1 keyframe)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(size=224), is_train=False)
    rng = np.random.default_rng(1)
    keyframes = [[keyframe(rng) for _ in range(3)] for _ in range(args.clips)]
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for clip in keyframes:
            torch.stack([preprocess(Image.open(io.BytesIO(k)).convert("RGB")) for k in clip])
        best = min(best, time.perf_counter() - start)
    row = {"stage": "CPU side", "what": "3 keyframes: JPEG decode + preprocess to 224 px (no model)",
           "clips": args.clips, "wall_s": best, "load_s": 0.0, "clips_per_s": args.clips / best,
           "ms_per_clip": 1000 * best / args.clips}
    report(row)
    return row


def report(row: dict) -> None:
    print(f"  {row['stage']:<15} {row['what']:<58} {row['clips_per_s']:>8.2f} clips/s {row['ms_per_clip']:>9.1f} "
          f"ms/clip  (load {row['load_s']:.1f} s)", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64, help="clips per case with the tiny models")
    parser.add_argument("--mid-clips", type=int, default=16, help="clips per case with the ViT-B/32 models")
    parser.add_argument("--large-clips", type=int, default=8, help="clips per case with the --large models")
    parser.add_argument("--clips-per-video", type=int, default=8)
    parser.add_argument("--videos-per-batch", type=int, default=1, help="staged records per stage call")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes; the fastest is kept")
    parser.add_argument("--large", action="store_true", help="also the production architectures (random init)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", default="1", help="torch threads (and pinned CPUs) per worker")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to CPUs")
    parser.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the untrained-weights warnings are expected here
    print(f"pinned to CPUs {sorted(PINNED) if PINNED else 'none'} of {len(ALL_CPUS)}; torch threads "
          f"{torch.get_num_threads()}; device {args.device}, {args.precision}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (stage_name, size, what, settings, sidecars) in enumerate(cases(args.large)):
            rows.append(run_case(stage_name, size, what, settings, sidecars, args, Path(tmp) / f"case{i}"))
    rows.append(run_cpu_side(args))
    print("\n| stage | model | clips/s per worker | ms per clip | model load s |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        tokens = f" ({r['tokens_per_caption']:.0f} tokens/caption)" if "tokens_per_caption" in r else ""
        print(f"| {r['stage']} | {r['what']}{tokens} | {r['clips_per_s']:.2f} | {r['ms_per_clip']:.1f} | "
              f"{r['load_s']:.1f} |")
    if args.json:
        env = {"pinned_cpus": sorted(PINNED) if PINNED else None, "cpus": len(ALL_CPUS), "threads": args.threads,
               "torch": torch.__version__, "device": args.device, "precision": args.precision}
        Path(args.json).write_text(json.dumps({"environment": env, "cases": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
