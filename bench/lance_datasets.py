"""Lance datasets benchmark: what moving the curated tables from Parquet files + manifest.json to Lance datasets
costs and gains, on synthetic data, in one run:

a. commits: a clips table growing by `--rows / --commits` rows a dataset version, committed as Lance does it
   (merge_insert keyed by clip_id, a tag v000N with the version's record) under three compaction cadences, against
   reelforge 0.1's manifest.json (every file of every version listed, the whole document rewritten atomically at
   each version); seconds and metadata bytes per commit;
b. training reads: samples/s of random-access batches from a shards-like Lance dataset (`take`) against today's
   streaming read of the same rows from Parquet shard files (`ParquetFile.iter_batches`), bytes only, no decode;
c. dedup queries: nearest-neighbour queries/s on `--embeddings` 768-d vectors through curation.embedding_index
   (IVF_PQ, cosine), the index build time and recall@1 on planted near-duplicates.

    python bench/lance_datasets.py [--rows 1000000] [--commits 1000] [--quick] [--sections commits,reads,dedup]
        [--json OUT] [--workdir DIR] [--keep]

`--quick` scales everything down (20k clip rows in 20 commits, 1,000 shard rows, 12k 256-d embeddings) for a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# reelforge 0.1's OutputConfig: rows per file of videos/ and clips/, kept clips per shard file.
LEGACY_TABLE_ROWS = 100_000
LEGACY_SHARD_ROWS = 256
CLIPS_PER_VIDEO = 10
KEPT_SHARE = 0.8
SHARD_COLUMNS = ["clip_id", "caption", "fps", "num_frames", "video_bytes"]


def checkpoints(commits: int) -> list[int]:
    """1, 10, 100, ... up to `commits`, and `commits` itself."""
    marks = [10**p for p in range(int(math.log10(commits)) + 1) if 10**p <= commits]
    return marks + ([commits] if commits not in marks else [])


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds)
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max()), "mean": float(values.mean())}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --- a. commits -----------------------------------------------------------------------------------------------------

def clip_rows(version: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """`rows` synthetic clips of one dataset version in the clips schema. The payload is small on purpose (no
    keyframes, no embedding): data bytes cost the same in both layouts; what differs is the metadata and the key
    join."""
    from curation import schema

    ids = [hashlib.blake2b(f"{version}-{i}".encode(), digest_size=8).hexdigest() for i in range(rows)]
    kept = rng.random(rows) < KEPT_SHARE
    start = rng.uniform(0, 50, rows)
    frames = rng.integers(48, 240, rows)
    columns = {
        "clip_id": ids,
        "video_id": [f"video-{version:05d}-{i // CLIPS_PER_VIDEO:05d}" for i in range(rows)],
        "start_frame": (start * 24).astype(np.int64), "end_frame": (start * 24).astype(np.int64) + frames - 1,
        "start_s": start, "end_s": start + frames / 24.0, "num_frames": frames,
        "motion_mean": rng.random(rows), "motion_median": rng.random(rows), "motion_p90": rng.random(rows),
        "is_static": np.zeros(rows, bool), "keyframes": [[] for _ in range(rows)], "kept": kept,
        "drop_reason": [None if k else "aesthetic" for k in kept],
        "caption": [f"a synthetic clip number {i} of version {version}" for i in range(rows)],
        "caption_source": ["coca"] * rows, "aesthetic": rng.uniform(3, 7, rows),
        "caption_match": rng.uniform(0.1, 0.4, rows), "clip_embedding": [None] * rows,
        "score_model": ["open_clip:ViT-L-14; aesthetic:laion-v2"] * rows,
        "dataset_version": np.full(rows, version, np.int64),
    }
    for field in schema.CLIPS:  # columns later schemas added (dedup signatures, OCR) stay null, as on old tables
        columns.setdefault(field.name, [None] * rows)
    return pa.table(columns, schema=schema.CLIPS)


def legacy_files(kind: str, version: int, rows: int, per_file: int) -> list[dict]:
    """The manifest entries of one version's files of `kind`: path, rows, sha256, as the 0.1 writer listed them."""
    files = []
    for n, start in enumerate(range(0, rows, per_file)):
        path = f"{kind}/v{version:04d}-{n:05d}.parquet"
        files.append({"path": path, "rows": min(per_file, rows - start),
                      "sha256": hashlib.sha256(path.encode()).hexdigest()})
    return files


