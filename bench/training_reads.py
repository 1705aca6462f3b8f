"""Training reads benchmark: decoded samples per second of the replayable random-access loader
(training.dataset.StageLoader) against a streaming read of the same shards (a pyarrow.dataset scan in file order,
decoded in batches by training.data.ClipDecodeStage), both with the same number of decode threads, in one run.
Wall seconds are the fastest of interleaved rounds; CPU seconds (this process, all threads) show the cost apart from
other load on a shared box.

    python bench/training_reads.py [--data DIR] [--clips 800] [--threads 2] [--repeats 3] [--json out.json]

Without --data it writes a demo-sized curated dataset under --workdir (reused on later runs): `--clips` clips of a
moving shape like the sample dump's, 192x144 at 24 fps, 2 to 5 s, encoded by curation.encode.ClipEncoder with the
curation defaults, in shards of 256 rows. The stage is the demo's "high" one: 4 frames at 1 fps, 16 px.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE = {"name": "high", "steps": 8000, "num_frames": 4, "fps": 1.0, "size": 16}


def _synthetic_curated(out_dir: Path, clips: int, shard_rows: int = 256) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation import schema
    from curation.config import EncodeConfig
    from curation.encode import ClipEncoder
    from curation.outputs import OutputDir, VersionWrite, commit_version
    from curation.sample_dump import SHAPES, direction_vector, draw_shape

    out = OutputDir(str(out_dir))
    if out.exists("manifest.json"):
        return str(out_dir)
    rng = np.random.default_rng(0)
    width, height, fps = 192, 144, 24
    rows = []
    for i in range(clips):
        frames = int(rng.integers(2 * fps, 5 * fps + 1))
        shape, direction = SHAPES[i % 3], ("left", "right", "up", "down")[i % 4]
        colour = tuple(int(c) for c in rng.integers(100, 256, 3))
        dx, dy = direction_vector(direction)
        encoder = ClipEncoder(EncodeConfig(), width, height, fps)
        for t in range(frames):
            rgb = np.full((height, width, 3), 40, np.uint8)
            progress = t / max(1, frames - 1) - 0.5
            draw_shape(rgb, shape, width / 2 + dx * progress * 100, height / 2 + dy * progress * 70, 28, colour)
            encoder.add(t / fps, rgb)
        rows.append({"clip_id": f"clip-{i:05d}", "video_id": f"video-{i:05d}", "num_frames": frames, "kept": True,
                     "caption": f"a {shape} moving {direction}", "fps": float(fps), "width": width,
                     "height": height, "video_bytes": encoder.close()})
    out.makedirs("shards")
    files = []
    for n, start in enumerate(range(0, clips, shard_rows)):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows[start:start + shard_rows], schema=schema.SHARDS), sink,
                       compression="zstd")
        data = sink.getvalue().to_pybytes()
        rel = f"shards/v0001-{n:05d}.parquet"
        out.write_bytes_atomic(rel, data)
        files.append({"path": rel, "rows": len(rows[start:start + shard_rows]),
                      "sha256": hashlib.sha256(data).hexdigest()})
    written = VersionWrite(version=1, config_path="config-v0001.yaml", files={"videos": [], "clips": [],
                                                                             "shards": files},
                           counts={"clips_kept": clips}, bounds=[], untrained=False, warnings=[], superseded=[],
                           staged=[])
    commit_version(out, written, {"generator": "bench/training_reads.py"}, None, {})
    return str(out_dir)


def _streaming(data: str, stage, threads: int, batch_size: int) -> tuple[int, float, float]:
    """Today's order: scan the shards front to back, decode batches of rows in a thread pool."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from curation.outputs import OutputDir
    from training.data import SHARD_COLUMNS, ClipDecodeStage, shard_files

    out = OutputDir(data)
    paths = [out.path(p[len(data.rstrip("/")) + 1:]) for p in shard_files(data)]
    decode = ClipDecodeStage(stage, 1)
    started, cpu = time.perf_counter(), time.process_time()
    dataset = pads.dataset(paths, format="parquet", filesystem=out.fs)
    batches = (pa.Table.from_batches([b]) for b in dataset.to_batches(columns=SHARD_COLUMNS, batch_size=batch_size))
    with ThreadPoolExecutor(threads) as pool:
        samples = sum(len(result["video"]) for result in pool.map(decode, batches))
    return samples, time.perf_counter() - started, time.process_time() - cpu


