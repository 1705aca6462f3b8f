"""The encode workflow: a curated dataset version -> its clips' latent distributions and caption embeddings in a
latent cache (training/latent_cache.py), so training reads latents and never decodes video or runs the text tower.

Incremental like curation: only (clip, stage) pairs the cache lacks are encoded; finished clips are committed in
batches of `commit_clips` (one Lance commit each), so kill -9 loses at most the batch in flight and a rerun finishes
with the same rows. A cache holds one codec and one text encoder: a run with another is refused before any work.
Finishing tags the cache `v000N` for curated version N."""

from __future__ import annotations

import dataclasses
import logging
import time

import ray

from curation.dataset import open_data
from curation.model_stage import StageActor
from curation.redact import redact_uri
from models.codec import build_codec
from models.text_encoder import FrozenTextEncoder, text_encoder_id
from pipelines.cluster import init_ray
from pipelines.config import ConfigError
from training.buckets import StageBuckets, bucket_identity, stage_buckets
from training.config import validate_buckets
from training.dataset import pin_version
from training.latent_cache import LatentCache
from training.latent_dataset import CACHE_TABLE, NULL_CLIP, cache_uri
from training.latent_encode import (
    DTYPES,
    ClipWindowsStage,
    CodecStage,
    EncodeConfig,
    TextStage,
    clip_bucket,
    encode_text,
    expected_windows,
)

log = logging.getLogger("reelforge.encode")


def identity(config: EncodeConfig) -> dict:
    """What a cache holds, and what another run may not change: the codec, the text encoder, the stages' shapes."""
    codec = build_codec(dataclasses.replace(config.codec, device="cpu"))  # the driver may have no GPU; ids ignore it
    for stage in config.curriculum:
        if stage.source != "video" or stage.where:  # training reads these from the curated dataset (stage_data.py)
            raise ConfigError(f"curriculum stage {stage.name!r}: a latent cache holds video windows of every kept "
                              f"clip, not source {stage.source}{' with where' if stage.where else ''}: leave the "
                              "stage out of the encode's curriculum")
        if not codec.frame_count_ok(stage.num_frames):
            raise ConfigError(f"curriculum stage {stage.name!r}: codec {codec.id} cannot encode {stage.num_frames} "
                              "frames (a causal VAE takes 1 + 4k)")
    buckets = encode_buckets(config, codec)
    stages = {s.name: {"num_frames": s.num_frames, "fps": s.fps, "size": s.size, "windows": config.windows_per_clip,
                       **bucket_identity(buckets[s.name])} for s in config.curriculum}
    return {"codec": codec.id, "codec_config": codec.describe(),
            "text_encoder": text_encoder_id(config.text), "text_config": dataclasses.asdict(config.text),
            "stages": stages}


def encode_buckets(config: EncodeConfig, codec=None) -> dict[str, StageBuckets | None]:
    """Each stage's buckets (training/buckets.py), sides multiples of patch_size x the codec's compression; None
    for every stage without buckets."""
    if not config.buckets.aspect_ratios:
        return {s.name: None for s in config.curriculum}
    codec = codec or build_codec(dataclasses.replace(config.codec, device="cpu"))
    multiple = config.patch_size * codec.space_compression
    return {s.name: stage_buckets(config.buckets, s, multiple) for s in config.curriculum}


