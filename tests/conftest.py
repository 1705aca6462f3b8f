"""Shared fixtures: the real videos of ../shared (skipped when absent), a generated sample dump, one Ray cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = Path(os.environ.get("REELFORGE_SHARED", ROOT.parent / "shared")) / "videos"


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not (SHARED_VIDEOS / "GROUND_TRUTH.json").is_file():
        pytest.skip(f"{SHARED_VIDEOS} is not present (a user's clone has no ../shared)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def ground_truth(shared_videos: Path) -> dict:
    return json.loads((shared_videos / "GROUND_TRUTH.json").read_text())["videos"]


@pytest.fixture(scope="session")
def sample_dump(tmp_path_factory) -> tuple[Path, dict]:
    from curation.sample_dump import make_sample_dump

    root = tmp_path_factory.mktemp("sample-dump")
    truth = make_sample_dump(root, num_videos=12, seed=0)
    return root, truth


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-tensor tests: a second thread only adds contention on shared CI cores (5x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def curated_sample(sample_dump, ray_cluster, tmp_path_factory):
    """The sample dump curated once per session (4-row shards, so two workers get several shards each)."""
    from curation.config import CurateConfig
    from pipelines.config import load_config
    from pipelines.curate import run_curate

    root, _ = sample_dump
    out = tmp_path_factory.mktemp("curated")
    config = load_config(CurateConfig, None, ["output_files.commit_videos=4"], base={"input": str(root),
                                                                                  "output": str(out)})
    run_curate(config)
    return out