def legacy_version_entry(version: int, rows: int) -> dict:
    """One version's entry of reelforge 0.1's manifest (curation/outputs.py commit_version before the move)."""
    kept = round(rows * KEPT_SHARE)
    videos = max(1, rows // CLIPS_PER_VIDEO)
    counts = {"videos": videos, "videos_ok": videos - 1, "quarantined": {"decode_error": 1}, "clips": rows,
              "clips_kept": kept, "clips_dropped": rows - kept, "drop_reasons": {"aesthetic": rows - kept},
              "video_seconds": 12.5 * videos, "superseded": 0}
    filters = [("duration", "min", None), ("motion", "min", None), ("motion", "max", 99.0), ("aesthetic", "min", 20.0),
               ("caption_match", "min", 10.0), ("resolution", "min", None)]
    bounds = [{"score": score, "side": side, "value": 0.5, "percentile": pct, "applied": True,
               "label": f"{score} bound"} for score, side, pct in filters]
    run = {"wall_seconds": 3600.0, "videos_processed": videos, "video_seconds_processed": 12.5 * videos,
           "video_seconds_per_wall_second": 0.35, "retry_quarantined": False,
           "mlflow_run_id": hashlib.md5(str(version).encode()).hexdigest(), "tracking_uri": "http://mlflow:5000",
           "experiment": "reelforge-curate"}
    files = {"videos": legacy_files("videos", version, videos, LEGACY_TABLE_ROWS),
             "clips": legacy_files("clips", version, rows, LEGACY_TABLE_ROWS),
             "shards": legacy_files("shards", version, kept, LEGACY_SHARD_ROWS)}
    return {"version": version, "config": f"config-v{version:04d}.yaml", "counts": counts, "files": files,
            "filters": bounds, "scores_untrained": False, "warnings": [], "superseded": [], "run": run,
            "report": [f"reports/v{version:04d}/report.html", f"reports/v{version:04d}/scores.png"]}


class ManifestCommitter:
    """reelforge 0.1's commit: read manifest.json, add the version (its entry and its files to the flat list),
    json.dumps the whole document and write it under a temporary name, then rename. The version's clips are
    written as a Parquet file first (its data, timed apart)."""

    def __init__(self, root: Path, config: dict):
        self.root, self.config = root, config
        (root / "clips").mkdir(parents=True, exist_ok=True)

    def commit(self, version: int, table: pa.Table) -> dict[str, float]:
        import pyarrow.parquet as pq

        started = time.perf_counter()
        pq.write_table(table, self.root / "clips" / f"v{version:04d}-00000.parquet", compression="zstd")
        data = time.perf_counter()
        path = self.root / "manifest.json"
        previous = json.loads(path.read_text()) if path.exists() else {"versions": [], "duplicates": {}}
        entry = legacy_version_entry(version, table.num_rows)
        versions = previous["versions"] + [entry]
        manifest = {"schema_version": 2, "dataset_version": version, "config": self.config, "counts": entry["counts"],
                    "run": entry["run"], "duplicates": previous["duplicates"], "versions": versions,
                    "files": [f for v in versions for kind in ("videos", "clips", "shards") for f in v["files"][kind]]}
        tmp = path.with_name(f"manifest.json.tmp-{version}")
        tmp.write_bytes(json.dumps(manifest, indent=2, sort_keys=False).encode())
        os.replace(tmp, path)
        return {"data_s": data - started, "commit_s": time.perf_counter() - data}

    def metadata_bytes(self) -> int:
        return (self.root / "manifest.json").stat().st_size

    def metadata(self, version: int) -> dict:
        """What a reader of `version` reads (the whole manifest) and how long parsing it takes."""
        started = time.perf_counter()
        manifest = json.loads((self.root / "manifest.json").read_text())
        assert manifest["versions"][version - 1]["version"] == version
        return {"read_bytes": self.metadata_bytes(), "metadata_bytes": self.metadata_bytes(),
                "open_s": time.perf_counter() - started}


class LanceCommitter:
    """The Lance commit of a version: merge_insert keyed by clip_id, compaction every `compact_every` versions
    (0: never), then the tag v000N carrying the version's record (as curation.writer.tag_version does).
    `target_rows`: compact_files' target_rows_per_fragment (None: Lance's 1Mi rows)."""

    def __init__(self, uri: Path, compact_every: int, target_rows: int | None):
        self.uri, self.compact_every, self.target_rows = uri, compact_every, target_rows
        self.dataset = None
        self.rewritten_fragments = 0

    def commit(self, version: int, table: pa.Table) -> dict[str, float]:
        import lance

        started = time.perf_counter()
        if self.dataset is None:
            self.dataset = lance.write_dataset(table, str(self.uri), mode="create")
        else:
            self.dataset.merge_insert("clip_id").when_matched_update_all().when_not_matched_insert_all() \
                .execute(table)
        merged = time.perf_counter()
        if self.compact_every and version % self.compact_every == 0:
            metrics = self.dataset.optimize.compact_files(target_rows_per_fragment=self.target_rows)
            self.rewritten_fragments += metrics.fragments_removed
        compacted = time.perf_counter()
        tag = f"v{version:04d}"
        self.dataset.tags.create(tag, self.dataset.version)
        record = legacy_version_entry(version, table.num_rows)
        del record["files"]
        self.dataset.tags.replace_metadata(tag, {"reelforge.version": json.dumps(record)})
        done = time.perf_counter()
        return {"merge_s": merged - started, "compact_s": compacted - merged, "tag_s": done - compacted,
                "commit_s": done - started}

    def metadata_bytes(self) -> int:
        """Everything but the data: the manifests of every Lance version, the transactions, the tags."""
        return sum(tree_bytes(self.uri / d) for d in ("_versions", "_transactions", "_refs"))

    def metadata(self, version: int) -> dict:
        """What a reader of `version` reads (its tag and the manifest it points at), how long opening it takes, and
        the sizes on disk."""
        import lance

        started = time.perf_counter()
        reader = lance.dataset(str(self.uri), version=f"v{version:04d}")
        fragments = len(reader.get_fragments())
        open_s = time.perf_counter() - started
        manifests = sorted((self.uri / "_versions").glob("*.manifest"))  # v2 names count down: the newest first
        tag = self.uri / "_refs" / "tags" / f"v{version:04d}.json"
        return {"read_bytes": manifests[0].stat().st_size + (tag.stat().st_size if tag.exists() else 0),
                "latest_manifest_bytes": manifests[0].stat().st_size, "metadata_bytes": self.metadata_bytes(),
                "open_s": open_s,
                "versions_dir_bytes": tree_bytes(self.uri / "_versions"), "manifests": len(manifests),
                "tags_bytes": tree_bytes(self.uri / "_refs"),
                "transactions_bytes": tree_bytes(self.uri / "_transactions"),
                "data_bytes": tree_bytes(self.uri / "data"), "fragments": fragments,
                "lance_version": self.dataset.version}


def commit_series(name: str, committer, commits: int, rows_per_commit: int, seed: int) -> dict:
    """Commit `commits` versions; the metadata at each checkpoint and every commit's seconds."""
    rng = np.random.default_rng(seed)
    marks = set(checkpoints(commits))
    seconds: list[dict[str, float]] = []
    at: dict[int, dict] = {}
    started = time.perf_counter()
    before = 0
    for version in range(1, commits + 1):
        seconds.append(committer.commit(version, clip_rows(version, rows_per_commit, rng)))
        metadata = committer.metadata_bytes()
        # The manifest is rewritten whole; Lance's metadata only grows, so what a commit wrote is the growth.
        written = metadata if isinstance(committer, ManifestCommitter) else metadata - before
        before = metadata
        if version in marks:
            at[version] = {**committer.metadata(version), **seconds[-1], "written_bytes": written,
                           "commit_s_last10_median": float(np.median([s["commit_s"] for s in seconds[-10:]]))}
        if version % 100 == 0 or version == commits:
            print(f"  [{name}] {version}/{commits} versions, last commit {seconds[-1]['commit_s'] * 1000:.0f} ms, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    total = {key: float(sum(s[key] for s in seconds)) for key in seconds[0]}
    return {"commits": commits, "checkpoints": at, "commit_s": percentiles([s["commit_s"] for s in seconds]),
            "commit_s_last_tenth": percentiles([s["commit_s"] for s in seconds[-max(1, commits // 10):]]),
            "total_s": total, "per_commit_s": [round(s["commit_s"], 5) for s in seconds]}


def commits_section(args, workdir: Path) -> dict:
    from curation.config import CurateConfig
    from curation.redact import redact_config

    rows_per_commit = args.rows // args.commits
    each_version = min(args.commits, args.compact_each_commits)
    series = {
        "json manifest (0.1)": (ManifestCommitter(workdir / "parquet", redact_config(CurateConfig())), args.commits),
        "lance, no compaction": (LanceCommitter(workdir / "never.lance", 0, None), args.commits),
        f"lance, compact every {args.compact_every}": (
            LanceCommitter(workdir / "every-k.lance", args.compact_every, args.compact_every * rows_per_commit),
            args.commits),
        "lance, compact every version (tag_version)": (LanceCommitter(workdir / "each.lance", 1, None),
                                                        each_version),
    }
    results = {}
    for name, (committer, commits) in series.items():
        print(f"a. {name}: {commits} versions of {rows_per_commit} clip rows", flush=True)
        results[name] = commit_series(name, committer, commits, rows_per_commit, seed=0)
        if isinstance(committer, LanceCommitter):
            results[name]["fragments_rewritten_by_compaction"] = committer.rewritten_fragments
    return {"rows_per_commit": rows_per_commit, "series": results}


def print_commits(section: dict) -> None:
    print(f"\na. commits of {section['rows_per_commit']} clip rows each, at version N: its commit (median of the last"
          " 10 in brackets); data = the Parquet write (0.1) or merge_insert (Lance: data, key join and commit);"
          " written / read = metadata bytes a commit writes / a reader of version N reads")
    print(f"{'series':44s} {'N':>5s} {'commit ms':>16s} {'data ms':>8s} {'written':>11s} {'read':>11s} "
          f"{'_versions/':>12s} {'all metadata':>13s} {'open ms':>8s} {'data MB':>8s} {'fragments':>9s}")
    for name, series in section["series"].items():
        for version, at in series["checkpoints"].items():
            data = at.get("data_s", at.get("merge_s"))
            print(f"{name:44s} {version:5d} {at['commit_s'] * 1000:7.1f} ({at['commit_s_last10_median'] * 1000:6.1f}) "
                  f"{data * 1000:8.1f} {at['written_bytes']:11,d} {at['read_bytes']:11,d} "
                  f"{at.get('versions_dir_bytes', 0):12,d} {at['metadata_bytes']:13,d} {at['open_s'] * 1000:8.1f} "
                  f"{at.get('data_bytes', 0) / 1e6:8.1f} {at.get('fragments', 0):9d}")
    print(f"\n{'series':44s} {'commits':>7s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
          f"{'last tenth p50':>15s} {'total s':>8s}")
    for name, series in section["series"].items():
        p, last = series["commit_s"], series["commit_s_last_tenth"]
        print(f"{name:44s} {series['commits']:7d} {p['p50'] * 1000:8.1f} {p['p90'] * 1000:8.1f} "
              f"{p['p99'] * 1000:8.1f} {p['max'] * 1000:8.1f} {last['p50'] * 1000:15.1f} "
              f"{series['total_s']['commit_s']:8.1f}")


# --- b. training reads ----------------------------------------------------------------------------------------------

def shard_batches(rows: int, seed: int, batch_rows: int = 256):
    """Shards-like rows: clip_id, caption, fps, num_frames and 50 to 200 KB of random (incompressible) bytes."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, batch_rows):
        n = min(batch_rows, rows - start)
        sizes = rng.integers(50_000, 200_001, n)
        yield pa.record_batch({
            "clip_id": pa.array([f"clip-{start + i:08d}" for i in range(n)]),
            "caption": pa.array([f"a synthetic caption for clip {start + i}" for i in range(n)]),
            "fps": pa.array(np.full(n, 24.0)),
            "num_frames": pa.array(rng.integers(48, 240, n)),
            "video_bytes": pa.array([rng.bytes(int(s)) for s in sizes], pa.binary()),
        })


def write_shards(workdir: Path, rows: int) -> tuple[str, list[Path]]:
    """The same rows as one Lance dataset and as 0.1 shard files (256 rows each, zstd, as the 0.1 writer did)."""
    import lance
    import pyarrow.parquet as pq

    parquet_dir = workdir / "shards-parquet"
    parquet_dir.mkdir(parents=True)
    paths = []
    for n, batch in enumerate(shard_batches(rows, seed=1, batch_rows=LEGACY_SHARD_ROWS)):
        paths.append(parquet_dir / f"v0001-{n:05d}.parquet")
        pq.write_table(pa.Table.from_batches([batch]), paths[-1], compression="zstd")
    schema = next(shard_batches(1, seed=1)).schema
    uri = str(workdir / "shards.lance")
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, shard_batches(rows, seed=1)), uri)
    return uri, paths


def drop_cached(paths: list[Path]) -> None:
    """Evict these files' pages from the page cache (POSIX_FADV_DONTNEED needs no privileges for clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_parquet_stream(paths: list[Path], batch: int) -> tuple[int, int]:
    """Today's read: every shard file front to back in `batch`-row record batches."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    samples = nbytes = 0
    for path in paths:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=SHARD_COLUMNS):
            samples += record_batch.num_rows
            nbytes += pc.sum(pc.binary_length(record_batch["video_bytes"])).as_py()
    return samples, nbytes


def read_lance_take(uri: str, order: np.ndarray, batch: int) -> tuple[int, int]:
    """`take` of `batch` rows at a time, in the given row order."""
    import lance
    import pyarrow.compute as pc

    ds = lance.dataset(uri)
    samples = nbytes = 0
    for start in range(0, len(order), batch):
        table = ds.take(order[start:start + batch].tolist(), columns=SHARD_COLUMNS)
        samples += table.num_rows
        nbytes += pc.sum(pc.binary_length(table["video_bytes"])).as_py()
    return samples, nbytes


def reads_section(args, workdir: Path) -> dict:
    made = time.perf_counter()
    uri, paths = write_shards(workdir, args.shard_rows)
    print(f"b. wrote {args.shard_rows} shard rows as Lance and as {len(paths)} Parquet files in "
          f"{time.perf_counter() - made:.0f} s", flush=True)
    lance_files = sorted(Path(uri).rglob("*.lance"))
    permutation = np.random.default_rng(2).permutation(args.shard_rows)
    sequential = np.arange(args.shard_rows)
    paths_by_row = {
        "parquet stream, file order (today)": (paths, read_parquet_stream, (paths, args.batch_size)),
        "lance take, random order": (lance_files, read_lance_take, (uri, permutation, args.batch_size)),
        "lance take, same rows in sequence": (lance_files, read_lance_take, (uri, sequential, args.batch_size)),
    }
    rounds: dict[str, list[float]] = {f"{name} [{cache}]": [] for name in paths_by_row for cache in ("warm", "cold")}
    volume: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):  # interleaved rounds, the fastest kept: the box is shared
        for name, (files, read, read_args) in paths_by_row.items():
            for cache in ("cold", "warm"):  # cold: files evicted first; warm: straight after, from the page cache
                if cache == "cold":
                    drop_cached(files)
                started = time.perf_counter()
                volume[name] = read(*read_args)
                rounds[f"{name} [{cache}]"].append(time.perf_counter() - started)
    figures = {}
    for key, seconds in rounds.items():
        samples, nbytes = volume[key.rsplit(" [", 1)[0]]
        best = min(seconds)
        figures[key] = {"samples": samples, "bytes": nbytes, "seconds": best, "rounds_seconds": seconds,
                        "samples_per_s": samples / best, "mb_per_s": nbytes / best / 1e6}
    for key, f in figures.items():
        base = figures[f"parquet stream, file order (today) [{key.rsplit(' [', 1)[1]}"]
        f["ratio_to_parquet_stream"] = f["samples_per_s"] / base["samples_per_s"]
    return {"rows": args.shard_rows, "batch_size": args.batch_size, "parquet_files": len(paths),
            "lance_bytes": tree_bytes(Path(uri)), "parquet_bytes": sum(p.stat().st_size for p in paths),
            "figures": figures}


def print_reads(section: dict) -> None:
    print(f"\nb. training reads: {section['rows']} shard rows, batches of {section['batch_size']} "
          f"(Lance {section['lance_bytes'] / 1e9:.2f} GB, Parquet {section['parquet_bytes'] / 1e9:.2f} GB in "
          f"{section['parquet_files']} files)")
    print(f"{'path':50s} {'seconds':>8s} {'samples/s':>10s} {'MB/s':>8s} {'vs parquet stream':>18s}")
    for name, f in section["figures"].items():
        print(f"{name:50s} {f['seconds']:8.2f} {f['samples_per_s']:10.0f} {f['mb_per_s']:8.0f} "
              f"{f['ratio_to_parquet_stream']:17.2f}x")


# --- c. dedup queries -----------------------------------------------------------------------------------------------

def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_embeddings(rows: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around rows/100 random centres (cosine ~0.6 within a cluster), like CLIP embeddings of similar
    scenes rather than independent random directions; made in chunks to bound the temporaries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, rows // 100), dim)).astype(np.float32)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        out[start:start + n] = unit_rows(centres[rng.integers(0, len(centres), n)] + 0.8 * noise)
    return out


def near_duplicates(vectors: np.ndarray, distance: float, rng: np.random.Generator) -> np.ndarray:
    """Each vector moved by `distance` of its length in a random direction (cosine ~ 1 / sqrt(1 + distance^2))."""
    step = unit_rows(rng.standard_normal(vectors.shape).astype(np.float32))
    return unit_rows(vectors + distance * step)


def embedding_table(vectors: np.ndarray, start: int, version: int, prefix: str = "clip") -> pa.Table:
    n, dim = vectors.shape
    return pa.table({
        "clip_id": [f"{prefix}-{start + i:08d}" for i in range(n)],
        "video_id": [f"video-{(start + i) // CLIPS_PER_VIDEO:07d}" for i in range(n)],
        "dataset_version": pa.array(np.full(n, version), pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
    })


def exact_top1(queries: np.ndarray, base: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Row of `base` nearest to each query by cosine (numpy, chunked): the ground truth."""
    best = np.full(len(queries), -np.inf, np.float32)
    arg = np.zeros(len(queries), np.int64)
    for start in range(0, len(base), chunk):
        sims = queries @ base[start:start + chunk].T
        top = sims.argmax(axis=1)
        value = sims[np.arange(len(queries)), top]
        better = value > best
        best[better], arg[better] = value[better], top[better] + start
    return arg


class Stopwatch:
    """Wall and CPU seconds (this process, every thread) of a block: on a shared box the CPU figure is the cost."""

    def __enter__(self) -> Stopwatch:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed_queries(index, queries: np.ndarray, k: int, max_version: int | None) -> tuple[list, Stopwatch]:
    with Stopwatch() as watch:
        found = index.nearest(queries, k=k, max_version=max_version)
    return found, watch


def recall(found: list, expected: list[str], depth: int) -> float:
    return float(np.mean([want in [hit[0] for hit in hits[:depth]] for hits, want in zip(found, expected,
                                                                                           strict=True)]))


def lance_flat_qps(uri: str, queries: np.ndarray, k: int) -> float:
    """Brute-force queries/s through Lance (the index ignored), on a few queries: the no-index reference."""
    import lance

    ds = lance.dataset(uri)
    started = time.perf_counter()
    ds.to_table(columns=["clip_id", "_distance"], nearest={"column": "embedding", "q": queries, "k": k,
                                                           "metric": "cosine", "use_index": False})
    return len(queries) / (time.perf_counter() - started)


def dedup_section(args, workdir: Path) -> dict:
    from curation.embedding_index import EmbeddingIndex, default_partitions, default_sub_vectors

    rng = np.random.default_rng(3)
    n, q = args.embeddings, args.queries
    with Stopwatch() as made:
        vectors = clustered_embeddings(n - q, args.dim, seed=4)
        sources = rng.choice(n - q, q, replace=False)
        planted = near_duplicates(vectors[sources], args.duplicate_distance, rng)
    print(f"c. {n - q} embeddings (version 1) + {q} planted near-duplicates (version 2), {args.dim}-d, made in "
          f"{made.wall:.0f} s", flush=True)
    index = EmbeddingIndex(str(workdir / "embeddings.lance"))
    with Stopwatch() as added:
        for start in range(0, n - q, args.add_rows):
            index.add(embedding_table(vectors[start:start + args.add_rows], start, 1))
            print(f"  added {min(n - q, start + args.add_rows)}/{n - q}", flush=True)
        index.add(embedding_table(planted, 0, 2, prefix="planted"))
    partitions, sub_vectors = default_partitions(len(index)), default_sub_vectors(args.dim)
    print(f"  building the index on {len(index)} rows ({partitions} partitions x {sub_vectors} sub-vectors), "
          f"load average {os.getloadavg()[0]:.1f} ...", flush=True)
    with Stopwatch() as build:
        built = index.build()
    print(f"  build: {built} in {build.wall:.0f} s ({build.cpu:.0f} CPU s)", flush=True)
    expected = [f"clip-{s:08d}" for s in sources]
    first, cold = timed_queries(index, planted, args.k, max_version=1)  # partitions read into the index cache
    against_earlier, filtered = timed_queries(index, planted, args.k, max_version=1)
    everything, unfiltered = timed_queries(index, planted, args.k, max_version=None)
    with Stopwatch() as few_probes:
        probed = index.nearest(planted, k=args.k, max_version=1, nprobes=args.nprobes)
    with Stopwatch() as brute:
        truth = exact_top1(planted, vectors)
    result = {
        "rows": len(index), "dim": args.dim, "queries": q, "k": args.k,
        "duplicate_cosine": float(np.mean(np.sum(planted * vectors[sources], axis=1))),
        "generate_s": made.wall, "add_s": added.wall, "add_rows_per_s": len(index) / added.wall,
        "build": built, "build_s": build.wall, "build_cpu_s": build.cpu,
        "num_partitions": partitions, "num_sub_vectors": sub_vectors,
        "qps_max_version_first": q / cold.wall, "recall_at_1_first": recall(first, expected, 1),
        "qps_max_version": q / filtered.wall, "cpu_ms_per_query_max_version": 1000 * filtered.cpu / q,
        "qps_no_filter": q / unfiltered.wall, "cpu_ms_per_query_no_filter": 1000 * unfiltered.cpu / q,
        "nprobes": args.nprobes, "qps_nprobes": q / few_probes.wall,
        "recall_at_1_nprobes": recall(probed, expected, 1),
        "recall_at_1": recall(against_earlier, expected, 1), "recall_at_k": recall(against_earlier, expected, args.k),
        "self_found_at_1_no_filter": recall(everything, [f"planted-{i:08d}" for i in range(q)], 1),
        "planted_source_is_exact_top1": float(np.mean(truth == sources)),
        "numpy_brute_force_qps": q / brute.wall,
        "lance_flat_qps": lance_flat_qps(index.uri, planted[:args.flat_queries], args.k),
        "lance_flat_queries": min(q, args.flat_queries),
    }
    result.update(incremental_queries(index, vectors, rng, args))
    return result


def incremental_queries(index, vectors: np.ndarray, rng: np.random.Generator, args) -> dict:
    """The next version: Q more near-duplicates added after the index (searched brute force until `build()` adds
    them as a delta segment), queried against every earlier version before and after (each figure the second of
    two runs)."""
    q = args.queries
    sources = rng.choice(len(vectors), q, replace=False)
    planted = near_duplicates(vectors[sources], args.duplicate_distance, rng)
    index.add(embedding_table(planted, 0, 3, prefix="next"))
    expected = [f"clip-{s:08d}" for s in sources]
    timed_queries(index, planted, args.k, max_version=2)
    before, before_watch = timed_queries(index, planted, args.k, max_version=2)
    with Stopwatch() as extend:
        built = index.build()
    timed_queries(index, planted, args.k, max_version=2)
    after, after_watch = timed_queries(index, planted, args.k, max_version=2)
    return {"next_version_rows": q, "next_qps_unindexed_rows": q / before_watch.wall,
            "next_recall_at_1_unindexed_rows": recall(before, expected, 1), "next_build": built,
            "next_build_s": extend.wall, "next_qps_after_build": q / after_watch.wall,
            "next_recall_at_1_after_build": recall(after, expected, 1)}


def print_dedup(section: dict) -> None:
    s = section
    print(f"\nc. dedup queries: {s['rows']:,} rows x {s['dim']}-d, {s['queries']} planted near-duplicates "
          f"(cosine {s['duplicate_cosine']:.3f} to their source), k={s['k']}")
    next_rows = s["next_version_rows"]
    rows = [
        ("add (EmbeddingIndex.add, merge_insert), rows/s", f"{s['add_rows_per_s']:,.0f}"),
        (f"build ({s['build']}: {s['num_partitions']} partitions x {s['num_sub_vectors']} sub-vectors), s "
         f"(CPU s {s['build_cpu_s']:.0f})", f"{s['build_s']:.1f}"),
        ("queries/s, max_version=1, the first batch after build (index cache cold)",
         f"{s['qps_max_version_first']:.0f}"),
        (f"queries/s, max_version=1: new clips against earlier ones (CPU ms/query "
         f"{s['cpu_ms_per_query_max_version']:.1f})", f"{s['qps_max_version']:.0f}"),
        (f"queries/s, no filter (CPU ms/query {s['cpu_ms_per_query_no_filter']:.1f})", f"{s['qps_no_filter']:.0f}"),
        ("recall@1 of the planted source (max_version=1)", f"{s['recall_at_1']:.3f}"),
        (f"queries/s, max_version=1, nprobes={s['nprobes']} (recall@1 {s['recall_at_1_nprobes']:.3f})",
         f"{s['qps_nprobes']:.0f}"),
        (f"recall@{s['k']}", f"{s['recall_at_k']:.3f}"),
        ("planted source is the exact nearest (numpy)", f"{s['planted_source_is_exact_top1']:.3f}"),
        ("numpy brute force queries/s (exact reference)", f"{s['numpy_brute_force_qps']:.0f}"),
        (f"Lance brute force queries/s ({s['lance_flat_queries']} queries, index ignored)",
         f"{s['lance_flat_qps']:.1f}"),
        (f"next version: {next_rows} rows added after the index, queries/s", f"{s['next_qps_unindexed_rows']:.0f}"),
        ("next version: recall@1 before build()", f"{s['next_recall_at_1_unindexed_rows']:.3f}"),
        (f"next version: build() ({s['next_build']}), s", f"{s['next_build_s']:.1f}"),
        ("next version: queries/s after build()", f"{s['next_qps_after_build']:.0f}"),
        ("next version: recall@1 after build()", f"{s['next_recall_at_1_after_build']:.3f}"),
    ]
    for name, value in rows:
        print(f"{name:85s} {value:>10s}")


# --- the run --------------------------------------------------------------------------------------------------------

SECTIONS = {"commits": (commits_section, print_commits), "reads": (reads_section, print_reads),
            "dedup": (dedup_section, print_dedup)}


def environment() -> dict:
    import lance

    return {"python": platform.python_version(), "lance": lance.__version__, "pyarrow": pa.__version__,
            "numpy": np.__version__, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "machine": platform.machine()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="a. clip rows after the last commit")
    parser.add_argument("--commits", type=int, default=1_000, help="a. dataset versions (rows / commits each)")
    parser.add_argument("--compact-every", type=int, default=100, help="a. versions between compactions")
    parser.add_argument("--compact-each-commits", type=int, default=100,
                        help="a. versions of the compact-every-version series (its data grows quadratically)")
    parser.add_argument("--shard-rows", type=int, default=20_000, help="b. rows of the shards dataset")
    parser.add_argument("--batch-size", type=int, default=32, help="b. rows per training read")
    parser.add_argument("--repeats", type=int, default=3, help="b. interleaved rounds; the fastest is kept")
    parser.add_argument("--embeddings", type=int, default=1_000_000, help="c. rows of the embedding index")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1_000, help="c. planted near-duplicates queried")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobes", type=int, default=10, help="c. IVF partitions of the fixed-nprobes row")
    parser.add_argument("--duplicate-distance", type=float, default=0.25,
                        help="c. how far a planted duplicate is moved from its source, in unit lengths")
    parser.add_argument("--add-rows", type=int, default=100_000, help="c. rows per EmbeddingIndex.add call")
    parser.add_argument("--flat-queries", type=int, default=20, help="c. queries of the Lance brute-force row")
    parser.add_argument("--quick", action="store_true", help="everything scaled down, for a test")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "reelforge-bench-lance"))
    parser.add_argument("--keep", action="store_true", help="keep the datasets under --workdir")
    parser.add_argument("--json", help="results file (default: WORKDIR/lance_datasets.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.commits, args.compact_every, args.compact_each_commits = 20_000, 20, 5, 20
        args.shard_rows, args.repeats = 1_000, 1
        args.embeddings, args.dim, args.queries, args.add_rows, args.flat_queries = 12_000, 256, 50, 6_000, 5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    results = {"args": vars(args), "environment": environment()}
    for name in args.sections.split(","):
        run, show = SECTIONS[name]
        print(f"== {name} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
        section_dir = workdir / name
        shutil.rmtree(section_dir, ignore_errors=True)
        section_dir.mkdir(parents=True)
        started = time.perf_counter()
        results[name] = run(args, section_dir)
        results[name]["section_s"] = time.perf_counter() - started
        show(results[name])
        print(f"({name}: {results[name]['section_s']:.0f} s)\n", flush=True)
        if not args.keep:
            shutil.rmtree(section_dir, ignore_errors=True)
    results["environment"]["loadavg_end"] = os.getloadavg()
    out = Path(args.json or workdir / "lance_datasets.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
