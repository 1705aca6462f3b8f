"""curation.embedding_index: exact neighbours on small data, insert-only adds, the version filter, an IVF_PQ index
still finding planted near-duplicates, and the dimension errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.embedding_index import MAX_DELTAS, MIN_INDEX_ROWS, EmbeddingIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def rows(vectors, version: int, prefix: str = "clip", start: int = 0) -> pa.Table:
    """Rows as the clips table holds them: clip_embedding-like variable-size lists of float32."""
    ids = [f"{prefix}-{start + i:06d}" for i in range(len(vectors))]
    return pa.table({
        "clip_id": ids,
        "video_id": [f"video-{(start + i) // 10:05d}" for i in range(len(vectors))],
        "dataset_version": pa.array([version] * len(vectors), pa.int64()),
        "embedding": pa.array([None if v is None else list(v) for v in vectors], pa.list_(pa.float32())),
    })


def near(vector: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """A near-duplicate: the vector moved by `noise` of its length in a random direction (cos ~ 0.999)."""
    step = rng.standard_normal(vector.shape[-1])
    return unit(vector + noise * unit(step))


@pytest.fixture
def index(tmp_path) -> EmbeddingIndex:
    return EmbeddingIndex(str(tmp_path / "embeddings.lance"))


def test_brute_force_neighbours_match_numpy(index):
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((300, 32)))
    assert index.add(rows(base, 1)) == 300
    assert len(index) == 300 and index.dim == 32 and index.build() == "flat" and not index.has_index()
    planted = [5, 17, 242]
    queries = np.stack([near(base[i], rng) for i in planted])
    found = index.nearest(queries, k=5)
    exact = 1.0 - queries @ base.T
    for hits, i, d in zip(found, planted, exact, strict=True):
        assert hits[0][0] == f"clip-{i:06d}"
        assert [h[0] for h in hits] == [f"clip-{j:06d}" for j in np.argsort(d)[:5]]
        assert np.allclose([h[1] for h in hits], np.sort(d)[:5], atol=1e-5)
    one = index.nearest(base[7], k=1)  # one 1-D vector: one list
    assert one == [[("clip-000007", pytest.approx(0.0, abs=1e-5))]]


def test_add_is_insert_only_and_skips_rows_without_embeddings(index):
    rng = np.random.default_rng(1)
    first = unit(rng.standard_normal((100, 16)))
    assert index.add(rows(first, 1)) == 100
    assert index.add(rows(first, 1)) == 0  # a rerun of the version adds nothing
    assert len(index) == 100
    more = unit(rng.standard_normal((60, 16)))
    batch = rows(list(first[:10]) + list(more), 2, start=90)  # clip-000090..99 exist already
    assert index.add(batch) == 60 and len(index) == 160
    kept = index._open().to_table(filter="clip_id = 'clip-000095'")
    assert kept["dataset_version"].to_pylist() == [1]  # an existing clip keeps the version that first added it
    assert index.add(rows([None, [], more[0]], 3, prefix="sparse")) == 1  # null and empty embeddings skipped
    twice = pa.concat_tables([rows(more[:2], 3, prefix="dup"), rows(more[2:4], 3, prefix="dup")])
    assert index.add(twice) == 2  # a clip_id repeated within one batch goes in once
    assert len(index) == 163
    assert index.add(rows([], 4)) == 0
    with pytest.raises(ValueError, match="1 embedding rows have no dataset_version"):
        index.add(rows(more[:1], 5).set_column(2, "dataset_version", pa.array([None], pa.int64())))


def test_max_version_queries_earlier_versions_only(index):
    rng = np.random.default_rng(2)
    old = unit(rng.standard_normal((50, 24)))
    index.add(rows(old, 1, prefix="v1"))
    new = np.stack([near(old[3], rng), unit(rng.standard_normal(24))])
    index.add(rows(new, 2, prefix="v2"))
    against_earlier = index.nearest(new, k=3, max_version=1)
    assert against_earlier[0][0][0] == "v1-000003" and against_earlier[0][0][1] < 0.01
    assert all(hit[0].startswith("v1-") for hits in against_earlier for hit in hits)
    assert [len(h) for h in against_earlier] == [3, 3]  # filtered before the search: still k each
    with_self = index.nearest(new, k=1, max_version=2)
    assert with_self[0][0][0] == "v2-000000" and with_self[1][0][0] == "v2-000001"
    assert index.nearest(new, k=3, max_version=0) == [[], []]


def test_max_version_when_newer_rows_crowd_the_neighbours(index):
    """A query whose nearest rows are mostly newer than max_version still gets the k nearest older ones (the
    search over all rows keeps too few of them, so it is searched again with the filter first)."""
    rng = np.random.default_rng(5)
    old = unit(rng.standard_normal((50, 24)))
    index.add(rows(old, 1, prefix="v1"))
    index.add(rows(np.stack([near(old[3], rng, noise=0.01) for _ in range(10)]), 2, prefix="v2"))
    query = near(old[3], rng, noise=0.01)
    found = index.nearest(query, k=3, max_version=1)[0]
    exact = 1.0 - old @ query
    assert [hit[0] for hit in found] == [f"v1-{i:06d}" for i in np.argsort(exact)[:3]]
    assert [hit[0] for hit in index.nearest(query, k=3)[0]] != [hit[0] for hit in found]  # newer rows were nearer


def test_ivf_pq_index_finds_planted_duplicates(index):
    rng = np.random.default_rng(3)
    n, dim = MIN_INDEX_ROWS + 2_000, 64
    centres = rng.standard_normal((n // 100, dim))
    base = unit(centres[rng.integers(0, len(centres), n)] + 0.8 * rng.standard_normal((n, dim)))  # clustered
    index.add(rows(base, 1))
    assert index.build() == "trained" and index.has_index()
    planted = rng.choice(n, 100, replace=False)
    queries = np.stack([near(base[i], rng, noise=0.1) for i in planted])
    found = index.nearest(queries, k=5, max_version=1)
    recall = np.mean([hits[0][0] == f"clip-{i:06d}" for hits, i in zip(found, planted, strict=True)])
    assert recall >= 0.95
    exact = 1.0 - np.sum(queries * base[planted], axis=1)
    for hits, distance in zip(found, exact, strict=True):  # re-ranked on the stored vectors: exact distances
        assert hits[0][1] == pytest.approx(distance, abs=1e-4) or hits[0][1] < distance
    # Rows added after the index are searched too (brute force over them), then folded into it. Each is at ~2e-4
    # from its source, so the top hit may be either: its own row is asked among the first 3.
    later = np.stack([near(base[i], rng, noise=0.02) for i in planted[:20]])
    index.add(rows(later, 2, prefix="later"))
    assert found_own_rows(index.nearest(later, k=3, max_version=2), "later") >= 0.95
    assert index.build() == "extended"
    assert found_own_rows(index.nearest(later, k=3), "later") >= 0.95
    # Each build() after an add makes a delta segment, until MAX_DELTAS would be reached: then one merged index.
    done = []
    for version in range(3, 3 + MAX_DELTAS):
        index.add(rows(unit(rng.standard_normal((5, dim))), version, prefix=f"v{version}"))
        done.append(index.build())
    assert done == ["extended"] * (MAX_DELTAS - 3) + ["merged"] + ["extended"] * 2
    assert [len(i.segments) for i in index._open().describe_indices()] == [3]


def found_own_rows(found: list[list[tuple[str, float]]], prefix: str) -> float:
    """The share of queries (rows `prefix`-000000, -000001, ... themselves) that find their own row, all at a
    near-duplicate distance."""
    assert all(hits[0][1] < 1e-3 for hits in found)
    return float(np.mean([f"{prefix}-{i:06d}" in [h[0] for h in hits] for i, hits in enumerate(found)]))


def test_dimension_mismatch_is_one_clear_line(index):
    rng = np.random.default_rng(4)
    index.add(rows(unit(rng.standard_normal((10, 32))), 1))
    with pytest.raises(ValueError, match=r"holds 32-d embeddings but 3 of the rows added have 16 .*clip_id other-"):
        index.add(rows(unit(rng.standard_normal((3, 16))), 2, prefix="other"))
    assert len(index) == 10
    with pytest.raises(ValueError, match="holds 32-d embeddings; the query vectors are 16-d"):
        index.nearest(unit(rng.standard_normal((2, 16))), k=1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.nearest(unit(rng.standard_normal((2, 32))), k=0)
    mixed = EmbeddingIndex(index.uri.replace("embeddings", "mixed"))
    with pytest.raises(ValueError, match="holds 8-d embeddings but 1 of the rows added have 4") as err:
        mixed.add(rows([np.ones(8), np.ones(8), np.ones(4)], 1))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not divide the embedding size 32"):
        big = EmbeddingIndex(index.uri.replace("embeddings", "big"))
        big.add(rows(unit(rng.standard_normal((MIN_INDEX_ROWS, 32))), 1))
        big.build(num_sub_vectors=5)
