"""Throughput of the learned-model stages per worker: clips per second of CaptionStage and ClipScoreStage.

Usage:
    python bench/model_stages.py [--clips N] [--mid-clips N] [--large-clips N] [--clips-per-video K]
        [--videos-per-batch V] [--repeats R] [--large] [--large-only] [--caption-clips N] [--score-batch B]
        [--caption-batch B] [--device cpu|cuda] [--precision fp32|fp16|bf16] [--threads T] [--no-pin] [--json OUT]

Each case builds one stage exactly as a Ray actor would (`setup()` once), then feeds it staged video records of
K clips each, V records per call (the plan's `videos_per_batch`), and times the calls. Keyframes are synthetic
454x256 JPEGs (the working size of a 16:9 video), three per clip as VideoStage writes them. Cases:
- CaptionStage with the tiny random CoCa (the embedded default) and a random-init coca_ViT-B-32 (mid-size);
  no clip has a sidecar, so every clip is captioned; and the sidecar-only path (every video has a .json sidecar);
- ClipScoreStage with the tiny random CLIP + head (the embedded default) and a random-init ViT-B-32;
- with --large, the production architectures with random weights: coca_ViT-L-14 and ViT-L-14, each model loaded
  once and run in variants: keyframes through open_clip's PIL transform on the CPU (`preprocess: pil`, the old path)
  or decoded and preprocessed as one batch on the model's device (`preprocess: tensor`), and CoCa with and without
  the KV cache (`kv_cache`); --large-only skips the tiny and mid-size cases (the GPU command);
- the preprocessing alone, no model, of 3 keyframes a clip: JPEG decode + open_clip's 224 px eval transform per
  image with PIL (the per-clip CPU work of the old path), and the batched tensor path on the CPU and on --device.
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


# Variants run on one loaded stage: (label, settings of stage.config, settings of stage.captioner).
PIL_PATH = ("PIL preprocess on CPU", {"preprocess": "pil"}, {})
TENSOR_PATH = ("batched preprocess on device", {"preprocess": "tensor"}, {})
CAPTION_VARIANTS = [
    ("PIL preprocess, no KV cache (old path)", {"preprocess": "pil"}, {"kv_cache": False}),
    ("batched preprocess, no KV cache", {"preprocess": "tensor"}, {"kv_cache": False}),
    ("batched preprocess, KV cache", {"preprocess": "tensor"}, {"kv_cache": True}),
]


def cases(large: bool, large_only: bool) -> list[tuple[str, str, str, object, bool, list]]:
    """(stage, size, what, settings, with sidecars, variants); size picks the clip count: --clips, --mid-clips,
    --large-clips, --caption-clips."""
    out = [] if large_only else [
        ("CaptionStage", "tiny", "tiny CoCa, random init (embedded default)", CaptionConfig(model_name="tiny"), False,
         [CAPTION_VARIANTS[0], CAPTION_VARIANTS[2]]),
        ("CaptionStage", "mid", "coca_ViT-B-32, random init", CaptionConfig(model_name="coca_ViT-B-32"), False,
         [CAPTION_VARIANTS[0], CAPTION_VARIANTS[2]]),
        ("CaptionStage", "tiny", "sidecar captions only (captioner off)", CaptionConfig(enabled=False), True,
         [("", {}, {})]),
        ("ClipScoreStage", "tiny", "tiny CLIP + head, random init (embedded default)",
         ClipScoreConfig(model_name="tiny"), False, [PIL_PATH, TENSOR_PATH]),
        ("ClipScoreStage", "mid", "ViT-B-32 + head, random init", ClipScoreConfig(model_name="ViT-B-32"), False,
         [PIL_PATH, TENSOR_PATH]),
    ]
    if large or large_only:
        out += [
            ("ClipScoreStage", "large", "ViT-L-14 + head, random init", ClipScoreConfig(model_name="ViT-L-14"),
             False, [PIL_PATH, TENSOR_PATH]),
            ("CaptionStage", "caption", "coca_ViT-L-14, random init", CaptionConfig(model_name="coca_ViT-L-14"),
             False, CAPTION_VARIANTS),
        ]
    return out


def run_case(stage_name: str, size: str, what: str, settings, sidecars: bool, variants: list, args,
             directory: Path) -> list[dict]:
    """One stage, set up once, timed in each variant on the same records; a row per variant."""
    settings.pretrained = None
    settings.device, settings.precision, settings.num_cpus = args.device, args.precision, float(args.threads)
    settings.videos_per_batch = args.videos_per_batch
    settings.batch_size = args.caption_batch if stage_name == "CaptionStage" else args.score_batch
    clips = {"tiny": args.clips, "mid": args.mid_clips, "large": args.large_clips,
             "caption": args.caption_clips or args.large_clips}[size]
    directory.mkdir()
    videos = make_videos(directory, clips, args.clips_per_video, sidecars)
    batches = [pa.Table.from_pylist(videos[i : i + args.videos_per_batch], schema=schema.STAGED)
               for i in range(0, len(videos), args.videos_per_batch)]
    stage = (CaptionStage if stage_name == "CaptionStage" else ClipScoreStage)(settings)
    start = time.perf_counter()
    stage.setup()
    load_s = time.perf_counter() - start
    rows = []
    previous = None
    for label, config_settings, captioner_settings in variants:
        for key, value in config_settings.items():
            setattr(stage.config, key, value)
        for key, value in captioner_settings.items():
            setattr(stage.captioner, key, value)
        row, outputs = time_variant(stage, videos, batches, args, stage_name,
                                    f"{what}, {label}" if label else what, load_s)
        # The share of clips whose caption (or aesthetic score to 2 decimals) equals the previous row's: the cache
        # alone gives the uncached tokens on fp32, fp16 may flip near-ties; the two preprocessings differ by a level
        # in a few pixels, which can flip a random model's near-ties too.
        previous = outputs if previous is None else previous
        row["same_as_previous_row"] = float(np.mean([a == b for a, b in zip(outputs, previous, strict=True)]))
        previous = outputs
        rows.append(row)
    return rows


def time_variant(stage, videos: list[dict], batches: list[pa.Table], args, stage_name: str, what: str,
                 load_s: float) -> tuple[dict, list]:
    """Times the stage on the batches; the row and each clip's output (caption, or rounded aesthetic score)."""
    warm = dict(videos[0], clips=videos[0]["clips"][:1])
    stage(pa.Table.from_pylist([warm], schema=schema.STAGED))  # first-call allocations, lazy init
    stage(first_clips(videos, stage.config.batch_size))  # the model's batch shapes (cuBLAS choices, allocator pools)
    best = float("inf")
    result = None
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        result = [stage(b) for b in batches]
        sync(args.device)
        best = min(best, time.perf_counter() - start)
    out_clips = [c for table in result for v in table.to_pylist() for c in v["clips"]]
    key = "caption" if stage_name == "CaptionStage" else "aesthetic"
    filled = sum(c[key] is not None for c in out_clips)
    settings = stage.config
    row = {"stage": stage_name, "what": what, "clips": len(out_clips), "wall_s": best, "load_s": load_s,
           "clips_per_s": len(out_clips) / best, "ms_per_clip": 1000 * best / len(out_clips),
           "batch_size": settings.batch_size, "videos_per_batch": settings.videos_per_batch, "filled": filled}
    if filled < len(out_clips) or len(out_clips) < sum(len(v["clips"]) for v in videos):
        print(f"  WARNING: {what}: only {filled} of {len(out_clips)} clips got a {key} (quarantined videos?)",
              file=sys.stderr)
    captioner = getattr(stage, "captioner", None)
    if captioner is not None:
        tokenizer = captioner.loaded.tokenizer
        row["tokens_per_caption"] = float(np.mean([len(tokenizer.encode(c["caption"] or "")) for c in out_clips]))
    report(row)
    outputs = [c[key] if key == "caption" or c[key] is None else round(c[key], 2) for c in out_clips]
    return row, outputs


