"""The one module that turns curation stages into a Ray Data plan, with declared resources per stage."""

from __future__ import annotations

import ray

from curation.config import CurateConfig
from curation.discover import DiscoverStage
from curation.outputs import StagingWriter
from curation.video_stage import VideoStage


class _Actor:
    """Adapts a stage (settings in __init__, heavy state in setup()) to a Ray Data actor: setup once per worker."""

    def __init__(self, stage_cls, *args):
        self.stage = stage_cls(*args)
        self.stage.setup()

    def __call__(self, batch):
        return self.stage(batch)


def discover_ids(files: list[dict], config: CurateConfig) -> list[dict]:
    """Content ids for the listed files, hashed in parallel on the cluster."""
    if not files:
        return []
    ds = ray.data.from_items(files).map_batches(
        _Actor, fn_constructor_args=(DiscoverStage, config.discover), batch_size=8, batch_format="pyarrow",
        concurrency=_workers(config), num_cpus=0.5)
    return ds.take_all()


def _workers(config: CurateConfig) -> int:
    if config.ray.video_workers:
        return config.ray.video_workers
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, int(cpus // max(config.ray.cpus_per_video, 0.01)))


def curate_plan(pending: list[dict], config: CurateConfig) -> ray.data.Dataset:
    """pending videos -> one decode pass each (actors, 1 CPU) -> staged completion records -> summaries."""
    workers = min(_workers(config), max(1, len(pending)))
    ds = ray.data.from_items(pending, override_num_blocks=max(1, len(pending)))
    ds = ds.map_batches(_Actor, fn_constructor_args=(VideoStage, config), batch_size=1, batch_format="pyarrow",
                        concurrency=workers, num_cpus=config.ray.cpus_per_video)
    return ds.map_batches(_Actor, fn_constructor_args=(StagingWriter, config.output), batch_size=1,
                          batch_format="pyarrow", concurrency=1, num_cpus=0.1)
