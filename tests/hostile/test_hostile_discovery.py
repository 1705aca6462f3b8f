"""Hostile dumps for discovery: names that are not UTF-8, links in and out of the root, loops, deep trees
(issue 13, items 2 and 3)."""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pytest

from curation.config import DiscoverConfig
from curation.discover import DiscoverStage, discover, list_videos


def _uris(root) -> list[str]:
    return [v["uri"] for v in list_videos(str(root), DiscoverConfig())]


def _write_bytes_name(directory, name: bytes, data: bytes) -> None:
    fd = os.open(os.path.join(os.fsencode(directory), name), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_a_name_that_is_not_utf8_is_skipped_and_reported_not_a_crash(tmp_path, videos, caplog):
    (tmp_path / "good.mp4").write_bytes(videos[0])
    _write_bytes_name(tmp_path, b"bad\xff.mp4", videos[1])
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"dir\xfe"))
    _write_bytes_name(os.path.join(os.fsencode(tmp_path), b"dir\xfe"), b"inside.mp4", videos[2])
    _write_bytes_name(tmp_path, b"notes\xff.txt", b"not a video")
    with caplog.at_level(logging.WARNING):
        listed = list_videos(str(tmp_path), DiscoverConfig())
    assert [v["uri"] for v in listed] == [str(tmp_path / "good.mp4")]
    assert "not valid UTF-8" in caplog.text and "bad\\xff.mp4" in caplog.text and "dir\\xfe/inside.mp4" in caplog.text
    # What is listed goes on through the pipeline: every uri is an Arrow string and hashes to a content id.
    ids = DiscoverStage(DiscoverConfig())(pa.Table.from_pylist(listed))
    assert ids.num_rows == 1


def test_a_video_linked_inside_the_root_is_listed_once_by_its_own_path(tmp_path, videos):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.mp4").write_bytes(videos[0])
    os.symlink(tmp_path / "real" / "a.mp4", tmp_path / "link.mp4")
    os.symlink(tmp_path / "real", tmp_path / "linked_dir")
    assert _uris(tmp_path) == [str(tmp_path / "real" / "a.mp4")]


def test_a_video_linked_out_of_the_root_is_not_read(tmp_path_factory, videos, caplog):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "private.mp4").write_bytes(videos[1])
    root = tmp_path_factory.mktemp("root")
    (root / "a.mp4").write_bytes(videos[0])
    os.symlink(outside / "private.mp4", root / "b.mp4")
    os.symlink(outside, root / "elsewhere")
    with caplog.at_level(logging.WARNING):
        assert _uris(root) == [str(root / "a.mp4")]
    assert "symbolic link out of the input" in caplog.text and "b.mp4" in caplog.text


# The code before issue 13 listed each file ~40 times per loop and never ended with two, inside pyarrow's C++ listing:
# only the thread method of pytest-timeout stops that.
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("loops", [1, 2])
def test_directory_loops_end_and_list_each_file_once(tmp_path, videos, loops):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.mp4").write_bytes(videos[0])
    (tmp_path / "a" / "b" / "two.mp4").write_bytes(videos[1])
    os.symlink("..", tmp_path / "a" / "b" / "up")
    if loops == 2:
        os.symlink(tmp_path, tmp_path / "a" / "root")
        os.symlink("../..", tmp_path / "a" / "b" / "upup")
    os.symlink("self", tmp_path / "self")  # a link to itself: ELOOP
    assert _uris(tmp_path) == [str(tmp_path / "a" / "b" / "two.mp4"), str(tmp_path / "a" / "one.mp4")]


def test_depth_is_bounded_and_deeper_directories_are_reported(tmp_path, videos):
    shallow = tmp_path / "1" / "2"
    deep = shallow / "3" / "4"
    deep.mkdir(parents=True)
    (shallow / "ok.mp4").write_bytes(videos[0])
    (deep / "too_deep.mp4").write_bytes(videos[1])
    listing = discover(str(tmp_path), DiscoverConfig(max_depth=2))
    assert [v["uri"] for v in listing.videos] == [str(shallow / "ok.mp4")]
    assert listing.skipped == [(str(shallow / "3"), "directory deeper than discover.max_depth=2")]


def test_a_very_deep_tree_does_not_exhaust_the_recursion_limit(tmp_path, videos):
    top = os.path.join(os.fsencode(tmp_path), b"d")
    path = top
    try:
        for _ in range(1500):  # deeper than Python's recursion limit; each level a one-letter name
            os.mkdir(path)
            path = os.path.join(path, b"d")
        (tmp_path / "a.mp4").write_bytes(videos[0])
        listing = discover(str(tmp_path), DiscoverConfig(max_depth=2000))
        assert [v["uri"] for v in listing.videos] == [str(tmp_path / "a.mp4")] and listing.skipped == []
    finally:  # bottom up: shutil.rmtree, pytest's cleanup of old tmp dirs included, recurses and would fail
        while len(path) > len(top):
            path = os.path.dirname(path)
            os.rmdir(path)


def test_a_fifo_with_a_video_name_is_reported_not_opened(tmp_path, videos):
    (tmp_path / "a.mp4").write_bytes(videos[0])
    os.mkfifo(tmp_path / "b.mp4")
    listing = discover(str(tmp_path), DiscoverConfig())
    assert [v["uri"] for v in listing.videos] == [str(tmp_path / "a.mp4")]
    assert listing.skipped == [(str(tmp_path / "b.mp4"), "not a regular file")]


def test_the_workflow_fingerprint_of_a_dump_with_a_name_that_is_not_utf8(tmp_path, videos):
    from pipelines.workflow import input_fingerprint

    (tmp_path / "good.mp4").write_bytes(videos[0])
    before = input_fingerprint(str(tmp_path))
    _write_bytes_name(tmp_path, b"bad\xff.mp4", videos[1])
    assert input_fingerprint(str(tmp_path)) != before


def test_a_file_gone_after_listing_is_quarantined_not_a_failed_run(tmp_path, videos):
    from curation.config import CurateConfig
    from curation.video_stage import VideoStage

    (tmp_path / "a.mp4").write_bytes(videos[0])
    (tmp_path / "gone.mp4").write_bytes(videos[1])
    config = CurateConfig()
    config.decode.isolate = False
    listed = list_videos(str(tmp_path), config.discover)
    (tmp_path / "gone.mp4").unlink()  # a dump still being uploaded or cleaned up
    rows = VideoStage(config)(DiscoverStage(config.discover)(pa.Table.from_pylist(listed))).to_pylist()
    assert [(os.path.basename(r["uri"]), r["status"], r["error_class"]) for r in rows] == [
        ("a.mp4", "ok", None), ("gone.mp4", "quarantined", "not_found")]
