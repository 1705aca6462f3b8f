"""The one module that turns curation stages into a Ray Data plan, with declared resources per stage."""

from __future__ import annotations

import math

import pyarrow as pa
import ray

from curation.captions import CaptionStage
from curation.clip_scores import ClipScoreStage
from curation.config import CurateConfig
from curation.discover import DiscoverStage
from curation.model_stage import StageActor
from curation.ocr import OcrStage
from curation.video_stage import VideoStage

# Local listings needing at most this many bytes read to hash are hashed in the driver: a Ray Data job costs ~3-4 s
# of start-up, more than reading them (bench/README.md, "curate_end_to_end.py").
DRIVER_HASH_BYTES = 256 << 20


def _bytes_to_hash(files: list[dict], config: CurateConfig) -> int:
    return sum(min(int(f["size_bytes"]), 3 * config.discover.id_sample_bytes) for f in files)


def discover_ids(files: list[dict], config: CurateConfig) -> list[dict]:
    """Content ids for the listed files: hashed in parallel on the cluster, or in this process for a local listing
    that needs little reading (the same ids either way)."""
    if not files:
        return []
    local = all("://" not in f["uri"] or f["uri"].startswith("file://") for f in files)
    if local and _bytes_to_hash(files, config) <= DRIVER_HASH_BYTES:
        return DiscoverStage(config.discover)(pa.Table.from_pylist(files)).to_pylist()
    ds = ray.data.from_items(files).map_batches(
        StageActor, fn_constructor_args=(DiscoverStage, config.discover), batch_size=8, batch_format="pyarrow",
        concurrency=_workers(config), num_cpus=0.5)
    return ds.take_all()


def _workers(config: CurateConfig, reserved_cpus: float = 0.0) -> int:
    """Video actors: ray.video_workers, else one per CPU that `reserved_cpus` (whole-CPU model actors) leave."""
    if config.ray.video_workers:
        return config.ray.video_workers
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int((cpus - reserved_cpus) // max(config.ray.cpus_per_video, 0.01)))


def _model_stages(config: CurateConfig) -> list[tuple[type, object]]:
    """The model stages that run, in order (captions before scores: caption_match reads the final caption)."""
    stages: list[tuple[type, object]] = []
    if config.ocr.enabled:
        stages.append((OcrStage, config.ocr))
    if config.captions.sidecar or config.captions.enabled:
        stages.append((CaptionStage, config.captions))
    if config.clip_scores.enabled:
        stages.append((ClipScoreStage, config.clip_scores))
    return stages


def _declared_share(config: CurateConfig, video_cpus: float, light: float, whole: float) -> float:
    """The share of their CPUs that the video actors and the light model actors (under one CPU each) declare to Ray.

    A model actor of a whole CPU or more keeps its CPUs to itself, and the video stage gets one worker per CPU left.
    Light actors (the CPU defaults: 0.5 each) spend most of their time waiting for clips from the video stage, so
    they share the video workers' cores instead of taking whole ones: on 2 CPUs three of them would otherwise leave
    one video worker and half the machine idle (bench/README.md, "curate_end_to_end.py"). When everything does not
    fit, both declare the same fraction of their CPUs, so that every actor starts at once and finished videos keep
    streaming into commits."""
    room = ray.cluster_resources().get("CPU", 1) - whole
    demand = video_cpus + light
    if demand <= room or room <= 0:
        return 1.0
    return math.floor(room / demand * 1e4) / 1e4  # Ray counts CPUs in units of 1e-4


def largest_first(pending: list[dict]) -> list[dict]:
    """The videos in the order the video actors take them: the largest files first, so the longest decodes start
    while the others keep the remaining workers busy, instead of one long video left alone at the end (a run is as
    long as its last video; bench/README.md, "curate_end_to_end.py"). Ties keep their order."""
    return sorted(pending, key=lambda row: -int(row["size_bytes"]))


def curate_plan(pending: list[dict], config: CurateConfig) -> ray.data.Dataset:
    """pending videos -> one decode pass each (actors, 1 CPU) -> OCR -> captions -> CLIP scores (actor pools that
    load their models once each) -> one staged record per video (schema.STAGED), which the driver commits in
    batches."""
    stages = [(cls, settings, min(settings.concurrency, max(1, len(pending)))) for cls, settings in
              _model_stages(config)]
    whole = sum(settings.num_cpus * actors for _, settings, actors in stages if settings.num_cpus >= 1)
    light = sum(settings.num_cpus * actors for _, settings, actors in stages if settings.num_cpus < 1)
    workers = min(_workers(config, whole), max(1, len(pending)))
    share = _declared_share(config, workers * config.ray.cpus_per_video, light, whole)
    ds = ray.data.from_items(largest_first(pending), override_num_blocks=max(1, len(pending)))
    ds = ds.map_batches(StageActor, fn_constructor_args=(VideoStage, config), batch_size=1, batch_format="pyarrow",
                        concurrency=workers, num_cpus=config.ray.cpus_per_video * share)
    for stage_cls, settings, actors in stages:
        ds = ds.map_batches(StageActor, fn_constructor_args=(stage_cls, settings),
                            batch_size=settings.videos_per_batch, batch_format="pyarrow", concurrency=actors,
                            num_cpus=settings.num_cpus * (share if settings.num_cpus < 1 else 1.0),
                            num_gpus=settings.num_gpus)
    return ds
