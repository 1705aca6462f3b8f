"""The `dedup` filter: one clip of each group of duplicates is kept, the others are dropped naming it.

Two kinds of duplicates, decided at finish over the clips the other filters kept (so a dropped clip never costs a
good one its place):

- copies (re-encoded, resized, re-muxed, trimmed), found without weights: the clips' frame-hash signatures
  (curation/phash.py) aligned at their best shift, `duplicate(of=<clip_id>, hamming=3)`;
- semantic near-duplicates (SemDeDup, Abbas et al. 2023): spherical k-means on the clips' CLIP embeddings, then the
  cosine similarity within each cluster, `duplicate(of=<clip_id>, cos=0.97)`. Only with embeddings from trained
  weights: random ones make every verdict arbitrary, so the step is off and the run says so.

Which clip is kept (`preference`): the one with the highest aesthetic score (only from trained weights), then the
longest, then the first clip_id. Clips are taken in that order and each is dropped if it duplicates a clip already
kept, so every drop reason names a clip that stays, with its distance to it. A clip kept by an earlier dataset
version always stays (versions are immutable): a new clip that duplicates it is dropped in its favour. Earlier
clips are found through indexes on disk (OUTPUT/frame_hashes.lance, OUTPUT/embeddings.lance), never loaded whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.config import DedupConfig
from curation.dataset import CuratedDataset, sql_list
from curation.hash_index import HashIndex, Samples, band_hits, strong_pairs
from curation.phash import align, thumbnails

REASON = "duplicate"
HASHES = "frame_hashes.lance"  # kept clips' frame hashes by band (curation/hash_index.py)
FETCH_CLIPS = 512  # earlier clips' signatures read per IN-list query
KMEANS_SAMPLE = 20_000  # k-means trains on at most this many embeddings, then assigns all
KMEANS_ITERATIONS = 10


@dataclass
class Signature:
    hashes: np.ndarray  # (n,) int64
    thumbs: np.ndarray  # (n, 48) uint8


@dataclass
class DedupOutcome:
    """What the dedup filter decided for a version's candidate clips."""

    reasons: dict[str, str] = field(default_factory=dict)  # clip_id -> duplicate(of=..., ...)
    nearest: dict[str, dict] = field(default_factory=dict)  # clip_id -> dedup_hamming / dedup_cos of its nearest
    bounds: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def preference(clip: dict, trained: bool) -> tuple:
    """Sort key, best first: highest aesthetic (trained scores only), longest, first clip_id."""
    aesthetic = clip.get("aesthetic")
    aesthetic = aesthetic if trained and aesthetic is not None and not math.isnan(aesthetic) else -math.inf
    duration = clip.get("duration") or 0.0
    return (-aesthetic, -duration, clip["clip_id"])


def bounds(config: DedupConfig, semantic_on: bool) -> list[dict]:
    """The dedup thresholds as the report's bounds (score `duplicate`, drawn on the dedup_* histograms)."""
    return [
        {"score": REASON, "side": "max", "value": float(config.max_hamming), "percentile": None,
         "applied": config.enabled, "label": f"hamming {config.max_hamming}", "histogram": "dedup_hamming"},
        {"score": REASON, "side": "min", "value": float(config.min_cosine), "percentile": None,
         "applied": config.enabled and semantic_on, "label": f"cos {config.min_cosine:g}", "histogram": "dedup_cos"},
    ]


# --- copies: frame-hash signatures --------------------------------------------------------------------------------


def _signature(hashes, thumbs) -> Signature | None:
    if not hashes or thumbs is None:
        return None
    return Signature(np.asarray(hashes, np.int64), thumbnails(thumbs, len(hashes)))


def _match(a: Signature, b: Signature, config: DedupConfig) -> float | None:
    """The median hamming distance of two signatures at their best shift, None when they never overlap enough."""
    found = align(a.hashes, b.hashes, a.thumbs, b.thumbs, config.max_color, config.min_overlap, config.min_samples)
    return None if found is None else found.hamming


