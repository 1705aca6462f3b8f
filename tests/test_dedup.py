"""Deduplication without Ray: pHash signatures of generated frames and their copies, SemDeDup on planted embeddings,
and the `dedup` filter finishing two dataset versions of hand-built clips (in-version and cross-version drops)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from curation import hash_index, schema
from curation.config import CurateConfig, DedupConfig, ScoreFilter
from curation.dataset import CuratedDataset
from curation.dedup import index_hashes, semdedup
from curation.hash_index import HashIndex
from curation.phash import FLAT, ClipSignature, align, hamming, phash
from curation.report import write_report
from curation.writer import BatchCommitter, create_tables, finish_filters, index_embeddings, tag_version

TRAINED, UNTRAINED = "open_clip:ViT-L-14 openai", "open_clip:tiny (untrained)"
FPS = 24


def scene(seed: int, frames: int = 120, shift: int = 2) -> list[np.ndarray]:
    """A textured picture (smoothed noise, 3 colours) panning `shift` px a frame, 128x72 like an analysis picture."""
    rng = np.random.default_rng(seed)
    big = cv2.GaussianBlur(rng.integers(0, 256, (200, 128 + shift * frames, 3)).astype(np.uint8), (0, 0), 4)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX)
    return [np.ascontiguousarray(big[60:132, i * shift:i * shift + 128]) for i in range(frames)]


def reencoded(frame: np.ndarray, quality: int = 30) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def resized(frame: np.ndarray) -> np.ndarray:
    """Down to half and back to the analysis width, as a half-size copy's analysis picture is made."""
    half = cv2.resize(frame, (64, 36), interpolation=cv2.INTER_AREA)
    return cv2.resize(half, (128, 72), interpolation=cv2.INTER_LINEAR)


def signature(frames: list[np.ndarray], interval_s: float = 0.25) -> ClipSignature:
    sig = ClipSignature(interval_s, 0.0)
    for i, frame in enumerate(frames):
        sig.add(i / FPS, frame)
    return sig


def _align(a: ClipSignature, b: ClipSignature):
    config = DedupConfig()
    thumbs = [np.frombuffer(b"".join(s.thumbs), np.uint8).reshape(len(s.hashes), -1) for s in (a, b)]
    return align(np.array(a.hashes), np.array(b.hashes), thumbs[0], thumbs[1], config.max_color, config.min_overlap,
                 config.min_samples)


def test_phash_moves_little_under_reencoding_and_resizing_and_a_lot_between_scenes():
    a, b = scene(0)[0], scene(1)[0]
    copies = [phash(reencoded(a)), phash(resized(a)), phash(reencoded(resized(a), 20))]
    assert max(int(hamming(phash(a), h)) for h in copies) <= 6
    assert int(hamming(phash(a), phash(b))) >= 20
    assert phash(np.full((72, 128, 3), 40, np.uint8)) == FLAT  # a flat frame matches nothing


def test_a_trimmed_copy_aligns_at_its_shift_and_other_scenes_do_not_align():
    frames = scene(2)
    original = signature(frames)
    # Trimmed by 1.1 s (not a multiple of the sampling interval: the grids are out of phase), re-encoded.
    copy = signature([reencoded(f) for f in frames[int(1.1 * FPS):]])
    found = _align(original, copy)
    # A pan of 2 px a frame, sampled up to 0.1 s apart: further than a copy on the grid, within the threshold.
    assert found is not None and found.offset == -4 and found.hamming <= DedupConfig().max_hamming
    assert found.overlap == len(copy.hashes)
    other = _align(original, signature(scene(3)))
    assert other is None or other.hamming > DedupConfig().max_hamming


def test_semdedup_finds_planted_near_duplicates_and_drops_nothing_else():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3000, 64)).astype(np.float32)
    planted = rng.choice(3000, 60, replace=False)
    noise = rng.standard_normal((60, 64)).astype(np.float32)
    copies = base[planted] / np.linalg.norm(base[planted], axis=1, keepdims=True) + 0.15 * noise / np.linalg.norm(
        noise, axis=1, keepdims=True)
    x = np.concatenate([base, copies])
    duplicate_of, cosine = semdedup(x, np.arange(len(x)), min_cosine=0.95, clusters=None, seed=0)
    dropped = np.flatnonzero(duplicate_of >= 0)
    # Each planted copy (rows 3000..3059, later in the order than its original) is dropped in favour of it...
    found = sum(duplicate_of[3000 + i] == p for i, p in enumerate(planted))
    assert found >= 57, found  # SemDeDup misses a pair that k-means split across clusters (rarely, at sqrt(n))
    # ...and no distinct vector (random 64-d: cosine ~ 0 +- 0.13) is dropped.
    assert set(dropped) <= set(range(3000, 3060))
    assert np.nanmax(cosine[:3000]) < 0.95


