"""`reelforge curate` on a hostile dump, on a real local Ray cluster: it finishes, keeps every good video, records
why it ignored what it ignored, writes no secret, and a rerun is a no-op (issue 13, items 1-3 end to end)."""

from __future__ import annotations

import os

import pytest
from output_scan import output_contents

from curation.captions import UNUSABLE
from curation.config import CurateConfig
from curation.dataset import CuratedDataset
from pipelines.config import load_config
from pipelines.curate import run_curate

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_curate_a_hostile_dump(videos, secret_file, tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("hostile-dump")
    outside = tmp_path_factory.mktemp("outside-videos")
    (root / "sub").mkdir()
    for name, data in zip(["a.mp4", "b.mp4", "sub/c.mp4"], videos, strict=True):
        (root / name).write_bytes(data)
    (root / "a.json").write_text('{"caption": ' * 100_000 + '"deep"' + "}" * 100_000)
    os.symlink(secret_file, root / "b.txt")
    (root / "sub" / "c.json").write_text('{"caption": "c", "segments": 5}')
    fd = os.open(os.path.join(os.fsencode(root), b"bad\xff.mp4"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, videos[0])
    os.close(fd)
    os.symlink(root / "a.mp4", root / "sub" / "link.mp4")
    (outside / "private.mp4").write_bytes(videos[0])
    os.symlink(outside / "private.mp4", root / "out.mp4")
    os.symlink("..", root / "sub" / "up")
    os.symlink(root, root / "sub" / "root")

    out = tmp_path_factory.mktemp("hostile-curated")
    config = load_config(CurateConfig, None, [], base={"input": str(root), "output": str(out)})
    record = run_curate(config)

    dataset = CuratedDataset(str(out))
    videos_table = {os.path.relpath(r["uri"], root): r for r in dataset.read("videos").to_pylist()}
    assert sorted(videos_table) == ["a.mp4", "b.mp4", "sub/c.mp4"]
    assert all(v["status"] == "ok" and v["error_class"] == UNUSABLE for v in videos_table.values())
    clips = dataset.read("clips").to_pylist()
    assert len({c["video_id"] for c in clips}) == 3
    assert all(c["caption_source"] != "sidecar" for c in clips)  # captioned as if there were no sidecar
    # Neither a file's bytes nor a value in the tables (every version, config and tag) holds the secret.
    assert [where for where, data in output_contents(out) if b"hunter2" in data] == []
    assert record["counts"]["videos_ok"] == 3
    assert run_curate(config)["run"]["nothing_new"]