def copy_pairs(signatures: dict[str, Signature], config: DedupConfig) -> dict[str, dict[str, float]]:
    """clip_id -> {other clip_id: hamming} for every pair of the given clips that shares hash bands at one shift
    (curation/hash_index.py) and aligns; distances above max_hamming are kept too (the report's histogram shows how
    near the threshold they come)."""
    samples = Samples.of({k: s.hashes.tolist() for k, s in signatures.items()})
    hits = band_hits(samples, samples.clip, samples.position, samples.bands)
    hits = np.stack([hits[:, 0], samples.clip[hits[:, 1]], hits[:, 2]], axis=1)  # stored row -> its clip
    hits = hits[hits[:, 0] < hits[:, 1]]  # each pair once, never a clip with itself
    found: dict[str, dict[str, float]] = {k: {} for k in signatures}
    for i, j in strong_pairs(hits).tolist():
        a, b = samples.clip_ids[i], samples.clip_ids[j]
        distance = _match(signatures[a], signatures[b], config)
        if distance is not None:
            found[a][b] = found[b][a] = distance
    return found


def _read_signatures(dataset: CuratedDataset, where: str) -> dict[str, Signature]:
    table = dataset.open("clips").to_table(columns=["clip_id", "frame_hashes", "frame_thumbs"], filter=where)
    out = {}
    for clip_id, hashes, thumbs in zip(table["clip_id"].to_pylist(), table["frame_hashes"].to_pylist(),
                                       table["frame_thumbs"].to_pylist(), strict=True):
        signature = _signature(hashes, thumbs)
        if signature is not None:
            out[clip_id] = signature
    return out


def earlier_copies(dataset: CuratedDataset, index: HashIndex, signatures: dict[str, Signature], version: int,
                   config: DedupConfig) -> dict[str, tuple[str, float]]:
    """clip_id -> (nearest earlier kept clip, hamming) for the new clips that share a band with one: the index
    names the candidates, their signatures are read by clip_id and aligned."""
    if version <= 1:
        return {}
    candidates = index.candidates({k: s.hashes.tolist() for k, s in signatures.items()}, version - 1)
    wanted = sorted(set().union(*candidates.values())) if candidates else []
    earlier: dict[str, Signature] = {}
    for start in range(0, len(wanted), FETCH_CLIPS):
        quoted = sql_list(wanted[start:start + FETCH_CLIPS])
        earlier.update(_read_signatures(dataset, f"clip_id IN ({quoted}) AND kept AND dataset_version < {version}"))
    nearest: dict[str, tuple[str, float]] = {}
    for clip_id, others in candidates.items():
        for other in sorted(others):
            if other not in earlier:
                continue
            distance = _match(signatures[clip_id], earlier[other], config)
            if distance is not None and (clip_id not in nearest or distance < nearest[clip_id][1]):
                nearest[clip_id] = (other, distance)
    return nearest


# --- semantic near-duplicates: SemDeDup ---------------------------------------------------------------------------


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    return np.concatenate([np.argmax(x[i:i + chunk] @ centroids.T, axis=1) for i in range(0, len(x), chunk)])


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spherical k-means labels of unit rows `x`: trained on at most KMEANS_SAMPLE of them, then all assigned."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    train = x[rng.choice(len(x), min(len(x), KMEANS_SAMPLE), replace=False)]
    centroids = train[rng.choice(len(train), k, replace=False)]
    for _ in range(KMEANS_ITERATIONS):
        labels = _assign(train, centroids)
        order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[order], return_index=True)
        sums = np.add.reduceat(train[order], starts, axis=0)
        centroids = centroids.copy()
        centroids[present] = normalise(sums)  # an empty cluster keeps its centroid
    return _assign(x, centroids)


def default_clusters(n: int) -> int:
    return max(1, round(math.sqrt(n)))


class SemanticKept:
    """The kept clips' embeddings per k-means cluster, and the question 'is this clip a duplicate of one of them'."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray):
        self.embeddings, self.labels = embeddings, labels
        sizes = np.bincount(labels)
        self.kept = {c: np.empty((n, embeddings.shape[1]), np.float32) for c, n in enumerate(sizes) if n}
        self.ids: dict[int, list[int]] = {c: [] for c in self.kept}

    def nearest(self, i: int) -> tuple[int, float] | None:
        """The kept clip of i's cluster most similar to clip i, and the cosine; None when none is kept there."""
        cluster = int(self.labels[i])
        count = len(self.ids[cluster])
        if not count:
            return None
        sims = self.kept[cluster][:count] @ self.embeddings[i]
        best = int(np.argmax(sims))
        return self.ids[cluster][best], float(sims[best])

    def keep(self, i: int) -> None:
        cluster = int(self.labels[i])
        self.kept[cluster][len(self.ids[cluster])] = self.embeddings[i]
        self.ids[cluster].append(i)