def test_bad_dedup_settings_name_the_key():
    with pytest.raises(ValueError, match="filters.dedup.min_overlap"):
        DedupConfig(min_overlap=0)


# --- the dedup filter finishing versions of hand-built clips ------------------------------------------------------


def _clip(video_id: str, frames: list[np.ndarray], embedding: np.ndarray, aesthetic: float,
          score_model: str) -> dict:
    sig = signature(frames)
    return {"clip_id": f"{video_id}-0000000", "video_id": video_id, "start_frame": 0,
            "end_frame": len(frames) - 1, "start_s": 0.0, "end_s": len(frames) / FPS, "num_frames": len(frames),
            "motion_mean": 5.0, "motion_median": 5.0, "motion_p90": 6.0, "is_static": False,
            "keyframes": [cv2.imencode(".jpg", frames[0])[1].tobytes()], "kept": True, "drop_reason": None,
            "aesthetic": aesthetic,
            "caption_match": 0.3, "clip_embedding": embedding.tolist(), "score_model": score_model,
            "frame_hashes": sig.hashes, "frame_thumbs": b"".join(sig.thumbs),
            "video_bytes": f"mp4 {video_id}".encode(), "width": 128, "height": 72}


def _staged(video_id: str, *clips: dict) -> dict:
    row = {name: None for name in schema.VIDEOS.names}
    row.update(video_id=video_id, uri=f"/dump/{video_id}.mp4", size_bytes=1, status="ok", fps=FPS, width=128,
               height=72, duration_s=5.0, cut_frames=[], transitions=[], clips=list(clips))
    return row


def _finish(dataset: CuratedDataset, config: CurateConfig, version: int, *records: dict):
    committer = BatchCommitter(dataset, version, 8)
    for record in records:
        committer.add(record)
    committer.flush()
    written = finish_filters(dataset, config, version, retried=[])
    assert index_embeddings(dataset, version) is None
    index_hashes(dataset, version)
    tag_version(dataset, version, {"dataset_version": version, "scores_untrained": written.untrained})
    return written


