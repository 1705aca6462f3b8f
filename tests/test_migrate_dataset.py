"""`reelforge migrate-dataset` on a 0.1 layout written here as 0.1 wrote it (per-version Parquet files and
manifest.json, a quarantined video retried and superseded in version 2): each migrated version reads as the old
layout did at that version, the old files stay, and a rerun, also after a crash, finishes or does nothing."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation import schema
from curation.config import CurateConfig
from curation.dataset import KEYS, CuratedDataset, DatasetError, open_data
from curation.legacy import LegacyLayoutError, read_table
from curation.lock import LOCK_TAG
from curation.outputs import OutputDir
from curation.redact import redacted_yaml
from curation.writer import BatchCommitter, finish_filters, tag_version
from pipelines.cli import main
from pipelines.migrate_dataset import run_migrate, summary_text

# The 0.1 schemas: today's without dataset_version; version 1 below was written before captions and scores (schema 1).
OLD = {kind: pa.schema([f for f in getattr(schema, kind.upper()) if f.name != "dataset_version"])
       for kind in ("videos", "clips", "shards")}
SCORED = {"caption", "caption_source", "aesthetic", "caption_match", "clip_embedding", "score_model"}
SCHEMA_1 = {kind: pa.schema([f for f in s if f.name not in SCORED]) for kind, s in OLD.items()}


def _video(video_id: str, status: str = "ok") -> dict:
    return {"video_id": video_id, "uri": f"s3://bucket/dump/{video_id}.mp4?endpoint_override=h:1", "size_bytes": 100,
            "status": status, "error_class": None if status == "ok" else "decode_error", "fps": 8.0, "width": 32,
            "height": 24, "duration_s": 4.0, "num_frames": 32, "cut_frames": [0], "transitions": []}


def _clip(clip_id: str, kept: bool, caption: str | None = None) -> dict:
    return {"clip_id": clip_id, "video_id": clip_id.rsplit("-", 1)[0], "start_frame": 0, "end_frame": 23,
            "start_s": 0.0, "end_s": 3.0, "num_frames": 24, "motion_median": 2.0 if kept else 0.1, "kept": kept,
            "drop_reason": None if kept else "motion(0.1<0.5)", "keyframes": [b"jpeg " + clip_id.encode()],
            "caption": caption, "aesthetic": 5.0 if caption else None}


def _shard(clip: dict) -> dict:
    return {**clip, "uri": f"s3://bucket/dump/{clip['video_id']}.mp4", "fps": 8.0, "width": 32, "height": 24,
            "video_bytes": b"mp4 " + clip["clip_id"].encode()}


def _write(out: OutputDir, rel: str, rows: list[dict], table_schema: pa.Schema) -> dict:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=table_schema), sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    out.makedirs(rel.split("/")[0])
    out.write_bytes_atomic(rel, data)
    return {"path": rel, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def write_legacy(root: Path) -> dict:
    """Two versions as reelforge 0.1 wrote them: v1 (schema 1) va (a clip kept, one dropped), vb quarantined, vc;
    v2 (schema 2) vb retried (superseding its v1 row) and vd. Shards of v1 in two files; a leftover staged video."""
    out = OutputDir(str(root))
    v1_clips = [_clip("va-0000000", True), _clip("va-0000001", False), _clip("vc-0000000", True)]
    v2_clips = [_clip("vb-0000000", True, "a dog"), _clip("vd-0000000", True, "waves"),
                _clip("vd-0000001", False, "still")]
    files = {
        1: {"videos": [_write(out, "videos/v0001-00000.parquet",
                              [_video("va"), _video("vb", "quarantined"), _video("vc")], SCHEMA_1["videos"])],
            "clips": [_write(out, "clips/v0001-00000.parquet", v1_clips, SCHEMA_1["clips"])],
            "shards": [_write(out, "shards/v0001-00000.parquet", [_shard(v1_clips[0])], SCHEMA_1["shards"]),
                       _write(out, "shards/v0001-00001.parquet", [_shard(v1_clips[2])], SCHEMA_1["shards"])]},
        2: {"videos": [_write(out, "videos/v0002-00000.parquet", [_video("vb"), _video("vd")], OLD["videos"])],
            "clips": [_write(out, "clips/v0002-00000.parquet", v2_clips, OLD["clips"])],
            "shards": [_write(out, "shards/v0002-00000.parquet", [_shard(c) for c in v2_clips[:2]], OLD["shards"])]},
    }
    configs = {n: {"input": "/dump", "output": str(root), "filters": {"motion": {"min": 0.5 * n}}} for n in (1, 2)}
    versions = []
    for n in (1, 2):
        out.write_bytes_atomic(f"config-v000{n}.yaml", redacted_yaml(configs[n]).encode())
        out.makedirs(f"reports/v000{n}")
        out.write_bytes_atomic(f"reports/v000{n}/report.html", b"<html></html>")
        versions.append({"version": n, "config": f"config-v000{n}.yaml", "counts": {"videos": 3 if n == 1 else 2},
                         "files": files[n], "filters": [{"score": "motion", "side": "min", "value": 0.5 * n}],
                         "scores_untrained": False, "warnings": [f"warning {n}"],
                         "superseded": ["vb"] if n == 2 else [], "run": {"mlflow_run_id": f"run{n}"},
                         "report": [f"reports/v000{n}/report.html"]})
    manifest = {"schema_version": 2, "dataset_version": 2, "config": configs[2], "counts": versions[-1]["counts"],
                "run": versions[-1]["run"], "duplicates": {"/dump/copy.mp4": "va"}, "versions": versions,
                "files": [f for v in versions for kind in ("videos", "clips", "shards") for f in v["files"][kind]]}
    out.write_bytes_atomic("manifest.json", json.dumps(manifest, indent=2).encode())
    _write(out, "_staging/ve.parquet", [_video("ve")], OLD["videos"])
    return manifest


def _old_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".lance" not in str(p.relative_to(root)).split("/")[0]}


def _rows(table: pa.Table, kind: str) -> list[dict]:
    names = [n for n in getattr(schema, kind.upper()).names if n != "dataset_version"]
    return sorted(table.select(names).to_pylist(), key=lambda r: r[KEYS[kind]])


def _expected(root: Path, kind: str, version: int | None) -> list[dict]:
    """What the 0.1 reader returned, in today's column types."""
    table = read_table(str(root), kind, up_to=version)
    target = [f for f in getattr(schema, kind.upper()) if f.name != "dataset_version"]
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in target]
    return _rows(pa.table(columns, schema=pa.schema(target)), kind)


