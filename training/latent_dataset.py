"""Training reads from a latent cache (`reelforge encode`'s output): the rows of one encoded curated version, per
curriculum stage, in the same seeded, replayable order as curated reads (StageSampler), as latent distributions and
caption encodings. Nothing here opens video bytes or runs a text tower: the step samples x0 from (mean, logvar)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lance
import numpy as np
import torch

from curation.dataset import DatasetError, split_version
from curation.redact import redact_uri
from training.buckets import BucketSampler, StageBuckets, bucket_identity, stage_buckets
from training.config import ConfigError, CurriculumStage
from training.dataset import StageSampler, content_id, pin_version
from training.latent_cache import LatentCache
from training.read_ahead import ReadAhead

CACHE_TABLE = "latents.lance"  # OUTPUT/latents.lance: what `reelforge encode --output OUTPUT` writes
NULL_CLIP = ""  # the row keyed (clip "", stage "") holds the empty prompt's encoding
_INDEX_COLUMNS = ["clip_id", "window", "stage", "dataset_version", "latent_shape"]
_ITEM_COLUMNS = ["dtype", "latent_shape", "latent", "logvar", "text_shape", "text", "text_mask"]


def cache_uri(data: str) -> str:
    """The cache's Lance dataset under a `--data` or `--output` directory (without any `@vN`)."""
    return f"{split_version(data)[0].rstrip('/')}/{CACHE_TABLE}"


def is_latent_cache(data: str) -> bool:
    """Whether `data` (DIR or DIR@vN) is a latent cache rather than a curated dataset."""
    return LatentCache(cache_uri(data)).dataset() is not None


@dataclass
class LatentBatch:
    """A micro-batch from the cache: x0's distribution and the captions' encodings, numpy, batch first."""

    mean: np.ndarray  # (B, C, T', H', W')
    logvar: np.ndarray | None  # same shape; None: a deterministic codec (pixels)
    text: np.ndarray  # (B, L, width)
    mask: np.ndarray  # (B, L) bool

    def __len__(self) -> int:
        return len(self.mean)