def _unit(rng: np.random.Generator, dim: int = 32) -> np.ndarray:
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def _near(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """cos ~ 0.99 to v."""
    w = v + 0.12 * _unit(rng, len(v))
    return w / np.linalg.norm(w)


def _reasons(dataset: CuratedDataset) -> dict[str, str | None]:
    table = dataset.read("clips", columns=["clip_id", "drop_reason"])
    return dict(zip(table["clip_id"].to_pylist(), table["drop_reason"].to_pylist(), strict=True))


@pytest.fixture
def config() -> CurateConfig:
    config = CurateConfig()
    config.filters.aesthetic = ScoreFilter()
    config.filters.caption_match = ScoreFilter()
    return config


def test_copies_and_near_duplicates_are_dropped_naming_the_kept_clip_within_and_across_versions(tmp_path, config):
    rng = np.random.default_rng(1)
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    frames = {name: scene(seed) for name, seed in (("a", 10), ("c", 11), ("d", 12), ("g", 13), ("h", 14))}
    emb = {name: _unit(rng) for name in ("a", "c", "g", "h")}
    # Version 1: a, its re-encoded half-size copy b (better aesthetic, but a's is higher), c, and d whose pictures
    # differ from c's but whose embedding is c's near-duplicate (a semantic duplicate, no copy).
    written = _finish(dataset, config, 1,
                      _staged("a", _clip("a", frames["a"], emb["a"], 6.0, TRAINED)),
                      _staged("b", _clip("b", [reencoded(resized(f)) for f in frames["a"]], _near(emb["a"], rng),
                                         5.0, TRAINED)),
                      _staged("c", _clip("c", frames["c"], emb["c"], 5.5, TRAINED)),
                      _staged("d", _clip("d", frames["d"], _near(emb["c"], rng), 5.0, TRAINED)))
    reasons = _reasons(dataset)
    assert reasons["a-0000000"] is None and reasons["c-0000000"] is None
    assert reasons["b-0000000"].startswith("duplicate(of=a-0000000, hamming=")
    assert reasons["d-0000000"].startswith("duplicate(of=c-0000000, cos=0.9")
    assert written.counts["drop_reasons"] == {"duplicate": 2} and written.counts["clips_kept"] == 2
    assert sorted(dataset.read("shards", columns=["clip_id"])["clip_id"].to_pylist()) == ["a-0000000", "c-0000000"]
    by_id = {s["clip_id"]: s for s in written.scores}
    assert by_id["b-0000000"]["dedup_hamming"] <= 6 and by_id["d-0000000"]["dedup_cos"] > 0.95
    assert {b["label"] for b in written.bounds if b["score"] == "duplicate"} == {"hamming 10", "cos 0.95"}
    assert len(HashIndex(str(tmp_path / "frame_hashes.lance"))) > 0
    # The report: a drop-reason row for dedup with both thresholds, and the histograms of the nearest distances.
    report = write_report(tmp_path / "report", written)
    table = (tmp_path / "report" / "drop_reasons.md").read_text()
    assert "| duplicate | max hamming 10; min cos 0.95 | 2 | 2 | 50.0% |" in table
    assert {p.name for p in report} >= {"histograms.png", "drop_reasons.md"}

    # Version 2: a trimmed copy of a (with a higher aesthetic: the earlier version's clip stays anyway), a near
    # duplicate of c by embedding, and two distinct clips, one of them in twice (a re-mux: the same pictures).
    _finish(dataset, config, 2,
            _staged("e", _clip("e", [reencoded(f) for f in frames["a"][30:]], _near(emb["a"], rng), 9.0, TRAINED)),
            _staged("f", _clip("f", frames["d"][::-1], _near(emb["c"], rng), 9.0, TRAINED)),
            _staged("g", _clip("g", frames["g"], emb["g"], 5.0, TRAINED)),
            _staged("h", _clip("h", frames["h"], emb["h"], 5.0, TRAINED)),
            _staged("i", _clip("i", frames["h"], emb["h"], 4.0, TRAINED)))
    reasons = _reasons(dataset)
    assert reasons["e-0000000"].startswith("duplicate(of=a-0000000, hamming=")
    assert reasons["f-0000000"].startswith("duplicate(of=c-0000000, cos=0.9")
    assert reasons["g-0000000"] is None and reasons["h-0000000"] is None
    assert reasons["i-0000000"] == "duplicate(of=h-0000000, hamming=0)"
    # Version 1 reads as it was.
    assert _reasons_at(dataset, 1)["a-0000000"] is None and "e-0000000" not in _reasons_at(dataset, 1)


def _reasons_at(dataset: CuratedDataset, version: int) -> dict[str, str | None]:
    table = dataset.read("clips", version, columns=["clip_id", "drop_reason"])
    return dict(zip(table["clip_id"].to_pylist(), table["drop_reason"].to_pylist(), strict=True))


def test_with_untrained_embeddings_the_semantic_step_is_off_and_says_so(tmp_path, config):
    rng = np.random.default_rng(2)
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    v = _unit(rng)
    written = _finish(dataset, config, 1,
                      _staged("a", _clip("a", scene(20), v, 5.0, UNTRAINED)),
                      _staged("b", _clip("b", scene(21), v, 5.0, UNTRAINED)),  # the same embedding: cos 1
                      _staged("c", _clip("c", [reencoded(f) for f in scene(20)], v, 5.0, UNTRAINED)))
    reasons = _reasons(dataset)
    assert reasons["b-0000000"] is None  # only a semantic duplicate: kept
    # Copies are still found without weights; equal scores: the longer, then the first clip_id is kept.
    assert reasons["a-0000000"] is None and reasons["c-0000000"].startswith("duplicate(of=a-0000000, hamming=")
    semantic = next(b for b in written.bounds if b["score"] == "duplicate" and b["label"].startswith("cos"))
    assert semantic["applied"] is False
    assert any("semantic step" in w and "untrained" in w for w in written.warnings)
    write_report(tmp_path / "report", written)
    table = (tmp_path / "report" / "drop_reasons.md").read_text()
    assert "| duplicate | max hamming 10; min cos 0.95 (not applied: untrained) | 1 |" in table
    assert "semantic step (CLIP embeddings) is off" in table


def test_dedup_off_drops_no_duplicate(tmp_path, config):
    config.filters.dedup.enabled = False
    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    frames = scene(30)
    _finish(dataset, config, 1, _staged("a", _clip("a", frames, _unit(np.random.default_rng(0)), 5.0, TRAINED)),
            _staged("b", _clip("b", frames, _unit(np.random.default_rng(0)), 5.0, TRAINED)))
    assert set(_reasons(dataset).values()) == {None}


def test_the_hash_index_replaces_a_versions_rows_on_a_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(hash_index, "SCAN_ROWS", 7)  # a clip's rows span several scan batches
    index = HashIndex(str(tmp_path / "frame_hashes.lance"))
    sig = signature(scene(40))
    assert index.add(1, {"a": sig.hashes, "flat": [FLAT, FLAT]}) == len(sig.hashes)
    assert index.add(1, {"a": sig.hashes}) == len(sig.hashes) and len(index) == len(sig.hashes)
    copy = signature([reencoded(f) for f in scene(40)]).hashes
    assert index.candidates({"q": copy}, max_version=1) == {"q": {"a"}}
    assert index.candidates({"q": copy}, max_version=0) == {"q": set()}
    assert index.candidates({"q": signature(scene(41)).hashes}, max_version=1) == {"q": set()}
    index.add(2, {"b": signature(scene(42)).hashes})
    trimmed = signature([resized(f) for f in scene(42)[30:]]).hashes
    assert index.candidates({"q": copy, "r": trimmed}, max_version=2) == {"q": {"a"}, "r": {"b"}}