def _loader_epochs(data: str, stage, config, batch_size: int, epochs: int) -> list[tuple[int, float, float]]:
    """Samples, wall and CPU seconds of each epoch of one fresh StageLoader (the first opens the table, decodes
    cold)."""
    from training.dataset import ClipTable, StageLoader

    started, cpu = time.perf_counter(), time.process_time()
    table = ClipTable.open(data)
    results = []
    with StageLoader(table, stage, config, seed=0, rank=0, world_size=1, batch_size=batch_size) as loader:
        per_epoch = loader.batches_per_epoch
        for epoch in range(epochs):
            samples = 0
            for k in range(epoch * per_epoch, (epoch + 1) * per_epoch):
                samples += len(loader.batch(k)[0])
            now, now_cpu = time.perf_counter(), time.process_time()
            results.append((samples, now - started, now_cpu - cpu))
            started, cpu = now, now_cpu
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a curated dataset (default: a synthetic demo-sized one under --workdir)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "reelforge-bench-reads"))
    parser.add_argument("--clips", type=int, default=800)
    parser.add_argument("--threads", type=int, default=2, help="decode threads for both paths")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch of the loader")
    parser.add_argument("--decode-batch-size", type=int, default=8, help="rows per decode task when streaming")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest is kept")
    parser.add_argument("--json")
    args = parser.parse_args()

    from training.config import CurriculumStage, DataConfig

    made = time.perf_counter()
    data = args.data or _synthetic_curated(Path(args.workdir) / f"curated-{args.clips}", args.clips)
    print(f"data: {data} (ready in {time.perf_counter() - made:.1f} s)")
    stage = CurriculumStage(**STAGE)

    rounds: list[dict[str, tuple[int, float, float]]] = []
    for _ in range(args.repeats):  # interleaved rounds, the fastest of each row kept: the box is shared
        row = {"streaming scan + decode": _streaming(data, stage, args.threads, args.decode_batch_size)}
        for cache in (True, False):
            config = DataConfig(cache=cache, decode_concurrency=args.threads, prefetch_batches=args.prefetch,
                                windows_per_clip=1)
            first, second = _loader_epochs(data, stage, config, args.batch_size, epochs=2)
            if cache:
                row["StageLoader epoch 1 (cold: open + decode)"] = first
                row["StageLoader epoch 2 (warm cache)"] = second
            else:
                row["StageLoader epoch 2 (cache off)"] = second
        rounds.append(row)
    figures = {name: {"samples": rounds[0][name][0], "seconds": min(r[name][1] for r in rounds),
                      "cpu_seconds": min(r[name][2] for r in rounds),
                      "rounds_seconds": [r[name][1] for r in rounds]} for name in rounds[0]}
    base = figures["streaming scan + decode"]["samples"] / figures["streaming scan + decode"]["seconds"]
    print(f"{args.threads} decode threads, stage {stage.name}: {stage.num_frames} frames at {stage.fps:g} fps, "
          f"{stage.size} px, micro-batch {args.batch_size}, prefetch {args.prefetch}")
    print(f"{'path':44s} {'samples':>8s} {'seconds':>8s} {'cpu s':>7s} {'samples/s':>10s} {'vs streaming':>13s}")
    for name, f in figures.items():
        f["samples_per_s"] = f["samples"] / f["seconds"]
        f["ratio_to_streaming"] = f["samples_per_s"] / base
        print(f"{name:44s} {f['samples']:8d} {f['seconds']:8.2f} {f['cpu_seconds']:7.2f} {f['samples_per_s']:10.1f} "
              f"{f['ratio_to_streaming']:12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
