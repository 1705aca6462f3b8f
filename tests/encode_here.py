"""`reelforge encode`'s work without Ray, for tests: the same stages called in this process on the whole plan,
committed and tagged the way pipelines/encode.py commits them."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from curation.dataset import open_data
from pipelines.encode import EncodeCommitter, EncodePlan, _null_text, encode_buckets, identity, plan_encode
from training.clip_table import pin_version
from training.latent_cache import LatentCache
from training.latent_dataset import cache_uri
from training.latent_encode import ClipWindowsStage, CodecStage, EncodeConfig, TextStage


@dataclass
class EncodedHere:
    plan: EncodePlan
    committed: int


def encode_here(config: EncodeConfig) -> EncodedHere:
    """Encode config.data's version into config.output's latent cache, buckets and windows as the config says."""
    dataset, number = open_data(config.data)
    ident = identity(config)
    cache = LatentCache(cache_uri(config.output))
    cache.claim(ident, config.output)
    cache.put_rows([_null_text(config, ident)])
    buckets = encode_buckets(config)
    plan = plan_encode(config, dataset.open("shards", number), cache, buckets)
    stages = [ClipWindowsStage(pin_version(config.data, number), config.curriculum, config.windows_per_clip, buckets),
              CodecStage(config.codec, config.dtype), TextStage(config.text, config.dtype, False)]
    for stage in stages:
        stage.setup()
    committer = EncodeCommitter(cache, ident, plan.rows, config.commit_clips)
    batch = pa.Table.from_pylist(plan.pending)
    for stage in stages:
        batch = stage(batch)
    for row in batch.to_pylist():
        committer.add(row)
    committer.flush()
    cache.tag(number, {"dataset_version": number, "counts": {"encoded": committer.committed}, **ident})
    return EncodedHere(plan, committer.committed)