class LatentTable:
    """The rows of a latent cache at tag `v000N` (curated version N encoded), numbered in the table's order at that
    tag; the items of a stage are its rows sorted by (clip_id, window), so the order does not depend on how the
    encode's commits happened to fall (a run killed and resumed gives the same items as one that was not)."""

    def __init__(self, table: lance.LanceDataset, data_uri: str, number: int, record: dict):
        self.table, self.data_uri, self.number, self.record = table, data_uri, number, record
        self.shown = redact_uri(data_uri)
        index = table.to_table(columns=_INDEX_COLUMNS, scan_in_order=True)
        self._stage_rows: dict[str, list[tuple[str, int, int, tuple]]] = {}
        self._null_row: int | None = None
        for offset, (clip_id, window, stage, version, shape) in enumerate(
                zip(*(index[c].to_pylist() for c in _INDEX_COLUMNS), strict=True)):
            if clip_id == NULL_CLIP and stage == NULL_CLIP:
                self._null_row = offset
            elif version is not None and version <= number:  # clips curated up to version N
                self._stage_rows.setdefault(stage, []).append((clip_id, window, offset, tuple(shape or ())))
        for rows in self._stage_rows.values():
            rows.sort()
        self._rows = sum(len(r) for r in self._stage_rows.values())
        self._version = f"latents-v{number}-lance{table.version}-{content_id(table)}"

    @classmethod
    def open(cls, data: str) -> LatentTable:
        base, number = split_version(data)
        cache = LatentCache(cache_uri(data))
        shown = redact_uri(base)
        versions = cache.versions()
        if not versions:
            raise DatasetError(f"{shown}: the latent cache has no finished encode yet: run `reelforge encode` into "
                               "it (an interrupted run finishes when rerun)")
        number = max(versions) if number is None else number
        if number not in versions:
            known = ", ".join(f"v{v}" for v in versions)
            raise DatasetError(f"{shown}: the latent cache holds no encode of curated version {number} (encoded: "
                               f"{known}); run `reelforge encode --data CURATED@v{number} --output {shown}`")
        return cls(cache.dataset(number), pin_version(base, number), number, versions[number])

    def __len__(self) -> int:
        return self._rows

    @property
    def version(self) -> str:
        """Which rows, exactly: `latents-v<curated version>-lance<Lance version>-<content_id>`."""
        return self._version

    @property
    def lance_version(self) -> int:
        return self.table.version

    @property
    def codec(self) -> str:
        return self.record["codec"]

    @property
    def text_encoder(self) -> str:
        return self.record["text_encoder"]

    def check_stage(self, stage: CurriculumStage, windows_per_clip: int, buckets: StageBuckets | None = None) -> None:
        """A curriculum stage must be one the cache encoded, with the same shape (and the same buckets: see
        training/buckets.py): else one line naming the fix."""
        encoded = self.record["stages"].get(stage.name)
        wanted = {"num_frames": stage.num_frames, "fps": stage.fps, "size": stage.size, "windows": windows_per_clip,
                  **bucket_identity(buckets)}
        if encoded is None:
            raise DatasetError(f"{self.shown}: curriculum stage {stage.name!r} is not in the latent cache (stages: "
                               f"{', '.join(sorted(self.record['stages']))}); encode it with the train config's "
                               "curriculum")
        keys = {*wanted, *({"buckets", "max_aspect_error"} & set(encoded))}  # a bucketed cache wants buckets
        if {k: encoded.get(k) for k in keys} != wanted:
            raise DatasetError(f"{self.shown}: curriculum stage {stage.name!r} was encoded as {encoded}, the config "
                               f"asks {wanted}; encode the new shape under another stage name")

    def items(self, stage: str) -> list[tuple[int, int]]:
        """(row offset, window) of every row of `stage`, in (clip_id, window) order."""
        return [(offset, window) for _, window, offset, _ in self._stage_rows.get(stage, [])]

    def latent_shapes(self, stage: str) -> list[tuple]:
        """The latent shape of every row of `stage`, in the order of items(stage): a bucketed stage's buckets."""
        return [shape for *_, shape in self._stage_rows.get(stage, [])]

    def take(self, offsets: list[int]) -> list[dict]:
        return self.table.take([int(i) for i in offsets], columns=_ITEM_COLUMNS).to_pylist()

    def null_text(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt's (embedding (L, width), mask (L,)), for dropped captions."""
        if self._null_row is None:
            raise DatasetError(f"{self.shown}: the latent cache has no empty-prompt row; rerun `reelforge encode`")
        (row,) = self.take([self._null_row])
        return _array(row, "text", "text_shape"), np.frombuffer(row["text_mask"], bool)


def _array(row: dict, column: str, shape: str) -> np.ndarray:
    return np.frombuffer(row[column], dtype=row["dtype"]).reshape(row[shape])


class LatentLoader(ReadAhead):
    """Micro-batches of one stage for one rank from a LatentTable, the next `prefetch_batches` read ahead in a
    thread: micro-batch k depends only on (seed, stage, epoch, rank, k), as for StageLoader."""

    def __init__(self, table: LatentTable, stage: CurriculumStage, windows_per_clip: int, seed: int, rank: int,
                 world_size: int, batch_size: int, prefetch_batches: int = 2, buckets: StageBuckets | None = None):
        table.check_stage(stage, windows_per_clip, buckets)
        super().__init__(prefetch_batches, threads=1, name=f"latents-{stage.name}")
        self.table, self.stage = table, stage
        items, source = table.items(stage.name), f"{len(table.items(stage.name))} encoded windows in {table.shown}"
        if buckets is None:
            self.sampler = StageSampler.over_items(items, stage, seed, rank, world_size, batch_size, source)
        else:  # a bucket is a latent shape: every micro-batch stacks rows of one shape
            shapes = table.latent_shapes(stage.name)
            keys = {shape: i for i, shape in enumerate(sorted(set(shapes)))}
            self.sampler = BucketSampler.over_items(items, [keys[s] for s in shapes], buckets, seed, rank,
                                                    world_size, batch_size, source)
        self.batches_per_epoch = self.sampler.batches_per_epoch

    def _read(self, k: int) -> LatentBatch:
        rows = self.table.take([offset for offset, _ in self.sampler.batch_items(k)])
        logvar = None
        if all(r["logvar"] is not None for r in rows):
            logvar = np.stack([_array(r, "logvar", "latent_shape") for r in rows])
        return LatentBatch(np.stack([_array(r, "latent", "latent_shape") for r in rows]), logvar,
                           np.stack([_array(r, "text", "text_shape") for r in rows]),
                           np.stack([np.frombuffer(r["text_mask"], bool) for r in rows]))


class CachedInputs:
    """The diffusion step's inputs from a latent cache: x0 drawn from the cached distribution, mean + exp(logvar /
    2) * eps with eps from the step's generator, and the cached caption encodings, the empty prompt's where a
    caption is dropped. No text tower and no codec run here."""

    def __init__(self, null_text: tuple[np.ndarray, np.ndarray], cfg_dropout: float, device: torch.device):
        self.null_context = torch.from_numpy(null_text[0].astype(np.float32))
        self.null_mask = torch.from_numpy(null_text[1].copy())
        self.cfg_dropout, self.device = cfg_dropout, device

    def __call__(self, batch: LatentBatch, captions: None, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        drop = torch.rand(len(batch), generator=g) < self.cfg_dropout  # (B,)
        context = torch.from_numpy(batch.text.astype(np.float32))  # (B, L, width)
        mask = torch.from_numpy(batch.mask.copy())  # (B, L)
        context[drop], mask[drop] = self.null_context, self.null_mask
        mean = torch.from_numpy(batch.mean.astype(np.float32))  # (B, C, T', H', W')
        if batch.logvar is not None:  # the reparameterisation; -inf log-variance gives the mean itself
            eps = torch.randn(mean.shape, generator=g)
            mean = mean + torch.exp(0.5 * torch.from_numpy(batch.logvar.astype(np.float32))) * eps
        return mean.to(self.device), context.to(self.device), mask.to(self.device)


def open_training_data(data: str):
    """`--data` as the table training reads: a latent cache (LatentTable) or a curated dataset (ClipTable)."""
    from training.dataset import ClipTable

    return LatentTable.open(data) if is_latent_cache(data) else ClipTable.open(data)


def check_cache_matches(table, config, task: type | None = None) -> None:
    """Training from a latent cache needs the codec and text encoder that made it: the model denoises that codec's
    latents and is prompted through that text tower (samples, export). One line naming both when not. Another task
    than diffusion (`task`, e.g. the video autoencoder) trains on pixels and cannot read a cache."""
    if not isinstance(table, LatentTable):
        return
    if task is not None:
        raise DatasetError(f"{table.shown} is a latent cache; {task.__name__} trains on curated video: give --data "
                           "the curated dataset")
    from models.codec import build_codec
    from models.text_encoder import text_encoder_id

    codec = build_codec(dataclasses.replace(config.codec, device="cpu")).id  # the driver may have no GPU
    text = text_encoder_id(config.text)
    if codec != table.codec:
        raise DatasetError(f"{table.shown} holds latents of codec {table.codec!r}, the train config's codec is "
                           f"{codec!r}: give train the encode's codec section")
    if text != table.text_encoder:
        raise DatasetError(f"{table.shown} holds captions encoded by {table.text_encoder!r}, the train config's "
                           f"text encoder is {text!r}: give train the encode's text section")


def check_buckets_supported(table, config, task: type | None = None) -> None:
    """Buckets are the diffusion model's: another task (the video autoencoder) trains on squares. A latent cache
    must hold each stage at the buckets the config gives (`reelforge encode` with the same buckets section and the
    model's patch_size), checked stage by stage. One line when not."""
    if config.buckets.aspect_ratios and task is not None:
        raise ConfigError(f"buckets.aspect_ratios: {task.__name__} trains on square crops; remove the buckets section")
    if config.buckets.aspect_ratios and isinstance(table, LatentTable):  # (a square cache is checked by workers)
        from models.codec import build_codec

        codec = build_codec(dataclasses.replace(config.codec, device="cpu"))  # the driver may have no GPU
        multiple = config.model_config().patch_size * codec.space_compression
        for stage in config.curriculum:
            if getattr(stage, "source", "video") == "video":
                table.check_stage(stage, config.data_loading.windows_per_clip,
                                  stage_buckets(config.buckets, stage, multiple))
