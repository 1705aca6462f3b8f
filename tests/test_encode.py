"""`reelforge encode` and training from its latent cache, on small curated datasets written by the curation writer
(tests/test_dataset.py's: two versions, clips too short for a stage, one clip whose bytes are not a video).

Without Ray: the stages on hand-built batches (the pixel codec's latents are the frames exactly), a cache refusing
another codec or text encoder, and the loader's replayable batches with no decoder and no text tower. On a local Ray
cluster (slow): incremental encodes, kill -9 and rerun, and a 2-worker training run from the cache alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from encode_here import encode_here
from test_dataset import BAD, SHORT, VERSION_1, VERSION_2, _write_version

from curation.dataset import DatasetError
from pipelines.config import load_config
from pipelines.encode import identity, run_encode
from training.latent_cache import CacheMismatch, LatentCache
from training.latent_dataset import CachedInputs, LatentBatch, LatentLoader, LatentTable, cache_uri
from training.latent_encode import ClipWindowsStage, CodecStage, EncodeConfig, TextStage

HELPER = Path(__file__).parent / "encode_crash_helpers.py"
CURRICULUM = ("[{name: low, steps: 1, num_frames: 4, fps: 4.0, size: 8},"
              " {name: high, steps: 1, num_frames: 2, fps: 8.0, size: 16}]")
ENCODE_SETS = [f"curriculum={CURRICULUM}", "windows_per_clip=2", "commit_clips=4", "decode.num_cpus=0.5",
               "encoder.num_cpus=0.5", "text_encoder.num_cpus=0.5", "encoder.batch_size=8"]


def _encode_config(data, output, *sets: str) -> EncodeConfig:
    return load_config(EncodeConfig, None, [*ENCODE_SETS, *sets], base={"data": str(data), "output": str(output)})


@pytest.fixture(scope="module")
def curated_v1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curated")
    _write_version(root, 1, VERSION_1)
    return root


@pytest.fixture(scope="module")
def cache_here(curated_v1, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("latents-here")
    return out, encode_here(_encode_config(f"{curated_v1}@v1", out))


def test_stages_give_each_clip_its_windows_per_stage_and_exact_pixel_latents(curated_v1):
    config = _encode_config(curated_v1, "unused")
    decode = ClipWindowsStage(f"{curated_v1}@v1", config.curriculum, config.windows_per_clip)
    decode.setup()
    short = min(SHORT)
    windows = decode(pa.Table.from_pylist([{"clip_id": "clip-000", "stages": ["low", "high"]},
                                           {"clip_id": f"clip-{short:03d}", "stages": ["low", "high"]},
                                           {"clip_id": f"clip-{BAD:03d}", "stages": ["low", "high"]}]))
    keys = [(r["clip_id"], r["stage"], r["window"]) for r in windows.select(["clip_id", "stage", "window"])
            .to_pylist()]
    # clip-000 has 8 frames: two windows at each stage; the short clip (3 frames) none at "low"; the bad one nothing
    assert keys == [("clip-000", "low", 0), ("clip-000", "low", 1), ("clip-000", "high", 0), ("clip-000", "high", 1),
                    (f"clip-{short:03d}", "high", 0), (f"clip-{short:03d}", "high", 1)]
    videos = [np.frombuffer(v, np.uint8).reshape(s) for v, s in
              zip(windows["video"].to_pylist(), windows["video_shape"].to_pylist(), strict=True)]
    assert videos[0].shape == (4, 8, 8, 3) and videos[2].shape == (2, 16, 16, 3)
    codec = CodecStage(config.codec, "float16")
    codec.setup()
    encoded = codec(windows)
    assert "video" not in encoded.column_names and encoded["logvar"].null_count == len(encoded)  # pixels: a point
    for row, video in zip(encoded.to_pylist(), videos, strict=True):
        mean = np.frombuffer(row["latent"], row["dtype"]).reshape(row["latent_shape"])  # (3, T, H, W)
        back = np.rint((mean.astype(np.float32) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)
        assert np.array_equal(back, video)  # float16 keeps every 8-bit level: the cache loses nothing
    text = TextStage(config.text, "float16", False)
    text.setup()
    rows = text(encoded).to_pylist()
    assert rows[0]["text_shape"] == [32, 64]
    mask = np.frombuffer(rows[0]["text_mask"], bool)
    assert mask[0] and not mask[-1] and mask.sum() == np.argmin(mask)  # SOT .. EOT, then padding


def test_a_cache_refuses_another_codec_text_encoder_or_stage_shape(curated_v1, tmp_path):
    config = _encode_config(curated_v1, tmp_path / "latents")
    cache = LatentCache(cache_uri(config.output))
    cache.claim(identity(config), "the cache")
    other_text = _encode_config(curated_v1, tmp_path / "latents", "text.context_length=16")
    with pytest.raises(CacheMismatch, match="holds latents of text encoder 'open_clip:tiny:random:ctx32', not "
                       "'open_clip:tiny:random:ctx16': one cache holds one text encoder"):
        run_encode(other_text)  # refused before Ray starts or anything is written
    held = identity(config)
    with pytest.raises(CacheMismatch, match="holds latents of codec 'pixels', not 'vae:x'"):
        cache.claim({**held, "codec": "vae:x"}, "the cache")
    resized = {**held, "stages": {"low": {**held["stages"]["low"], "size": 16}}}
    with pytest.raises(CacheMismatch, match="stage 'low' was encoded as"):
        cache.claim(resized, "the cache")
    assert len(cache) == 0 and cache.identity() == held


def test_loader_batches_are_replayable_and_read_no_video_and_no_text_tower(cache_here, monkeypatch):
    out, encoded = cache_here
    plan = encoded.plan
    assert encoded.committed == len(plan.pending) - 1  # every clip but the undecodable one
    assert plan.clips == 20 and plan.too_short == 0  # the short clips still fit the 2-frame stage
    import av

    from models.text_encoder import FrozenTextEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("the latent loader must not decode video or run the text tower")

    monkeypatch.setattr(av, "open", refuse)
    monkeypatch.setattr(FrozenTextEncoder, "forward", refuse)
    table = LatentTable.open(str(out))
    assert table.number == 1 and table.version.startswith("latents-v1-lance")
    config = _encode_config("unused", "unused")
    low = config.curriculum[0]
    # "low": 19 decodable clips less the 3 short ones, 2 windows each (clips of 8 frames give 2 distinct windows)
    assert len(table.items("low")) == 2 * (20 - 1 - len(SHORT & set(VERSION_1)))

    def batches(rank: int, seed: int = 0) -> list[LatentBatch]:
        with LatentLoader(table, low, 2, seed, rank, 2, 3) as loader:
            return [loader.batch(k) for k in (0, 1, 5, 1)]

    first, again, other_rank, other_seed = batches(0), batches(0), batches(1), batches(0, seed=1)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.mean, b.mean) and np.array_equal(a.text, b.text)
    assert np.array_equal(first[1].mean, first[3].mean)  # batch 1 asked twice: the same
    assert first[0].mean.shape == (3, 3, 4, 8, 8) and first[0].logvar is None and first[0].text.shape == (3, 32, 64)
    assert not np.array_equal(first[0].mean, other_rank[0].mean)
    assert not np.array_equal(first[0].mean, other_seed[0].mean)

    inputs = CachedInputs(table.null_text(), cfg_dropout=0.5, device=torch.device("cpu"))
    x0, context, mask = inputs(first[0], None, torch.Generator().manual_seed(3))
    assert torch.equal(x0, torch.from_numpy(first[0].mean.astype(np.float32)))  # pixels: x0 is the mean
    null_context = torch.from_numpy(table.null_text()[0].astype(np.float32))
    dropped = [bool(torch.equal(c, null_context)) for c in context]
    assert dropped == (torch.rand(3, generator=torch.Generator().manual_seed(3)) < 0.5).tolist()
    assert int(mask[dropped.index(True)].sum()) == 2 if any(dropped) else True  # the empty prompt: SOT, EOT


def test_x0_is_drawn_from_the_cached_distribution_with_the_steps_generator():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 4, 3, 8, 8)).astype(np.float16)
    logvar = np.full_like(mean, np.log(4.0))  # std 2
    batch = LatentBatch(mean, logvar, np.zeros((2, 5, 8), np.float16), np.ones((2, 5), bool))
    inputs = CachedInputs((np.zeros((5, 8), np.float16), np.zeros(5, bool)), 0.0, torch.device("cpu"))
    x0 = inputs(batch, None, torch.Generator().manual_seed(7))[0]
    again = inputs(batch, None, torch.Generator().manual_seed(7))[0]
    other = inputs(batch, None, torch.Generator().manual_seed(8))[0]
    assert torch.equal(x0, again) and not torch.equal(x0, other)
    eps = (x0 - torch.from_numpy(mean.astype(np.float32))) / 2
    assert abs(float(eps.std()) - 1.0) < 0.1 and abs(float(eps.mean())) < 0.1


def test_training_refuses_a_stage_the_cache_did_not_encode(cache_here):
    from training.config import CurriculumStage

    table = LatentTable.open(str(cache_here[0]))
    with pytest.raises(DatasetError, match="curriculum stage 'mid' is not in the latent cache"):
        LatentLoader(table, CurriculumStage(name="mid", num_frames=4, fps=4.0, size=8), 2, 0, 0, 1, 1)
    with pytest.raises(DatasetError, match="stage 'low' was encoded as .* the config asks"):
        LatentLoader(table, CurriculumStage(name="low", num_frames=4, fps=4.0, size=16), 2, 0, 0, 1, 1)
    with pytest.raises(DatasetError, match="holds no encode of curated version 3"):
        LatentTable.open(f"{cache_here[0]}@v3")
    from training.config import TrainConfig
    from training.latent_dataset import check_cache_matches
    from training.vae.task import VAETask

    with pytest.raises(DatasetError, match="is a latent cache; VAETask trains on curated video"):
        check_cache_matches(table, TrainConfig(), VAETask)


def _rows(output: Path, version: int | None = None) -> list[dict]:
    table = LatentCache(cache_uri(str(output))).dataset(version).to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["clip_id"], r["stage"], r["window"]))


@pytest.fixture(scope="module")
def encoded(curated_v1, ray_cluster, tmp_path_factory) -> dict:
    """Version 1 encoded on Ray by a run killed with SIGKILL after its second commit, then by the rerun; then
    version 2 curated and encoded into the same cache."""
    out = tmp_path_factory.mktemp("latents")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HELPER), f"{curated_v1}@v1", str(out),
                           ray_cluster.get_runtime_context().gcs_address], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]  # it died by SIGKILL after the commit, not by an error
    cache = LatentCache(cache_uri(str(out)))
    killed = {"versions": cache.versions(), "clips": {clip for clip, _ in cache.done() if clip}}
    first = run_encode(_encode_config(f"{curated_v1}@v1", out))
    _write_version(curated_v1, 2, VERSION_2)
    second = run_encode(_encode_config(curated_v1, out))
    return {"output": out, "killed": killed, "first": first, "second": second}


@pytest.mark.slow
@pytest.mark.ray
def test_kill_minus_9_then_rerun_gives_the_rows_of_an_uninterrupted_encode(encoded, cache_here):
    assert encoded["killed"]["versions"] == {}  # not finished: no tag for readers
    assert len(encoded["killed"]["clips"]) == 8  # two commits of 4 whole clips, nothing else
    first = encoded["first"]["counts"]
    assert first == {"clips": 20, "encoded": 11, "cached": 8, "too_short": 0, "undecodable": 1,
                     "rows_written": first["rows_written"], "rows": first["rows"]}
    here = [r for r in _rows(cache_here[0]) if r["clip_id"]]
    on_ray = [r for r in _rows(encoded["output"], 1) if r["clip_id"]]
    # Ray's actor pools, killed and rerun, write the bytes the stages write called in one uninterrupted process
    assert len(here) == first["rows"] and on_ray == here


@pytest.mark.slow
@pytest.mark.ray
def test_a_new_curated_version_encodes_only_its_new_clips(encoded):
    first, second = encoded["first"]["counts"], encoded["second"]["counts"]
    # Version 2 adds 6 kept clips (the 7th was dropped by the filters): only they are encoded; the undecodable clip
    # of version 1 is tried again and still fails.
    assert second["clips"] == 26 and second["encoded"] == 6 and second["cached"] == 19
    assert second["undecodable"] == 1 and second["rows"] == first["rows"] + second["rows_written"]
    assert LatentTable.open(str(encoded["output"])).number == 2
    assert len(LatentTable.open(f"{encoded['output']}@v1")) == first["rows"]  # v1's rows, read as they were


@pytest.mark.slow
@pytest.mark.ray
def test_training_reads_the_cache_alone_with_two_workers(encoded, curated_v1, tmp_path):
    from pipelines.train import run_train
    from training.config import TrainConfig

    sets = [f"curriculum={CURRICULUM}", "data_loading.windows_per_clip=2", "checkpoint.every_steps=2",
            "sampling.every_steps=0", "tracking.log_every_steps=1", "optim.warmup_steps=1",
            "deepspeed.micro_batch_size=2", "scaling.num_workers=2"]
    config = load_config(TrainConfig, None, sets, base={"data": str(encoded["output"]), "output": str(tmp_path)})
    hidden = curated_v1.with_name(curated_v1.name + "-hidden")
    curated_v1.rename(hidden)  # no curated video anywhere: the run can only read the cache
    try:
        summary = run_train(config)
    finally:
        hidden.rename(curated_v1)
    assert summary["step"] == 2 and summary["model_version"] is not None
    assert summary["data_version"].startswith("latents-v2-lance")
    wrong = load_config(TrainConfig, None, [*sets, "text.context_length=16"],
                        base={"data": str(encoded["output"]), "output": str(tmp_path / "other")})
    with pytest.raises(DatasetError, match="captions encoded by 'open_clip:tiny:random:ctx32'"):
        run_train(wrong)
    shutil.rmtree(tmp_path / "other", ignore_errors=True)
