"""Training reads benchmark: decoded samples per second of the replayable random-access loader
(training.dataset.StageLoader: rows fetched by index with Lance `take` from a dataset version's shards table) against
a streaming read of the same rows (a pyarrow.dataset scan of Parquet shards in file order, the layout before issue
17, decoded in batches by training.data.ClipDecodeStage), both with the same number of decode threads, in one run.
Wall seconds are the fastest of interleaved rounds; CPU seconds (this process, all threads) show the cost apart from
other load on a shared box. A second table times the fetch alone (no decode): the Parquet scan, a Lance scan, and
`ClipTable.take` of every row one at a time in random order, as the loader asks for them.

    python bench/training_reads.py [--data DIR[@vN]] [--clips 800] [--threads 2] [--repeats 3] [--json out.json]

Without --data it writes a demo-sized curated dataset under --workdir (reused on later runs) with the curation
writer (curation.writer: batches of videos, the filters, the version tag): `--clips` clips of a moving shape like
the sample dump's, 192x144 at 24 fps, 2 to 5 s, encoded by curation.encode.ClipEncoder with the curation defaults.
The Parquet side is the same rows of the shards table written as shards of 256 rows (zstd), under --workdir. The
stage is the demo's "high" one: 4 frames at 1 fps, 16 px.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE = {"name": "high", "steps": 8000, "num_frames": 4, "fps": 1.0, "size": 16}


def _synthetic_clip(i: int, rng) -> dict:
    """Clip i: a shape crossing the frame, as the sample dump draws it, encoded as curation encodes clips."""
    import numpy as np

    from curation.config import EncodeConfig
    from curation.encode import ClipEncoder
    from curation.sample_dump import SHAPES, direction_vector, draw_shape

    width, height, fps = 192, 144, 24
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
    return {"clip_id": f"clip-{i:05d}", "video_id": f"video-{i:05d}", "start_frame": 0, "end_frame": frames - 1,
            "start_s": 0.0, "end_s": frames / fps, "num_frames": frames, "caption": f"a {shape} moving {direction}",
            "width": encoder.width, "height": encoder.height, "video_bytes": encoder.close()}


def _synthetic_curated(out_dir: Path, clips: int) -> str:
    """A one-version curated dataset of `clips` clips (one video each), written as `reelforge curate` writes."""
    import numpy as np

    from curation.config import CurateConfig, FilterConfig, ScoreFilter
    from curation.dataset import CuratedDataset
    from curation.writer import BatchCommitter, create_tables, finish_filters, tag_version

    dataset = CuratedDataset(str(out_dir))
    if dataset.exists() and dataset.latest() is not None:
        return str(out_dir)
    create_tables(dataset)
    committer = BatchCommitter(dataset, 1, every=64)
    rng = np.random.default_rng(0)
    for i in range(clips):
        clip = _synthetic_clip(i, rng)
        committer.add({"video_id": clip["video_id"], "uri": f"/synthetic/{clip['video_id']}.mp4", "status": "ok",
                       "error_class": None, "error_message": None, "fps": 24.0, "width": 192, "height": 144,
                       "duration_s": clip["end_s"], "num_frames": clip["num_frames"], "clips": [clip]})
    committer.flush()
    keep_all = CurateConfig(filters=FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(),
                                                 aesthetic=ScoreFilter(), caption_match=ScoreFilter()))
    written = finish_filters(dataset, keep_all, 1, [])
    tag_version(dataset, 1, {"dataset_version": 1, "counts": written.counts,
                             "generator": "bench/training_reads.py"})
    return str(out_dir)


def _parquet_copy(table, workdir: Path, shard_rows: int = 256) -> list[str]:
    """The rows of `table` (a ClipTable) as Parquet shards in row order, written once per data version."""
    import pyarrow.parquet as pq

    from training.data import SHARD_COLUMNS

    folder = workdir / f"parquet-{table.version}"
    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        rows = table.shards.to_table(columns=SHARD_COLUMNS, scan_in_order=True)
        for n, start in enumerate(range(0, len(rows), shard_rows)):
            pq.write_table(rows.slice(start, shard_rows), folder / f"{n:05d}.parquet", compression="zstd")
        (folder / "done").write_text("")
    return sorted(str(p) for p in folder.glob("*.parquet"))


def _streaming(paths: list[str], stage, threads: int, batch_size: int) -> tuple[int, float, float]:
    """The order before issue 17: scan the Parquet shards front to back, decode batches of rows in a thread pool."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from training.data import SHARD_COLUMNS, ClipDecodeStage

    decode = ClipDecodeStage(stage, 1)
    started, cpu = time.perf_counter(), time.process_time()
    dataset = pads.dataset(paths, format="parquet")
    batches = (pa.Table.from_batches([b]) for b in dataset.to_batches(columns=SHARD_COLUMNS, batch_size=batch_size))
    with ThreadPoolExecutor(threads) as pool:
        samples = sum(len(result["video"]) for result in pool.map(decode, batches))
    return samples, time.perf_counter() - started, time.process_time() - cpu