@dataclass
class VersionEmbeddings:
    """The version's candidate clips' embeddings, clustered, and which row is which clip."""

    kept: SemanticKept
    rows: dict[str, int]  # clip_id -> row
    ids: list[str]  # row -> clip_id


def semdedup(embeddings: np.ndarray, order: np.ndarray, min_cosine: float, clusters: int | None,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup on its own (the bench runs it): rows of `embeddings` taken in `order` (best first); returns, per
    row, the row it duplicates (-1: kept) and its cosine with its cluster's nearest kept row (nan: none)."""
    x = normalise(embeddings)
    semantic = SemanticKept(x, kmeans(x, clusters or default_clusters(len(x)), seed))
    duplicate_of = np.full(len(x), -1)
    cosine = np.full(len(x), np.nan)
    for i in order:
        found = semantic.nearest(i)
        if found is not None:
            cosine[i] = found[1]
            if found[1] >= min_cosine:
                duplicate_of[i] = found[0]
                continue
        semantic.keep(i)
    return duplicate_of, cosine


# --- the filter ---------------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.1f}"


def deduplicate(dataset: CuratedDataset, config: DedupConfig, version: int, candidates: list[dict],
                trained: bool) -> DedupOutcome:
    """The dedup verdicts of `version`'s candidate clips (dicts with clip_id, aesthetic, duration: the clips no
    other filter dropped)."""
    semantic_on = config.semantic and trained
    outcome = DedupOutcome(bounds=bounds(config, semantic_on))
    if not config.enabled or not candidates:
        return outcome
    if config.semantic and not trained:
        outcome.warnings.append("dedup: the semantic step (CLIP embeddings) is off: the embeddings come from "
                                "untrained weights; only copies found by frame hashes are dropped")
    ids = [c["clip_id"] for c in candidates]
    table = _version_rows(dataset, version, ids)
    signatures = {i: s for i, hashes, thumbs in zip(table["clip_id"].to_pylist(), table["frame_hashes"].to_pylist(),
                                                    table["frame_thumbs"].to_pylist(), strict=True)
                  if (s := _signature(hashes, thumbs))}
    root = dataset.location.rstrip("/")
    earlier = earlier_copies(dataset, HashIndex(f"{root}/{HASHES}", dataset.storage_options), signatures, version,
                             config)
    pairs = copy_pairs(signatures, config)
    order = sorted(candidates, key=lambda c: preference(c, trained))
    semantic, earlier_semantic = None, {}
    if semantic_on:
        semantic, earlier_semantic = _semantic_setup(dataset, config, version, table, outcome)
    kept: set[str] = set()
    for clip in order:
        clip_id = clip["clip_id"]
        _judge(clip_id, config, earlier.get(clip_id), pairs.get(clip_id, {}), kept, semantic,
               earlier_semantic.get(clip_id), outcome)
        if clip_id not in outcome.reasons:
            kept.add(clip_id)
            if semantic is not None and clip_id in semantic.rows:
                semantic.kept.keep(semantic.rows[clip_id])
    return outcome


def _judge(clip_id: str, config: DedupConfig, earlier: tuple[str, float] | None, pairs: dict[str, float],
           kept: set[str], semantic: VersionEmbeddings | None, earlier_semantic: tuple[str, float] | None,
           outcome: DedupOutcome) -> None:
    """One clip's verdict, given what it was compared with: earlier versions first, then this version's kept."""
    nearest = outcome.nearest.setdefault(clip_id, {"dedup_hamming": None, "dedup_cos": None})
    copies = [(d, other) for other, d in pairs.items() if other in kept]
    if earlier is not None:
        copies.append((earlier[1], earlier[0]))
    if copies:
        distance, other = min(copies)
        nearest["dedup_hamming"] = distance
        if distance <= config.max_hamming:
            outcome.reasons[clip_id] = f"{REASON}(of={other}, hamming={_fmt(distance)})"
            return
    similar = [earlier_semantic] if earlier_semantic is not None else []
    if semantic is not None and clip_id in semantic.rows:
        found = semantic.kept.nearest(semantic.rows[clip_id])
        if found is not None:
            similar.append((semantic.ids[found[0]], found[1]))
    if similar:
        other, cosine = max(similar, key=lambda pair: pair[1])
        nearest["dedup_cos"] = cosine
        if cosine >= config.min_cosine:
            outcome.reasons[clip_id] = f"{REASON}(of={other}, cos={cosine:.3f})"


def _version_rows(dataset: CuratedDataset, version: int, ids: list[str]) -> pa.Table:
    """The candidates' signature and embedding columns, read with the version's rows (no IN list of every id)."""
    table = dataset.open("clips").to_table(columns=["clip_id", "frame_hashes", "frame_thumbs", "clip_embedding"],
                                           filter=f"dataset_version = {version}")
    return table.filter(pc.is_in(table["clip_id"], value_set=pa.array(ids, pa.string())))


def _embeddings(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """The clips that have an embedding and their embeddings as one (n, D) float32 array, without Python floats."""
    column = table["clip_embedding"].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    has = lengths > 0
    if not has.any():
        return [], np.empty((0, 0), np.float32)
    dim = int(lengths[has][0])
    if (lengths[has] != dim).any():
        raise ValueError(f"the version's clip embeddings have several sizes ({sorted(set(lengths[has].tolist()))}): "
                         "one model must embed a version")
    chosen = column.filter(pa.array(has))
    x = chosen.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return table["clip_id"].filter(pa.array(has)).to_pylist(), x


def _semantic_setup(dataset: CuratedDataset, config: DedupConfig, version: int, table: pa.Table,
                    outcome: DedupOutcome) -> tuple[VersionEmbeddings | None, dict[str, tuple[str, float]]]:
    """The version's clustered embeddings and each clip's nearest clip kept by an earlier version (clip_id,
    cosine), from the embedding index."""
    from curation.embedding_index import EmbeddingIndex

    embedded, x = _embeddings(table)
    if not embedded:
        return None, {}
    x = normalise(x)
    labels = kmeans(x, config.clusters or default_clusters(len(x)), config.seed)
    semantic = VersionEmbeddings(SemanticKept(x, labels), {clip_id: row for row, clip_id in enumerate(embedded)},
                                 embedded)
    earlier: dict[str, tuple[str, float]] = {}
    if version > 1:
        untrained = [v for v in range(1, version) if dataset.record(v).get("scores_untrained")]
        index = EmbeddingIndex.beside(dataset.location, dataset.storage_options)
        if untrained:
            outcome.warnings.append(f"dedup: clips were not compared by embedding with dataset versions "
                                    f"{', '.join(map(str, untrained))} (scored with untrained weights)")
        elif len(index) and index.dim != x.shape[1]:
            outcome.warnings.append(f"dedup: the embedding index holds {index.dim}-d embeddings, this version's "
                                    f"are {x.shape[1]}-d: clips were not compared by embedding with earlier versions")
        elif len(index):
            for clip_id, hits in zip(embedded, index.nearest(x, k=1, max_version=version - 1), strict=True):
                if hits:
                    earlier[clip_id] = (hits[0][0], 1.0 - hits[0][1])
    return semantic, earlier


def index_hashes(dataset: CuratedDataset, version: int) -> int:
    """The version's kept clips' frame hashes into OUTPUT/frame_hashes.lance (the next versions' copies are looked
    up there); a rerun replaces the version's rows. Returns the rows written."""
    table = dataset.open("clips").to_table(columns=["clip_id", "frame_hashes"],
                                           filter=f"dataset_version = {version} AND kept")
    signatures = dict(zip(table["clip_id"].to_pylist(), table["frame_hashes"].to_pylist(), strict=True))
    return HashIndex(f"{dataset.location.rstrip('/')}/{HASHES}", dataset.storage_options).add(version, signatures)