def first_clips(videos: list[dict], count: int) -> pa.Table:
    """Staged records holding the first `count` clips of `videos`."""
    out = []
    for video in videos:
        if count <= 0:
            break
        out.append(dict(video, clips=video["clips"][:count]))
        count -= len(out[-1]["clips"])
    return pa.Table.from_pylist(out, schema=schema.STAGED)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_preprocess(args) -> list[dict]:
    """Decode + the 224 px eval transform of 3 keyframes a clip, no model: open_clip's PIL transform per image (the
    CPU work of the old path per clip, whatever the GPU does), and the batched tensor path (models/image_batch.py)
    on the CPU and on --device, --score-batch clips a call."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from models.image_batch import JpegDecoder, TensorPreprocess

    pil = image_transform_v2(PreprocessCfg(size=224), is_train=False)
    cfg = PreprocessCfg(size=224)
    tensor = TensorPreprocess(224, tuple(cfg.mean), tuple(cfg.std))
    rng = np.random.default_rng(1)
    clips = args.preprocess_clips or args.clips
    keyframes = [[keyframe(rng) for _ in range(3)] for _ in range(clips)]
    batches = [[k for clip in keyframes[i : i + args.score_batch] for k in clip]
               for i in range(0, clips, args.score_batch)]
    reference = PilPreprocess(pil)
    rows = [time_preprocess(args, "3 keyframes: PIL decode + open_clip transform per image, CPU (old path)",
                            reference, batches, clips, "cpu")]
    expected = reference(batches[0])
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    for device in dict.fromkeys(["cpu", args.device]):
        batched = BatchPreprocess(JpegDecoder(torch.device(device)), tensor)
        levels = ((batched(batches[0]).cpu() - expected) * std).abs() * 255  # picture levels before normalising
        rows.append(time_preprocess(args, f"3 keyframes: batched decode + transform, {device}", batched, batches,
                                    clips, device))
        rows[-1].update(max_levels_vs_pil=float(levels.max()), mean_levels_vs_pil=float(levels.mean()))
        print(f"  {'':<15} its pixels vs open_clip's PIL transform: max {float(levels.max()):.1f}, mean "
              f"{float(levels.mean()):.3f} levels of 255", file=sys.stderr, flush=True)
    return rows


class PilPreprocess:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        return torch.stack([self.transform(Image.open(io.BytesIO(k)).convert("RGB")) for k in jpegs])


class BatchPreprocess:
    def __init__(self, decode, transform):
        self.decode, self.transform = decode, transform

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        return self.transform(self.decode(jpegs))


def time_preprocess(args, what: str, preprocess, batches: list[list[bytes]], clips: int, device: str) -> dict:
    preprocess(batches[0])  # warm-up: decoder handles, kernels
    best = float("inf")
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            preprocess(batch)
        sync(device)
        best = min(best, time.perf_counter() - start)
    row = {"stage": "preprocess", "what": what, "clips": clips, "wall_s": best, "load_s": 0.0,
           "clips_per_s": clips / best, "ms_per_clip": 1000 * best / clips}
    report(row)
    return row


def report(row: dict) -> None:
    print(f"  {row['stage']:<15} {row['what']:<90} {row['clips_per_s']:>8.2f} clips/s {row['ms_per_clip']:>9.1f} "
          f"ms/clip  (load {row['load_s']:.1f} s)", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64, help="clips per case with the tiny models")
    parser.add_argument("--mid-clips", type=int, default=16, help="clips per case with the ViT-B/32 models")
    parser.add_argument("--large-clips", type=int, default=8, help="clips per case with the --large models")
    parser.add_argument("--clips-per-video", type=int, default=8)
    parser.add_argument("--videos-per-batch", type=int, default=1, help="staged records per stage call")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes; the fastest is kept")
    parser.add_argument("--caption-clips", type=int, default=0, help="clips of the large CoCa case (0: --large-clips)")
    parser.add_argument("--preprocess-clips", type=int, default=0, help="clips of the preprocess rows (0: --clips)")
    parser.add_argument("--score-batch", type=int, default=ClipScoreConfig.batch_size, help="clips per CLIP call")
    parser.add_argument("--caption-batch", type=int, default=CaptionConfig.batch_size,
                        help="clips per captioner call")
    parser.add_argument("--large", action="store_true", help="also the production architectures (random init)")
    parser.add_argument("--large-only", action="store_true", help="only the production architectures")
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
        rows += run_preprocess(args)
        for i, (stage_name, size, what, settings, sidecars, variants) in enumerate(cases(args.large,
                                                                                           args.large_only)):
            rows += run_case(stage_name, size, what, settings, sidecars, variants, args, Path(tmp) / f"case{i}")
    print("\n| stage | model | clips/s per worker | ms per clip | model load s |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        tokens = f" ({r['tokens_per_caption']:.0f} tokens/caption)" if "tokens_per_caption" in r else ""
        if "max_levels_vs_pil" in r:
            tokens += f" (vs PIL: max {r['max_levels_vs_pil']:.1f}, mean {r['mean_levels_vs_pil']:.3f} levels)"
        if r.get("same_as_previous_row", 1.0) < 1.0:
            tokens += f" ({100 * r['same_as_previous_row']:.0f} % outputs as the previous row's)"
        print(f"| {r['stage']} | {r['what']}{tokens} | {r['clips_per_s']:.2f} | {r['ms_per_clip']:.1f} | "
              f"{r['load_s']:.1f} |")
    if args.json:
        env = {"pinned_cpus": sorted(PINNED) if PINNED else None, "cpus": len(ALL_CPUS), "threads": args.threads,
               "torch": torch.__version__, "device": args.device, "precision": args.precision}
        Path(args.json).write_text(json.dumps({"environment": env, "cases": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