def _fetches(paths: list[str], data: str, threads: int) -> dict[str, tuple[int, float, float]]:
    """Rows, wall and CPU seconds of reading every row with its bytes, three ways, without decoding."""
    import pyarrow.dataset as pads

    from training.data import SHARD_COLUMNS
    from training.dataset import ClipTable

    figures = {}
    started, cpu = time.perf_counter(), time.process_time()
    rows = pads.dataset(paths, format="parquet").to_table(columns=SHARD_COLUMNS).num_rows
    figures["Parquet scan"] = (rows, time.perf_counter() - started, time.process_time() - cpu)
    table = ClipTable.open(data)
    started, cpu = time.perf_counter(), time.process_time()
    rows = table.shards.to_table(columns=SHARD_COLUMNS).num_rows
    figures["Lance scan"] = (rows, time.perf_counter() - started, time.process_time() - cpu)
    order = list(range(len(table)))
    random.Random(0).shuffle(order)
    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        rows = sum(len(r) for r in pool.map(lambda i: table.take([i]), order))
    figures[f"ClipTable.take, 1 row a call, random, {threads} threads"] = (rows, time.perf_counter() - started,
                                                                           time.process_time() - cpu)
    return figures


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


def _fastest(rounds: list[dict[str, tuple[int, float, float]]]) -> dict[str, dict]:
    return {name: {"samples": rounds[0][name][0], "seconds": min(r[name][1] for r in rounds),
                   "cpu_seconds": min(r[name][2] for r in rounds), "rounds_seconds": [r[name][1] for r in rounds]}
            for name in rounds[0]}


def _print(figures: dict[str, dict], baseline: str, unit: str, label: str) -> None:
    base = figures[baseline]["samples"] / figures[baseline]["seconds"]
    print(f"{'path':52s} {unit:>8s} {'seconds':>8s} {'cpu s':>7s} {unit + '/s':>10s} {'vs ' + label:>13s}")
    for name, f in figures.items():
        f["per_s"] = f["samples"] / f["seconds"]
        f["ratio"] = f["per_s"] / base
        print(f"{name:52s} {f['samples']:8d} {f['seconds']:8.2f} {f['cpu_seconds']:7.2f} {f['per_s']:10.1f} "
              f"{f['ratio']:12.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a curated dataset, DIR@vN for version N (default: a synthetic demo-sized "
                                       "one under --workdir)")
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
    from training.dataset import ClipTable

    made = time.perf_counter()
    workdir = Path(args.workdir)
    data = args.data or _synthetic_curated(workdir / f"curated-{args.clips}", args.clips)
    table = ClipTable.open(data)
    paths = _parquet_copy(table, workdir)
    print(f"data: {table.shown} ({table.version}, {len(table)} clips; Parquet copy in {len(paths)} shards; ready in "
          f"{time.perf_counter() - made:.1f} s)")
    stage = CurriculumStage(**STAGE)

    rounds: list[dict[str, tuple[int, float, float]]] = []
    fetch_rounds: list[dict[str, tuple[int, float, float]]] = []
    for _ in range(args.repeats):  # interleaved rounds, the fastest of each row kept: the box is shared
        row = {"streaming Parquet scan + decode": _streaming(paths, stage, args.threads, args.decode_batch_size)}
        for cache in (True, False):
            config = DataConfig(cache=cache, decode_concurrency=args.threads, prefetch_batches=args.prefetch,
                                windows_per_clip=1)
            first, second = _loader_epochs(table.data_uri, stage, config, args.batch_size, epochs=2)
            if cache:
                row["StageLoader epoch 1 (cold: open + decode)"] = first
                row["StageLoader epoch 2 (warm cache)"] = second
            else:
                row["StageLoader epoch 2 (cache off)"] = second
        rounds.append(row)
        fetch_rounds.append(_fetches(paths, table.data_uri, args.threads))
    figures, fetches = _fastest(rounds), _fastest(fetch_rounds)
    print(f"{args.threads} decode threads, stage {stage.name}: {stage.num_frames} frames at {stage.fps:g} fps, "
          f"{stage.size} px, micro-batch {args.batch_size}, prefetch {args.prefetch}")
    _print(figures, "streaming Parquet scan + decode", "samples", "streaming")
    print("fetch only, every row with its bytes, no decode:")
    _print(fetches, "Parquet scan", "rows", "Parquet")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "data_version": table.version,
                                               "figures": figures, "fetch": fetches}, indent=2))


if __name__ == "__main__":
    main()
