"""Hostile sidecars and model-stage rows: an unusable sidecar is skipped and recorded, a bad row quarantines its
video only, and nothing is read through a link (issue 13, item 1 and the sidecar half of item 3)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from curation import schema
from curation.captions import UNUSABLE, CaptionStage
from curation.clip_scores import ClipScoreStage
from curation.config import CaptionConfig, ClipScoreConfig, CurateConfig
from curation.discover import DiscoverStage, list_videos
from curation.video_stage import VideoStage

SECRET = "SECRET=hunter2"  # what the secret_file fixture holds


def _staged(root, videos: list[bytes], names: list[str]) -> pa.Table:
    """Real staged rows: the videos written under root, listed, hashed and decoded as the pipeline does."""
    for data, name in zip(videos, names, strict=False):
        (root / name).write_bytes(data)
    config = CurateConfig()
    config.decode.isolate = False
    listed = DiscoverStage(config.discover)(pa.Table.from_pylist(list_videos(str(root), config.discover)))
    stage = VideoStage(config)
    stage.setup()
    staged = stage(listed)
    assert staged["status"].to_pylist() == ["ok"] * len(names)
    assert all(staged["clips"].to_pylist())
    return staged


def _caption(staged: pa.Table, **settings) -> list[dict]:
    stage = CaptionStage(CaptionConfig(enabled=False, **settings))
    stage.setup()
    return stage(staged).to_pylist()


def _nested(depth: int) -> str:
    return '{"caption": ' * depth + '"deep"' + "}" * depth


HOSTILE_JSON = {
    "nested_100k_deep": _nested(100_000),
    "segments_a_number": json.dumps({"caption": "whole", "segments": 5}),
    "segments_a_string": json.dumps({"caption": "whole", "segments": "abc"}),
    "segment_not_an_object": json.dumps({"caption": "whole", "segments": [5]}),
    "segment_time_overflows": '{"caption": "whole", "segments": [{"start_s": 0, "end_s": 1' + "0" * 400 + "}]}",
    "segment_time_infinite": '{"caption": "whole", "segments": [{"start_s": 0, "end_s": 1e999, "caption": "x"}]}',
    "a_list": json.dumps([{"caption": "not an object"}]),
}


@pytest.mark.parametrize("content", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_an_unusable_json_sidecar_is_recorded_and_the_clip_captioned_as_without(tmp_path, videos, caplog, content):
    staged = _staged(tmp_path, videos, ["a.mp4"])
    (tmp_path / "a.json").write_text(content)
    [video] = _caption(staged)
    assert video["status"] == "ok" and video["error_class"] == UNUSABLE
    assert video["error_message"].startswith(str(tmp_path / "a.json"))
    assert all(c["caption"] is None and c["caption_source"] is None for c in video["clips"])
    assert "a.json" in caplog.text


def test_a_txt_sidecar_still_captions_when_the_json_is_unusable(tmp_path, videos):
    staged = _staged(tmp_path, videos, ["a.mp4"])
    (tmp_path / "a.json").write_text(json.dumps({"segments": 5}))
    (tmp_path / "a.txt").write_text("a square moves\n")
    [video] = _caption(staged)
    assert {(c["caption"], c["caption_source"]) for c in video["clips"]} == {("a square moves", "sidecar")}
    assert video["error_class"] == UNUSABLE and "segments" in video["error_message"]


@pytest.mark.parametrize("ext", [".txt", ".json"])
def test_binary_garbage_sidecar_is_recorded(tmp_path, videos, ext):
    staged = _staged(tmp_path, videos, ["a.mp4"])
    (tmp_path / f"a{ext}").write_bytes(b"\xff\xfe\x00garbage\x80" * 100)
    [video] = _caption(staged)
    assert video["error_class"] == UNUSABLE and "not UTF-8" in video["error_message"]
    assert all(c["caption"] is None for c in video["clips"])


def test_a_sidecar_over_the_size_cap_is_not_read(tmp_path, videos):
    staged = _staged(tmp_path, videos, ["a.mp4"])
    cap = CaptionConfig().sidecar_max_bytes
    (tmp_path / "a.txt").write_text("a" * (cap + 1))
    [video] = _caption(staged)
    assert all(c["caption"] is None for c in video["clips"])
    assert video["error_class"] == UNUSABLE and "sidecar_max_bytes" in video["error_message"]
    [video] = _caption(staged, sidecar_max_bytes=cap + 1)  # the cap is a setting
    assert {c["caption"] for c in video["clips"]} == {"a" * (cap + 1)}


@pytest.mark.parametrize("ext", [".txt", ".json"])
def test_a_sidecar_linked_out_of_the_root_is_never_read(tmp_path, videos, secret_file, ext):
    staged = _staged(tmp_path, videos, ["a.mp4"])
    secret_file.write_text(json.dumps({"caption": SECRET}) if ext == ".json" else SECRET)
    os.symlink(secret_file, tmp_path / f"a{ext}")
    out = pa.Table.from_pylist(_caption(staged), schema=schema.STAGED)
    assert "hunter2" not in str(out.to_pylist())
    [video] = out.to_pylist()
    assert video["error_class"] == UNUSABLE and "symbolic link" in video["error_message"]


def test_a_sidecar_linked_to_proc_self_environ_leaks_nothing(tmp_path, videos, monkeypatch):
    monkeypatch.setenv("REELFORGE_TEST_TOKEN", "hunter2")  # what the environment of this process holds
    staged = _staged(tmp_path, videos, ["a.mp4"])
    os.symlink("/proc/self/environ", tmp_path / "a.txt")
    out = _caption(staged)
    assert "hunter2" not in str(out)
    assert out[0]["error_class"] == UNUSABLE


def test_a_fifo_named_like_a_sidecar_is_refused_without_blocking(tmp_path, videos):
    staged = _staged(tmp_path, videos, ["a.mp4"])
    os.mkfifo(tmp_path / "a.txt")
    [video] = _caption(staged)
    assert video["error_class"] == UNUSABLE and "not a regular file" in video["error_message"]


# --- an error in one video's row quarantines that video only ---------------------------------------------------


def _spoil_keyframes(staged: pa.Table, index: int) -> pa.Table:
    rows = staged.to_pylist()
    for clip in rows[index]["clips"]:
        clip["keyframes"] = [b"not a jpeg"] * 3
    return pa.Table.from_pylist(rows, schema=schema.STAGED)


def test_a_bad_row_in_the_caption_stage_quarantines_its_video_only(tmp_path, videos, one_torch_thread):
    staged = _spoil_keyframes(_staged(tmp_path, videos, ["a.mp4", "b.mp4"]), 0)
    stage = CaptionStage(CaptionConfig(sidecar=False, videos_per_batch=2))
    stage.setup()  # the tiny CoCa: real forward passes
    bad, good = stage(staged).to_pylist()
    assert bad["status"] == "quarantined" and bad["error_class"] == "caption_error" and bad["clips"] == []
    assert "JpegError: keyframe 0 of " in bad["error_message"]  # the batched decode (models/image_batch.py)
    assert good["status"] == "ok" and all(c["caption_source"] == stage.captioner.name for c in good["clips"])


def test_a_bad_row_in_the_clip_score_stage_quarantines_its_video_only(tmp_path, videos, one_torch_thread):
    staged = _spoil_keyframes(_staged(tmp_path, videos, ["a.mp4", "b.mp4"]), 1)
    stage = ClipScoreStage(ClipScoreConfig(videos_per_batch=2))
    stage.setup()
    good, bad = stage(staged).to_pylist()
    assert bad["status"] == "quarantined" and bad["error_class"] == "clip_score_error" and bad["clips"] == []
    scored = [c for c in good["clips"] if c["kept"] is not False]  # skip_dropped: the early-dropped stay unscored
    assert good["status"] == "ok" and scored and all(c["aesthetic"] is not None for c in scored)