def _lance_state(root: Path) -> dict:
    dataset = CuratedDataset(str(root))
    return {kind: (dataset.open(kind).version, sorted(dataset.open(kind).tags.list())) for kind in KEYS}


@pytest.fixture
def legacy(tmp_path) -> Path:
    root = tmp_path / "curated"
    write_legacy(root)
    return root


def test_an_unmigrated_layout_names_the_command(legacy, tmp_path, capsys):
    with pytest.raises(DatasetError, match=f"reelforge migrate-dataset --data {legacy}`$"):
        open_data(str(legacy))  # what train, evaluate and export-dataset open --data with
    assert main(["train", "--data", str(legacy), "--output", str(tmp_path / "train")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"migrate it once with `reelforge migrate-dataset --data {legacy}`" in err


def test_each_migrated_version_reads_as_the_old_layout_did(legacy):
    old = _old_files(legacy)
    result = run_migrate(str(legacy))
    assert result.migrated == [1, 2] and result.rows == {"videos": 4, "clips": 6, "shards": 4}
    dataset = CuratedDataset(str(legacy))
    assert [v.number for v in dataset.versions()] == [1, 2]
    for version in (1, 2):
        for kind in KEYS:
            migrated = dataset.read(kind, version)
            assert _rows(migrated, kind) == _expected(legacy, kind, version), (kind, version)
    for kind in KEYS:  # the newest version is what the 0.1 reader gives without a version
        assert _rows(dataset.read(kind), kind) == _expected(legacy, kind, None)
    videos = {r["video_id"]: r for r in dataset.read("videos", 2).to_pylist()}
    assert (videos["vb"]["status"], videos["vb"]["dataset_version"], videos["va"]["dataset_version"]) == ("ok", 2, 1)
    assert dataset.read("videos", 1, filter="video_id = 'vb'")["status"].to_pylist() == ["quarantined"]
    assert dataset.read("clips", 1)["caption"].null_count == 3  # schema 1 had no captions
    assert sorted(dataset.read("shards", 1)["clip_id"].to_pylist()) == ["va-0000000", "vc-0000000"]
    assert open_data(f"{legacy}@v1")[1] == 1 and open_data(str(legacy))[1] == 2
    assert _old_files(legacy) == old  # nothing already written is lost or changed


def test_each_version_keeps_its_record(legacy):
    manifest = write_legacy(legacy)
    run_migrate(str(legacy))
    dataset = CuratedDataset(str(legacy))
    for entry in manifest["versions"]:
        record = dataset.record(entry["version"])
        assert record["migrated_from"] == "parquet manifest" and record["schema_version"] == schema.SCHEMA_VERSION
        assert record["dataset_version"] == entry["version"] and record["legacy_schema_version"] == 2
        for key in ("counts", "filters", "warnings", "run", "report", "scores_untrained"):
            assert record[key] == entry[key], key
        config_text = (legacy / entry["config"]).read_text()
        assert record["config"] == yaml.safe_load(config_text) and record["config_file"] == entry["config"]
        assert record["config_sha256"] == hashlib.sha256(config_text.encode()).hexdigest()
        assert record["legacy_files"] == entry["files"] and record["retried"] == entry["superseded"]
    assert dataset.record(2)["duplicates"] == {"/dump/copy.mp4": "va"} and "duplicates" not in dataset.record(1)


class Killed(BaseException):
    """Stands for kill -9 part-way through a version."""


def test_a_rerun_after_a_crash_finishes_and_a_second_rerun_does_nothing(legacy, monkeypatch, capsys):
    import curation.legacy

    real_tag = curation.legacy.tag_version

    def tag_then_die(dataset, version, record):
        if version == 2:
            raise Killed
        return real_tag(dataset, version, record)

    monkeypatch.setattr(curation.legacy, "tag_version", tag_then_die)
    with pytest.raises(Killed):
        run_migrate(str(legacy))
    monkeypatch.setattr(curation.legacy, "tag_version", real_tag)
    dataset = CuratedDataset(str(legacy))
    assert [v.number for v in dataset.versions()] == [1] and dataset.open("shards").count_rows() == 4
    # kill -9 leaves the lease behind, held by a process that is gone
    dataset.open("videos").tags.create(LOCK_TAG, dataset.open("videos").version)
    dataset.open("videos").tags.replace_metadata(LOCK_TAG, {"host": socket.gethostname(), "pid": "999999999",
                                                            "started": "0", "heartbeat": "0"})
    assert main(["migrate-dataset", "--data", str(legacy)]) == 0
    printed = capsys.readouterr().out
    assert "migrated" in printed and "(1 migrated by this run)" in printed and "1 videos staged" in printed
    for kind in KEYS:
        assert _rows(dataset.read(kind, 2), kind) == _expected(legacy, kind, 2)
        assert _rows(dataset.read(kind, 1), kind) == _expected(legacy, kind, 1)
    before = _lance_state(legacy)
    assert LOCK_TAG not in before["videos"][1]
    assert main(["migrate-dataset", "--data", str(legacy)]) == 0
    assert "is already migrated" in capsys.readouterr().out and _lance_state(legacy) == before


def test_curate_goes_on_from_a_migrated_dataset(legacy):
    run_migrate(str(legacy))
    dataset = CuratedDataset(str(legacy))
    committer = BatchCommitter(dataset, 3, every=1)
    video = {name: None for name in schema.VIDEOS.names}
    video.update(_video("vf"), clips=[])
    committer.add(video)
    written = finish_filters(dataset, CurateConfig(), 3, retried=[])
    tag_version(dataset, 3, {"dataset_version": 3, "counts": written.counts})
    assert sorted(dataset.read("videos", 3)["video_id"].to_pylist()) == ["va", "vb", "vc", "vd", "vf"]
    assert summary_text(run_migrate(str(legacy))).startswith(f"{legacy} is already migrated")


def test_what_is_not_a_legacy_layout_is_refused(tmp_path, legacy, capsys):
    with pytest.raises(LegacyLayoutError, match="has no manifest.json: it is not in the Parquet layout"):
        run_migrate(str(tmp_path / "empty"))
    with pytest.raises(LegacyLayoutError, match="drop @v1"):
        run_migrate(f"{legacy}@v1")
    (legacy / "shards" / "v0001-00001.parquet").rename(tmp_path / "aside.parquet")
    assert main(["migrate-dataset", "--data", str(legacy)]) == 2
    err = capsys.readouterr().err
    assert "shards/v0001-00001.parquet listed in manifest.json (version 1) is missing" in err and err.count("\n") == 1
    assert not (legacy / "videos.lance").exists()  # checked before anything is written
    (tmp_path / "aside.parquet").rename(legacy / "shards" / "v0001-00001.parquet")
    run_migrate(str(legacy))
    os.rename(legacy / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(LegacyLayoutError, match="is already a Lance curated dataset \\(versions: v1, v2\\)"):
        run_migrate(str(legacy))
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "manifest.json").write_text("{")
    with pytest.raises(LegacyLayoutError, match="not readable JSON"):
        run_migrate(str(tmp_path / "notjson"))
