"""Bucketed training reads at scale: how long training.buckets.BucketSampler takes to set up a stage (fit every clip
to a bucket, list its windows) and to lay out an epoch (one bucket per micro-batch), against the square
training.dataset.StageSampler on the same clips' metadata, in one run. Both run on every worker at every stage
start (and the epoch layout at every epoch), so they must stay small beside the stage.

    python bench/bucket_sampler.py [--clips 1000000] [--windows 1] [--workers 8] [--batch 4] [--repeats 3]

The metadata is synthetic, as ClipTable.metadata() gives it: clips of 16:9, 9:16, 4:3, 1:1, 5:3 and 4:1 (the last fits
no bucket) with 2 to 19 frames at 8 fps; the stage is 4 frames at 8 fps, size 32, buckets 16:9, 9:16, 4:3 and 1:1 at
4 and 8 frames (multiple 4). Times are the fastest of `--repeats` rounds, CPU seconds of this process alongside.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(64, 36), (36, 64), (48, 36), (40, 40), (60, 36), (96, 24)]


def metadata(clips: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(SHAPES), clips)
    return {"width": [SHAPES[p][0] for p in pick], "height": [SHAPES[p][1] for p in pick],
            "num_frames": rng.integers(2, 20, clips).tolist(), "fps": [8.0] * clips}


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(fastest wall seconds, its CPU seconds, the last result)."""
    best = (float("inf"), 0.0, None)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, cpu, result)
    return best


def time_epochs(sampler, repeats: int) -> tuple[float, float]:
    """(fastest wall seconds, its CPU seconds) of laying out a new epoch (epochs 1.. : each is computed once)."""
    best = (float("inf"), 0.0)
    for epoch in range(1, repeats + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        sampler.batch_items(epoch * sampler.batches_per_epoch)
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1_000_000)
    parser.add_argument("--windows", type=int, default=1, help="data_loading.windows_per_clip")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from training.buckets import BucketSampler, stage_buckets
    from training.config import BucketConfig, CurriculumStage
    from training.dataset import StageSampler

    meta = metadata(args.clips)
    stage = CurriculumStage(name="video", num_frames=4, fps=8.0, size=32, bucket_frames=[4, 8])
    buckets = stage_buckets(BucketConfig(aspect_ratios=["16:9", "9:16", "4:3", "1:1"]), stage, 4)
    rows = {}
    for name, build in (
            ("square", lambda: StageSampler(meta, stage, args.windows, 0, 0, args.workers, args.batch)),
            ("buckets", lambda: BucketSampler(meta, buckets, args.windows, 0, 0, args.workers, args.batch))):
        wall, cpu, sampler = timed(build, args.repeats)
        epoch_wall, epoch_cpu = time_epochs(sampler, args.repeats)
        rows[name] = {"setup_s": wall, "setup_cpu_s": cpu, "epoch_s": epoch_wall, "epoch_cpu_s": epoch_cpu,
                      "items": len(sampler.items), "batches_per_epoch_per_rank": sampler.batches_per_epoch}
    rows["buckets"]["unfit"] = dict(sampler.unfit)
    ratios = {"setup": rows["buckets"]["setup_s"] / rows["square"]["setup_s"],
              "epoch": rows["buckets"]["epoch_s"] / rows["square"]["epoch_s"]}
    print(f"{args.clips} clips, {args.windows} window(s) each, {args.workers} workers x micro-batch {args.batch}")
    print(f"{'sampler':<8} {'setup s':>8} {'(cpu)':>7} {'epoch s':>8} {'(cpu)':>7} {'items':>9} {'batches/rank':>13}")
    for name, r in rows.items():
        print(f"{name:<8} {r['setup_s']:8.2f} {r['setup_cpu_s']:7.2f} {r['epoch_s']:8.3f} {r['epoch_cpu_s']:7.3f} "
              f"{r['items']:9d} {r['batches_per_epoch_per_rank']:13d}")
    print(f"buckets / square: setup {ratios['setup']:.2f}x, epoch layout {ratios['epoch']:.2f}x; "
          f"fit no bucket: {rows['buckets']['unfit']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
