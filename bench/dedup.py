"""Dedup benchmark: the semantic step (SemDeDup in curation/dedup.py) on synthetic CLIP-like embeddings with planted
near-duplicates, in one run:

a. in one version: spherical k-means (sqrt(n) clusters) plus the greedy within-cluster pass over `--clips` vectors;
   seconds, peak traced memory (tracemalloc, numpy's buffers included) against the embeddings' own size, and the
   recall of the planted pairs (the copy dropped naming its original) and the drops that are not planted;
b. across versions: the same vectors as the kept clips of earlier versions in OUTPUT/embeddings.lance
   (curation/embedding_index.py: IVF_PQ, cosine), then `--new` clips of a new version, some of them near-duplicates
   of earlier ones, looked up with one `nearest(max_version=...)` call, as the dedup filter does; build seconds,
   query seconds and recall.
c. copies across versions: `--clips` kept clips' frame-hash signatures (`--samples` a clip) in
   OUTPUT/frame_hashes.lance (curation/hash_index.py: 4 x 16-bit bands, BTREE per band), then `--new` clips of a
   new version, 5% of them copies of earlier clips (every sample with 0 to 4 bits flipped, trimmed by a few samples),
   looked up with `HashIndex.candidates` and verified by `align` as the dedup filter does; add and index seconds,
   lookup seconds, candidates per query clip and recall. The hashes are uniformly random, the best case for bands:
   real pHashes cluster (similar compositions), which raises the candidates per query.

The embeddings are clustered like real ones: `--topics` centres, each vector its centre plus noise (cosine ~0.5
to others of its topic, ~0 to the rest); a planted copy is its original plus a little noise (cosine 0.96 to 0.99).

    python bench/dedup.py [--clips 100000] [--dim 768] [--planted 1000] [--new 10000] [--samples 40]
        [--sections semantic,index,hashes] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.dedup import normalise, semdedup  # noqa: E402
from curation.embedding_index import EmbeddingIndex  # noqa: E402
from curation.hash_index import HashIndex  # noqa: E402
from curation.phash import align  # noqa: E402

THRESHOLD = 0.95


def clustered(rng: np.random.Generator, n: int, dim: int, topics: int) -> np.ndarray:
    centres = normalise(rng.standard_normal((topics, dim)))
    labels = rng.integers(0, topics, n)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 20_000):  # in blocks: the noise of 100k x 768 at once would double the peak
        block = slice(start, min(n, start + 20_000))
        noise = normalise(rng.standard_normal((block.stop - block.start, dim)))
        out[block] = normalise(centres[labels[block]] + noise)
    return out


def near(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Copies of the rows of x at cosine 0.96 to 0.99."""
    cos = rng.uniform(0.96, 0.99, len(x))[:, None]
    noise = normalise(rng.standard_normal(x.shape))
    noise = normalise(noise - (noise * x).sum(axis=1, keepdims=True) * x)  # orthogonal to x
    return normalise(cos * x + np.sqrt(1 - cos**2) * noise)


def semantic(args, rng: np.random.Generator) -> dict:
    base = clustered(rng, args.clips - args.planted, args.dim, args.topics)
    originals = rng.choice(len(base), args.planted, replace=False)
    x = np.concatenate([base, near(rng, base[originals])])  # copies last: they come after their originals
    order = rng.permutation(len(x))  # preference order unrelated to which is the copy
    rank = np.empty(len(x), int)
    rank[order] = np.arange(len(x))
    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    duplicate_of, cosine = semdedup(x, order, THRESHOLD, None, seed=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    copies = np.arange(len(base), len(x))
    # A planted pair is found when the later of the two in the order is dropped naming the earlier.
    first = np.where(rank[originals] < rank[copies], originals, copies)
    second = np.where(rank[originals] < rank[copies], copies, originals)
    found = int((duplicate_of[second] == first).sum())
    planted = set(second.tolist())
    unplanted = int(sum(1 for i in np.flatnonzero(duplicate_of >= 0) if i not in planted))
    return {"clips": len(x), "dim": args.dim, "planted_pairs": args.planted, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "clips_per_s": round(len(x) / seconds), "peak_traced_mib": round(peak / 2**20, 1),
            "embeddings_mib": round(x.nbytes / 2**20, 1), "peak_over_embeddings": round(peak / x.nbytes, 2),
            "recall": round(found / args.planted, 4), "drops_not_planted": unplanted,
            "max_cos_not_planted": round(float(np.nanmax(np.delete(cosine, list(planted)))), 3)}


def index(args, rng: np.random.Generator, workdir: Path) -> dict:
    old = clustered(rng, args.clips, args.dim, args.topics)
    index = EmbeddingIndex(str(workdir / "embeddings.lance"))
    start = time.perf_counter()
    for version, block in enumerate(np.array_split(np.arange(len(old)), 10), start=1):  # ten earlier versions
        index.add(pa.table({"clip_id": [f"v{version}-{i:07d}" for i in block],
                            "video_id": [f"video-{i // 4}" for i in block],
                            "dataset_version": pa.array([version] * len(block), pa.int64()),
                            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(old[block].ravel()), args.dim)}))
    added = time.perf_counter() - start
    start = time.perf_counter()
    how = index.build()
    built = time.perf_counter() - start
    planted = args.new // 20
    originals = rng.choice(len(old), planted, replace=False)
    new = np.concatenate([near(rng, old[originals]), clustered(rng, args.new - planted, args.dim, args.topics)])
    start, cpu = time.perf_counter(), time.process_time()
    hits = index.nearest(new, k=1, max_version=10)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    blocks = np.array_split(np.arange(len(old)), 10)
    names = {int(i): f"v{v}-{int(i):07d}" for v, block in enumerate(blocks, start=1) for i in block}
    found = sum(1 for q, o in enumerate(originals) if hits[q] and hits[q][0][0] == names[int(o)]
                and 1 - hits[q][0][1] >= THRESHOLD)
    false = sum(1 for q in range(planted, len(new)) if hits[q] and 1 - hits[q][0][1] >= THRESHOLD)
    return {"indexed_clips": len(old), "index": how, "add_seconds": round(added, 1), "build_seconds": round(built, 1),
            "new_clips": len(new), "query_seconds": round(seconds, 2), "query_cpu_seconds": round(cpu, 2),
            "queries_per_s": round(len(new) / seconds),
            "recall": round(found / planted, 4), "planted": planted, "false_duplicates": false}


