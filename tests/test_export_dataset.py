"""`reelforge export-dataset` on a small Lance dataset of two versions written by the real writer: Parquet and
WebDataset files hold exactly the kept clips of the version asked for, byte for byte the same on a rerun."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.config import CurateConfig
from curation.dataset import CuratedDataset
from curation.writer import BatchCommitter, create_tables, finish_filters, tag_version
from pipelines.cli import main
from pipelines.export_dataset import ExportConfig, ExportError, run_export, sample_key

# clip_id -> caption of the kept clips of each version (one id holds characters a WebDataset key cannot)
KEPT_V1 = {"va-0000000": "a red ball", "vc/take.1-0000000": "a cat, sleeping"}
KEPT_V2 = {**KEPT_V1, "vd-0000000": "waves", "vd-0000001": None, "vb-0000000": "a retried video"}


def _clip(clip_id: str, video_id: str, caption: str | None, kept: bool) -> dict:
    clip = {name: None for name in schema.CLIPS.names}
    clip.update(clip_id=clip_id, video_id=video_id, start_frame=0, end_frame=47, start_s=0.0, end_s=3.0,
                num_frames=48, motion_mean=2.0, motion_median=2.0 if kept else 0.1, motion_p90=3.0, is_static=False,
                keyframes=[b"jpeg"], caption=caption, caption_source="sidecar" if caption else None, width=32,
                height=24, drop_reason=None if kept else "motion(0.1<0.5)",
                video_bytes=f"mp4 bytes of {clip_id}".encode() * 3 if kept else None)
    return clip


def _video(video_id: str, clips: list[dict], quarantined: bool = False) -> dict:
    video = {name: None for name in schema.VIDEOS.names}
    video.update(video_id=video_id, uri=f"/dump/{video_id}.mp4", size_bytes=1000, fps=16.0, width=32, height=24,
                 duration_s=3.0, num_frames=48, status="quarantined" if quarantined else "ok",
                 error_class="decode_error" if quarantined else None)
    return {**video, "clips": clips}


def _write_version(dataset: CuratedDataset, version: int, records: list[dict], retried: list[str]) -> None:
    committer = BatchCommitter(dataset, version, every=2)
    for record in records:
        committer.add(record)
    committer.flush()
    written = finish_filters(dataset, CurateConfig(), version, retried=retried)
    tag_version(dataset, version, {"schema_version": schema.SCHEMA_VERSION, "dataset_version": version,
                                   "counts": written.counts})


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """v1: va (one clip kept, one dropped), vb quarantined, vc; v2: vd and vb retried."""
    root = tmp_path_factory.mktemp("curated")
    dataset = CuratedDataset(str(root))
    create_tables(dataset)
    _write_version(dataset, 1, [
        _video("va", [_clip("va-0000000", "va", "a red ball", True), _clip("va-0000001", "va", "static", False)]),
        _video("vb", [], quarantined=True),
        _video("vc/take.1", [_clip("vc/take.1-0000000", "vc/take.1", "a cat, sleeping", True)]),
    ], [])
    _write_version(dataset, 2, [
        _video("vd", [_clip("vd-0000000", "vd", "waves", True), _clip("vd-0000001", "vd", None, True)]),
        _video("vb", [_clip("vb-0000000", "vb", "a retried video", True)]),
    ], ["vb"])
    return root


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_parquet_export_holds_the_kept_clips_of_the_version(curated, tmp_path):
    for data, kept, name in ((f"{curated}@v1", KEPT_V1, "v1"), (str(curated), KEPT_V2, "newest")):
        out = tmp_path / name
        summary = run_export(ExportConfig(data=data, format="parquet", output=str(out), rows_per_file=2))
        parts = sorted(out.glob("part-*.parquet"))
        assert [p.name for p in parts] == [f"part-{i:06d}.parquet" for i in range((len(kept) + 1) // 2)]
        table = pq.read_table(out)  # the folder reads as one table
        assert sorted(table["clip_id"].to_pylist()) == sorted(kept) == table["clip_id"].to_pylist()
        assert dict(zip(table["clip_id"].to_pylist(), table["caption"].to_pylist(), strict=True)) == kept
        row = table.to_pylist()[0]
        assert row["video_bytes"] == f"mp4 bytes of {row['clip_id']}".encode() * 3
        assert row["fps"] == 16.0 and row["width"] == 32 and row["num_frames"] == 48 and row["uri"].endswith(".mp4")
        assert "kept" not in table.column_names and "motion_median" in table.column_names
        manifest = json.loads((out / "_export.json").read_text())
        assert manifest == summary and manifest["rows"] == len(kept) and manifest["source"] == str(curated)
        assert manifest["dataset_version"] == (1 if "@v1" in data else 2)
        assert [f["path"] for f in manifest["files"]] == [p.name for p in parts]
        assert [f["sha256"] for f in manifest["files"]] == [_files(out)[p.name] for p in parts]
    assert {r["dataset_version"] for r in pq.read_table(tmp_path / "newest").to_pylist()} == {1, 2}


def test_webdataset_export_reads_back_with_webdataset(curated, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    run_export(ExportConfig(data=str(curated), format="webdataset", output=str(out), rows_per_file=2))
    tars = sorted(str(p) for p in out.glob("shard-*.tar"))
    assert [Path(t).name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(c) for c in sorted(KEPT_V2)]
    for sample in samples:
        meta = json.loads(sample["json"])
        clip_id = meta["clip_id"]
        assert sample["txt"].decode() == (KEPT_V2[clip_id] or "")
        assert sample["mp4"] == f"mp4 bytes of {clip_id}".encode() * 3
        assert meta["video_id"] == clip_id.rsplit("-", 1)[0] and meta["fps"] == 16.0 and meta["num_frames"] == 48
        assert (meta["width"], meta["height"]) == (32, 24) and meta["scores"]["motion_median"] == 2.0
        assert meta["dataset_version"] == (1 if clip_id in KEPT_V1 else 2)
    assert sample_key("vc/take.1-0000000").startswith("vc_take_1-0000000-") and sample_key("va-0") == "va-0"
    with tarfile.open(tars[0]) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0} and {m.uname for m in tar.getmembers()} == {""}


def test_a_rerun_writes_identical_files(curated, tmp_path):
    for fmt in ("parquet", "webdataset"):
        first, second = tmp_path / f"{fmt}-1", tmp_path / f"{fmt}-2"
        run_export(ExportConfig(data=str(curated), format=fmt, output=str(first), rows_per_file=3))
        run_export(ExportConfig(data=str(curated), format=fmt, output=str(second), rows_per_file=3))
        assert _files(first) == _files(second) and len(_files(first)) == 3
        run_export(ExportConfig(data=str(curated), format=fmt, output=str(first), rows_per_file=3, overwrite=True))
        assert _files(first) == _files(second)


def test_a_non_empty_output_is_refused_unless_overwrite(curated, tmp_path):
    out = tmp_path / "out"
    run_export(ExportConfig(data=f"{curated}@v2", format="webdataset", output=str(out), rows_per_file=1))
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    with pytest.raises(ExportError, match="is not empty .* pass --overwrite"):
        run_export(ExportConfig(data=f"{curated}@v1", format="webdataset", output=str(out)))
    assert _files(out) == before
    run_export(ExportConfig(data=f"{curated}@v1", format="webdataset", output=str(out), overwrite=True))
    assert sorted(_files(out)) == ["_export.json", "notes.txt", "shard-000000.tar"]  # the old shards are gone


def test_cli_errors_are_one_line(curated, tmp_path, capsys):
    assert main(["export-dataset", "--data", f"{curated}@v9", "--format", "parquet", "--output",
                 str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no dataset version 9 (versions: v1, v2)" in err
    assert main(["export-dataset", "--data", str(tmp_path / "nothing"), "--format", "parquet", "--output",
                 str(tmp_path / "b")]) == 2
    assert "has no curated" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["export-dataset", "--data", f"{curated}@v1", "--format", "parquet", "--output",
                 str(tmp_path / "c")]) == 0
    assert "exported 2 clips" in capsys.readouterr().out


def test_dataset_versions_lists_each_finished_version(curated, capsys):
    assert main(["dataset-versions", "--data", str(curated)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["version", "videos", "quarantined", "clips", "kept"]
    assert [line.split()[:5] for line in lines[1:]] == [["v1", "3", "1", "3", "2"], ["v2", "2", "0", "3", "3"]]
