"""Dedup through `run_curate` with real Ray and real files: copies of generated videos (re-encoded, half-size,
trimmed, re-muxed) planted in a dump are dropped naming the clip kept, within a version and across two versions;
the distinct videos lose no clip as a duplicate."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import av
import pytest

from curation.config import CurateConfig
from curation.dataset import CuratedDataset
from pipelines.config import load_config
from pipelines.curate import run_curate

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def reencode(src, dst, scale: float = 1.0, crf: int = 23, trim_s: float = 0.0) -> None:
    """A copy of `src` decoded and encoded again: another size, quality, or without its first `trim_s` seconds."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        enc = out.add_stream("libx264", rate=stream.average_rate, options={"crf": str(crf), "preset": "veryfast"})
        enc.width, enc.height = int(stream.width * scale) // 2 * 2, int(stream.height * scale) // 2 * 2
        enc.pix_fmt = "yuv420p"
        enc.codec_context.time_base = Fraction(1, int(stream.average_rate))
        index = 0
        for frame in inp.decode(stream):
            if frame.time < trim_s:
                continue
            picture = frame.reformat(width=enc.width, height=enc.height, format="yuv420p")
            copy = av.VideoFrame.from_ndarray(picture.to_ndarray(format="rgb24"), format="rgb24")
            copy.pts = index
            index += 1
            out.mux(enc.encode(copy))
        out.mux(enc.encode(None))


def remux(src, dst) -> None:
    """The same H.264 packets in another container (Matroska)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="matroska") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def _clips(dataset: CuratedDataset, version: int) -> dict[str, list[dict]]:
    """File name -> its clips (clip_id, kept, drop_reason) at `version`."""
    videos = {r["video_id"]: r["uri"].rsplit("/", 1)[-1] for r in dataset.read("videos", version).to_pylist()}
    out: dict[str, list[dict]] = {}
    for clip in dataset.read("clips", version, columns=["clip_id", "video_id", "kept", "drop_reason"]).to_pylist():
        out.setdefault(videos[clip["video_id"]], []).append(clip)
    return out


def _assert_copy(clips: dict[str, list[dict]], copy: str, kept_ids: set[str]) -> None:
    """Every clip of `copy` that the other filters kept is a duplicate of one of `kept_ids`, named in its reason."""
    judged = [c for c in clips[copy] if c["kept"] or (c["drop_reason"] or "").startswith("duplicate")]
    assert judged, f"{copy}: no clip passed the other filters"
    for clip in judged:
        assert not clip["kept"], f"{copy}: {clip['clip_id']} kept"
        named = clip["drop_reason"].split("of=", 1)[1].split(",", 1)[0]
        assert named in kept_ids, clip["drop_reason"]


def test_planted_copies_are_dropped_within_and_across_versions(sample_dump, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, _ = sample_dump
    dump, out = tmp_path / "dump", tmp_path / "curated"
    dump.mkdir()
    for name in ("004_single.mp4", "005_single.mp4", "001_cuts_pan.mp4"):
        shutil.copy(root / name, dump / name)
    reencode(root / "004_single.mp4", dump / "copy_004_crf35.mp4", crf=35)
    reencode(root / "001_cuts_pan.mp4", dump / "copy_001_half.mp4", scale=0.5)
    config = load_config(CurateConfig, None, [], base={"input": str(dump), "output": str(out)})
    first = run_curate(config)
    dataset = CuratedDataset(str(out))
    v1 = _clips(dataset, 1)
    # Of each original and its copy one clip is kept per shot, and the other names it.
    for original, copy in (("004_single.mp4", "copy_004_crf35.mp4"), ("001_cuts_pan.mp4", "copy_001_half.mp4")):
        pair = v1[original] + v1[copy]
        kept = {c["clip_id"] for c in pair if c["kept"]}
        dropped = [c for c in pair if (c["drop_reason"] or "").startswith("duplicate")]
        assert kept and dropped and len(kept) == len(dropped), (original, pair)
        for clip in dropped:
            assert clip["drop_reason"].split("of=", 1)[1].split(",", 1)[0] in kept
    assert not [c for c in v1["005_single.mp4"] if (c["drop_reason"] or "").startswith("duplicate")]
    assert first["counts"]["drop_reasons"]["duplicate"] >= 2

    # Version 2: a trimmed copy, a re-muxed copy and a new distinct video.
    reencode(root / "004_single.mp4", dump / "copy_004_trim.mp4", trim_s=1.1, crf=28)
    remux(root / "005_single.mp4", dump / "copy_005.mkv")
    shutil.copy(root / "006_single.mp4", dump / "006_single.mp4")
    second = run_curate(config)
    assert second["dataset_version"] == 2
    v2 = _clips(dataset, 2)
    kept_v1 = {c["clip_id"] for clips in v1.values() for c in clips if c["kept"]}
    _assert_copy(v2, "copy_004_trim.mp4", kept_v1)
    _assert_copy(v2, "copy_005.mkv", {c["clip_id"] for c in v1["005_single.mp4"] if c["kept"]})
    assert any(c["kept"] for c in v2["006_single.mp4"])
    assert not [c for c in v2["006_single.mp4"] if (c["drop_reason"] or "").startswith("duplicate")]
    assert second["counts"]["drop_reasons"]["duplicate"] >= 2
    # The shards hold the kept clips only: no copy reaches training.
    shards = set(dataset.read("shards", 2, columns=["clip_id"])["clip_id"].to_pylist())
    assert shards == {c["clip_id"] for clips in v2.values() for c in clips if c["kept"]}

    # MLflow: the version's run counts the duplicates and its report shows the dedup thresholds, marked not applied
    # for the semantic step (the default CLIP is untrained), with the warning that says so.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run_id = second["run"]["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["dropped_by.duplicate"] == second["counts"]["drop_reasons"]["duplicate"]
    table = Path(client.download_artifacts(run_id, "report/drop_reasons.md", str(tmp_path))).read_text()
    assert "| duplicate | max hamming 10; min cos 0.95 (not applied: untrained) |" in table
    assert "semantic step (CLIP embeddings) is off" in table
