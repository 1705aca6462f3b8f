"""What each curriculum stage reads, for the seeds' three-stage recipe (Stable Video Diffusion): single frames for
image pretraining (`source: keyframes`, the curated clips' stored first/middle/last keyframes, or `source: images`,
an image folder), video windows of the curated set (`source: video`, the default), and for fine-tuning only the
clips an expression over the clips table selects (`where`, training/clip_subset.py).

The driver resolves every stage once with `plan_stages`, before any worker starts (a bad expression or an empty
subset is a one-line error naming the stage); workers read each stage (training/loop.py's CurriculumBatches) in the
replayable order of training.dataset.StageSampler, seeded by the stage, so a run resumed in any stage reads what an
uninterrupted one would."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from curation.dataset import open_data
from training.clip_subset import ClipSubset, resolve_subset
from training.config import ConfigError, CurriculumStage, TrainConfig
from training.dataset import ClipTable, StageSampler
from training.image_folder import FolderImage, read_image_folder, square_frame
from training.read_ahead import ReadAhead

log = logging.getLogger("reelforge.train.stages")


KEYFRAMES_PER_CLIP = 3  # curation/schema.py: the first, middle and last frame of each clip, as JPEG


@dataclass
class StageData:
    """One stage's data as the driver resolved it, handed to every worker."""

    source: str = "video"
    rows: list[int] | None = None  # the shards rows of the `where` subset, in table order; None: every kept clip
    images: list[FolderImage] | None = None  # source images: the folder's images and captions
    summary: dict = field(default_factory=dict)  # what the run's MLflow params record of the stage


def plan_stages(config: TrainConfig, table) -> list[StageData]:
    """Each curriculum stage's data over `table` (the run's ClipTable or LatentTable), checked to fill a micro-batch
    on every worker. One-line ConfigErrors name the stage."""
    return [_plan(config, table, index, stage) for index, stage in enumerate(config.curriculum)]


def _plan(config: TrainConfig, table, index: int, stage: CurriculumStage) -> StageData:
    what = f"curriculum[{index}] ({stage.name})"
    if stage.source == "video" and not stage.where:
        return StageData()
    if not isinstance(table, ClipTable):
        raise ConfigError(f"{what}: source {stage.source!r}{' with where' if stage.where else ''} reads a curated "
                          f"dataset; {table.shown} is a latent cache (video windows of every clip): give --data the "
                          "curated dataset")
    data = StageData(stage.source, summary={"source": stage.source})
    if stage.where:
        dataset, number = open_data(table.data_uri)
        subset = resolve_subset(dataset.open("clips", number), stage.where, what)
        data.rows = rows_of(table, subset.clip_ids)
        data.summary |= {"where": subset.expression, "where_resolved": subset.resolved, "clips": len(data.rows),
                         "kept_clips": subset.population}
        log.info("%s: where %s selects %d of %d kept clips (%s)", what, subset.expression, len(data.rows),
                 subset.population, subset.resolved)
    if stage.source == "images":
        folder = read_image_folder(stage.images, what)
        data.images = folder.images
        data.summary |= {"images": len(folder.images), "images_uncaptioned": folder.uncaptioned,
                         "images_id": folder.content_id}
        log.info("%s: %d images in %s (%d without a caption: the empty prompt)", what, len(folder.images),
                 folder.root, folder.uncaptioned)
    try:
        sampler = stage_sampler(table, stage, data, config, rank=0)
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from None
    data.summary["items"] = len(sampler.items)
    return data


def changed_images(previous: list[dict], stages: list[StageData]) -> list[str]:
    """The image stages whose folder changed since a run recorded `previous` (its stages' summaries): resuming one
    would read another order of other images."""
    changed = []
    for index, (before, data) in enumerate(zip(previous, stages, strict=False)):
        was, now = before.get("images_id"), data.summary.get("images_id")
        if was and now and was != now:
            changed.append(f"curriculum[{index}]'s image folder changed since the checkpoint ({was} -> {now})")
    return changed


def rows_of(table: ClipTable, clip_ids: list[str]) -> list[int]:
    """The shards rows (table order) of `clip_ids`."""
    wanted = set(clip_ids)
    return [row for row, clip_id in enumerate(table.metadata()["clip_id"]) if clip_id in wanted]


def stage_items(table: ClipTable, data: StageData) -> list[tuple[int, int]]:
    """(key, index) items of a one-frame stage: (shards row, keyframe) for keyframes, (image, 0) for images."""
    if data.source == "images":
        return [(i, 0) for i in range(len(data.images))]
    rows = range(len(table)) if data.rows is None else data.rows
    return [(row, k) for row in rows for k in range(KEYFRAMES_PER_CLIP)]