def _flip(rng: np.random.Generator, hashes: np.ndarray, max_bits: int) -> np.ndarray:
    out = hashes.view(np.uint64).copy()
    for i in range(len(out)):
        for bit in rng.choice(64, rng.integers(0, max_bits + 1), replace=False):
            out[i] ^= np.uint64(1) << np.uint64(bit)
    return out.view(np.int64)


def hashes(args, rng: np.random.Generator, workdir: Path) -> dict:
    old = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (args.clips, args.samples), dtype=np.int64)
    index = HashIndex(str(workdir / "frame_hashes.lance"))
    start = time.perf_counter()
    for version, block in enumerate(np.array_split(np.arange(args.clips), 10), start=1):
        index.add(version, {f"c{i:07d}": old[i].tolist() for i in block})
    added = time.perf_counter() - start
    planted = args.new // 20
    originals = rng.choice(args.clips, planted, replace=False)
    trims = rng.integers(0, args.samples // 4, planted)
    new = {f"copy{q:05d}": _flip(rng, old[o, t:], 4) for q, (o, t) in enumerate(zip(originals, trims, strict=True))}
    fresh = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (args.new - planted, args.samples),
                         dtype=np.int64)
    new.update({f"new{q:05d}": row for q, row in enumerate(fresh)})
    start, cpu = time.perf_counter(), time.process_time()
    found = index.candidates({k: v.tolist() for k, v in new.items()}, max_version=10)
    lookup, lookup_cpu = time.perf_counter() - start, time.process_time() - cpu
    thumbs = np.zeros((args.samples, 48), np.uint8)  # colours equal: the hashes decide
    start = time.perf_counter()
    matched = {}
    for clip_id, others in found.items():
        for other in others:
            a = align(new[clip_id], old[int(other[1:])], thumbs[:len(new[clip_id])], thumbs, 24, 0.5, 4)
            if a is not None and a.hamming <= 10:
                matched[clip_id] = other
    verify = time.perf_counter() - start
    recall = sum(matched.get(f"copy{q:05d}") == f"c{o:07d}" for q, o in enumerate(originals)) / planted
    return {"indexed_clips": args.clips, "rows": len(index), "add_seconds": round(added, 1), "new_clips": len(new),
            "lookup_seconds": round(lookup, 2), "lookup_cpu_seconds": round(lookup_cpu, 2),
            "verify_seconds": round(verify, 2),
            "candidates_per_clip": round(sum(map(len, found.values())) / len(new), 3),
            "recall": round(recall, 4), "false_duplicates": sum(1 for k in matched if k.startswith("new"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--planted", type=int, default=1_000)
    parser.add_argument("--topics", type=int, default=1_000)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--sections", default="semantic,index,hashes")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"machine": platform.processor() or platform.machine(), "threshold": THRESHOLD,
              "load_average_start": list(os.getloadavg())}
    sections = args.sections.split(",")
    if "semantic" in sections:
        result["semantic"] = semantic(args, np.random.default_rng(0))
        print(json.dumps({"semantic": result["semantic"]}), flush=True)
    if "index" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            result["index"] = index(args, np.random.default_rng(1), Path(tmp))
        print(json.dumps({"index": result["index"]}), flush=True)
    if "hashes" in sections:
        with tempfile.TemporaryDirectory() as tmp:
            result["hashes"] = hashes(args, np.random.default_rng(2), Path(tmp))
        print(json.dumps({"hashes": result["hashes"]}), flush=True)
    result["load_average_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