def validate(config: EncodeConfig) -> None:
    if not config.data or not config.output:
        raise ConfigError("encode needs --data (a curated dataset) and --output (the latent cache)")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {list(DTYPES)}, got {config.dtype!r}")
    names = [s.name for s in config.curriculum]
    if not names or len(set(names)) != len(names) or NULL_CLIP in names:
        raise ConfigError(f"curriculum: expected stages with distinct, non-empty names, got {names}")
    validate_buckets(config.buckets, config.curriculum, 1)
    if config.patch_size < 1:
        raise ConfigError(f"patch_size: expected the model's patch_size (1 or more), got {config.patch_size}")
    for key in ("commit_clips", "windows_per_clip"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: expected a value above 0, got {getattr(config, key)}")
    for key in ("decode", "encoder", "text_encoder"):
        pool = getattr(config, key)
        if pool.concurrency < 1 or pool.batch_size < 1 or pool.num_cpus < 0 or pool.num_gpus < 0:
            raise ConfigError(f"{key}: concurrency and batch_size must be at least 1, num_cpus and num_gpus at least "
                              "0")


@dataclasses.dataclass
class EncodePlan:
    """What one run encodes: per clip, the stages the cache lacks."""

    pending: list[dict]  # {"clip_id", "stages": [names]}
    rows: dict[str, int]  # clip_id -> rows it will have (windows over its pending stages)
    clips: int  # kept clips in the curated version
    cached: int  # of them, clips with every stage already in the cache
    too_short: int  # clips no stage has a window for
    unfit: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # stage -> reason -> clips: no bucket


def plan_encode(config: EncodeConfig, shards, cache: LatentCache,
                buckets: dict[str, StageBuckets | None] | None = None) -> EncodePlan:
    """`buckets`: encode_buckets(config) (None: square crops); a clip that fits no bucket of a stage is counted in
    `unfit` and given no rows there."""
    table = shards.to_table(columns=["clip_id", "num_frames", "fps", "width", "height"])
    done = cache.done()
    buckets = buckets or {}
    pending, rows, cached, too_short = [], {}, 0, 0
    unfit = {name: {} for name, b in buckets.items() if b is not None}
    for row in sorted(table.to_pylist(), key=lambda r: r["clip_id"]):
        clip_id, frames, fps = row["clip_id"], row["num_frames"], row["fps"]
        counts = {}
        for s in config.curriculum:
            bucket, reason = clip_bucket(buckets.get(s.name), row)
            if reason:
                unfit[s.name][reason] = unfit[s.name].get(reason, 0) + 1
            counts[s.name] = 0 if reason else expected_windows(frames, fps, s, config.windows_per_clip, bucket)
        wanted = [name for name, n in counts.items() if n and (clip_id, name) not in done]
        if not any(counts.values()):
            too_short += 1
        elif not wanted:
            cached += 1
        else:
            pending.append({"clip_id": clip_id, "stages": wanted})
            rows[clip_id] = sum(counts[name] for name in wanted)
    return EncodePlan(pending, rows, len(table), cached, too_short, unfit)




def encode_plan(pending: list[dict], data_uri: str, config: EncodeConfig,
                buckets: dict[str, StageBuckets | None] | None = None) -> ray.data.Dataset:
    """pending clips -> decoded windows (CPU actors) -> latent distributions (codec actors) -> caption encodings
    (text encoder actors): the rows the driver commits."""
    ds = ray.data.from_items(pending, override_num_blocks=max(1, min(len(pending), 256)))
    steps = [(config.decode, ClipWindowsStage, (data_uri, config.curriculum, config.windows_per_clip, buckets)),
             (config.encoder, CodecStage, (config.codec, config.dtype)),
             (config.text_encoder, TextStage, (config.text, config.dtype, config.text_encoder.num_gpus > 0))]
    for pool, stage_cls, args in steps:
        ds = ds.map_batches(StageActor, fn_constructor_args=(stage_cls, *args), batch_size=pool.batch_size,
                            batch_format="pyarrow", concurrency=pool.concurrency, num_cpus=pool.num_cpus,
                            num_gpus=pool.num_gpus or None)
    return ds


class EncodeCommitter:
    """Collects encoded rows until each clip has all of them, and commits whole clips `every` at a time (one
    merge_insert each): a clip is in the cache with all its windows of a stage, or not at all."""

    def __init__(self, cache: LatentCache, identity: dict, rows: dict[str, int], every: int):
        self.cache, self.identity, self.expected, self.every = cache, identity, rows, max(1, every)
        self.partial: dict[str, list[dict]] = {}
        self.ready: list[dict] = []
        self.ready_clips = 0
        self.committed = 0  # clips
        self.rows = 0

    def add(self, row: dict) -> None:
        row.update(codec=self.identity["codec"], text_encoder=self.identity["text_encoder"])
        rows = self.partial.setdefault(row["clip_id"], [])
        rows.append(row)
        if len(rows) == self.expected[row["clip_id"]]:
            self.ready.extend(self.partial.pop(row["clip_id"]))
            self.ready_clips += 1
            if self.ready_clips >= self.every:
                self.flush()

    def flush(self) -> None:
        if not self.ready:
            return
        self.cache.put_rows(sorted(self.ready, key=lambda r: (r["clip_id"], r["stage"], r["window"])))
        self.committed += self.ready_clips
        self.rows += len(self.ready)
        self.ready, self.ready_clips = [], 0


def _null_text(config: EncodeConfig, ident: dict) -> dict:
    """The empty prompt's encoding, the stand-in for a dropped caption (classifier-free guidance)."""
    text, mask, tokens = encode_text(FrozenTextEncoder(config.text), [""], config.dtype)
    return {"clip_id": NULL_CLIP, "window": 0, "stage": NULL_CLIP, "codec": ident["codec"],
            "text_encoder": ident["text_encoder"], "dtype": text.dtype.str, "caption": "",
            "text": text[0].tobytes(), "text_shape": list(text[0].shape), "text_mask": mask[0].tobytes(),
            "text_tokens": tokens[0].tobytes()}


def run_encode(config: EncodeConfig) -> dict:
    """Encode the clips of `config.data` the cache at `config.output` lacks; returns the version's record."""
    validate(config)
    started = time.perf_counter()
    dataset, number = open_data(config.data)  # the one-line errors of a wrong --data
    data_uri = pin_version(config.data, number)
    ident = identity(config)
    cache = LatentCache(cache_uri(config.output))
    shown = redact_uri(config.output)
    cache.claim(ident, shown)  # refuses another codec or text encoder before any work
    if (NULL_CLIP, NULL_CLIP) not in cache.done():
        cache.put_rows([_null_text(config, ident)])
    buckets = encode_buckets(config)
    plan = plan_encode(config, dataset.open("shards", number), cache, buckets)
    for name, reasons in plan.unfit.items():
        log.info("stage %r: %d clips fit no bucket (%s); they are not encoded", name, sum(reasons.values()),
                 ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none")
    log.info("%s: %d kept clips in version %d; %d to encode, %d already cached, %d too short for every stage",
             redact_uri(data_uri), plan.clips, number, len(plan.pending), plan.cached, plan.too_short)
    committer = EncodeCommitter(cache, ident, plan.rows, config.commit_clips)
    if plan.pending:
        init_ray(config)
        last_log = time.monotonic()
        for batch in encode_plan(plan.pending, data_uri, config, buckets).iter_batches(batch_size=None,
                                                                                        batch_format="pyarrow"):
            for row in batch.to_pylist():
                committer.add(row)
            if time.monotonic() - last_log > 30:
                log.info("encoded %d/%d clips", committer.committed + committer.ready_clips, len(plan.pending))
                last_log = time.monotonic()
        committer.flush()
    wall = time.perf_counter() - started
    counts = {"clips": plan.clips, "encoded": committer.committed, "cached": plan.cached,
              "too_short": plan.too_short, "undecodable": len(plan.pending) - committer.committed,
              "rows_written": committer.rows, "rows": cache.dataset().count_rows() - 1}
    record = {"dataset_version": number, "data": redact_uri(data_uri), "counts": counts, "wall_seconds": wall,
              **{k: ident[k] for k in ("codec", "text_encoder", "stages")}}
    if plan.unfit:  # stage -> reason -> clips that fit no bucket (training/buckets.py)
        record["no_bucket"] = plan.unfit
    cache.tag(number, record)
    return record


def summary_text(record: dict, output: str) -> str:
    c = record["counts"]
    return "\n".join([
        f"latent cache {redact_uri(output)} (Lance dataset {CACHE_TABLE}, tag v{record['dataset_version']:04d})",
        f"curated data: {record['data']} ({c['clips']} kept clips)",
        f"clips encoded now: {c['encoded']} ({c['cached']} already cached, {c['too_short']} too short for every "
        f"stage, {c['undecodable']} undecodable); rows written: {c['rows_written']}, rows in the cache: {c['rows']}",
        f"codec: {record['codec']}; text encoder: {record['text_encoder']}",
        f"wall time: {record['wall_seconds']:.1f} s",
    ])


def codec_section(spec: str) -> dict:
    """`--codec SPEC` as the codec config section: a YAML file holding the section (or a config with a `codec:`
    section, such as a train config), an inline YAML mapping, or a bare kind."""
    from pathlib import Path

    import yaml

    path = Path(spec)
    try:
        loaded = yaml.safe_load(path.read_text() if path.is_file() else spec)
    except yaml.YAMLError as err:
        raise ConfigError(f"--codec {spec!r}: not YAML ({str(err).splitlines()[0]})") from None
    if isinstance(loaded, str) and not path.is_file():
        return {"kind": loaded}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--codec {spec!r}: expected a codec section (a mapping), a file holding one, or a kind")
    return loaded["codec"] if isinstance(loaded.get("codec"), dict) else loaded