def stage_sampler(table, stage: CurriculumStage, data: StageData, config: TrainConfig, rank: int) -> StageSampler:
    """The stage's replayable order for `rank` (a ValueError when it cannot fill a micro-batch on every worker)."""
    split = (config.scaling.num_workers, config.deepspeed.micro_batch_size)  # workers, micro-batch
    if data.source == "video":
        return StageSampler(subset_view(table, data).metadata(), stage, config.data_loading.windows_per_clip,
                            config.seed, rank, *split)
    items = stage_items(table, data)
    source = (f"{len(items)} images" if data.source == "images" else
              f"{len(items)} keyframes of {len(items) // KEYFRAMES_PER_CLIP} curated clips")
    return StageSampler.over_items(items, stage, config.seed, rank, *split, source)


def subset_view(table: ClipTable, data: StageData):
    """The rows a video stage reads: the table itself, or its `where` subset renumbered (ClipSubset)."""
    return table if data.rows is None else ClipSubset(table, data.rows)


def open_frame_loader(table: ClipTable, stage: CurriculumStage, data: StageData, config: TrainConfig, seed: int,
                      rank: int, world_size: int) -> FrameLoader:
    """The loader of a one-frame stage (keyframes or images) on one rank."""
    items = stage_items(table, data)
    sampler = StageSampler.over_items(items, stage, seed, rank, world_size, config.deepspeed.micro_batch_size,
                                      f"{len(items)} {data.source}")
    reader = FolderReader(data.images, stage.size) if data.source == "images" else KeyframeReader(table, stage.size)
    return FrameLoader(reader, sampler, stage, config.data_loading.prefetch_batches,
                       config.data_loading.decode_concurrency)


class KeyframeReader:
    """Item (shards row, k) -> keyframe k of that clip as one frame at the stage's size, and the clip's caption."""

    def __init__(self, table: ClipTable, size: int):
        self.table, self.size = table, size
        self.captions = table.metadata()["caption"]  # read once, before the decode threads share it

    def __call__(self, item: tuple[int, int]) -> tuple[np.ndarray | None, str]:
        row, k = item
        (data,) = self.table.shards.take([int(row)], columns=["clip_id", "keyframes"]).to_pylist()
        keyframes = data["keyframes"] or []
        if k >= len(keyframes) or not keyframes[k]:
            return None, ""
        try:
            return square_frame(keyframes[k], self.size), self.captions[row] or ""
        except ValueError as err:
            log.warning("keyframe %d of clip %s cannot be decoded, a later item stands in: %s", k, data["clip_id"],
                        err)
            return None, ""


class FolderReader:
    """Item (i, 0) -> image i of the folder as one frame at the stage's size, and its caption."""

    def __init__(self, images: list[FolderImage], size: int):
        self.images, self.size = images, size

    def __call__(self, item: tuple[int, int]) -> tuple[np.ndarray | None, str]:
        image = self.images[item[0]]
        try:
            return square_frame(image.path, self.size), image.caption
        except (ValueError, OSError) as err:
            log.warning("image %s cannot be read, a later image stands in: %s", image.path, err)
            return None, ""


class FrameLoader(ReadAhead):
    """Micro-batches of one-frame samples, (B, 1, size, size, 3) uint8 and captions, for one rank: micro-batch k
    depends only on the sampler's items at k (and on its substitutes where an item cannot be read), as for
    StageLoader; the next `prefetch_batches` are read ahead in threads."""

    def __init__(self, reader, sampler: StageSampler, stage: CurriculumStage, prefetch_batches: int = 2,
                 threads: int | None = None):
        super().__init__(prefetch_batches, threads=threads or 2, name=f"frames-{stage.name}")
        self.reader, self.sampler, self.stage = reader, sampler, stage
        self.batches_per_epoch = sampler.batches_per_epoch

    def _read(self, k: int) -> tuple[np.ndarray, list[str]]:
        frames, captions = [], []
        for j, item in enumerate(self.sampler.batch_items(k)):
            frame, caption = self.reader(item)
            if frame is None:
                for substitute in self.sampler.substitutes(k, j):
                    frame, caption = self.reader(substitute)
                    if frame is not None:
                        break
                else:
                    raise ValueError(f"no item of stage {self.stage.name!r} can be read")
            frames.append(frame)
            captions.append(caption)
        return np.stack(frames), captions
