"""Aspect-ratio buckets (training/buckets.py): real clips of several aspect ratios, encoded here with PyAV and written
by the curation writer, are decoded through the training loader. Every micro-batch comes from one bucket, each clip
keeps its aspect ratio (a disk drawn in it stays round), clips that fit no bucket are counted, and the sampler is
replayable and resumes like the square one."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from encode_here import encode_here

from curation.config import CurateConfig, FilterConfig, ScoreFilter
from curation.dataset import CuratedDataset
from curation.writer import BatchCommitter, create_tables, finish_filters, tag_version
from models.schedules import NoiseSchedule, ScheduleConfig
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.vdit import VDiT, vdit_config
from pipelines.config import ConfigError, load_config
from training.buckets import BucketSampler, bucket_shape, sample_shape, stage_buckets
from training.config import BucketConfig, CurriculumStage, DataConfig, TrainConfig, resume_hash
from training.dataset import ClipTable, StageLoader
from training.sample import generate

REPO = Path(__file__).resolve().parents[1]
STAGE = CurriculumStage(name="video", steps=10, num_frames=4, fps=8.0, size=32, bucket_frames=[4, 8])
BUCKETS = BucketConfig(aspect_ratios=["16:9", "9:16", "4:3", "1:1"], max_aspect_error=0.2)
MULTIPLE = 4  # patch 2 x a codec's 2x spatial compression
# clip number -> (width, height, frames): each ratio several times, at 4..12 frames (the 4- and 8-frame buckets)
CLIPS = {n: (64, 36, 4 + n % 9) for n in range(0, 7)}  # 16:9
CLIPS |= {n: (36, 64, 4 + n % 9) for n in range(7, 12)}  # 9:16
CLIPS |= {n: (48, 36, 4 + n % 9) for n in range(12, 17)}  # 4:3
CLIPS |= {n: (40, 40, 4 + n % 9) for n in range(17, 22)}  # 1:1
CLIPS |= {22: (60, 36, 9), 23: (60, 36, 10)}  # 5:3: near 16:9, a small crop
WIDE = {24: (96, 24, 9), 25: (24, 96, 9)}  # 4:1 and 1:4: no bucket within 0.2 in log ratio
SHORT = {26: (64, 36, 3), 27: (40, 40, 2)}  # fewer frames than the smallest bucket's 4
CLIPS |= WIDE | SHORT
BAD = 3  # a 16:9 clip whose bytes are not a video
KEEP_ALL = CurateConfig(filters=FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(), aesthetic=ScoreFilter(),
                                             caption_match=ScoreFilter()))


def _clip(n: int, width: int, height: int, frames: int) -> bytes:
    """A white disk of radius 0.3 x the short side on green level 9 * n (which clip) and blue 8 * i (which frame)."""
    yy, xx = np.mgrid[:height, :width]
    disk = (xx - width / 2 + 0.5) ** 2 + (yy - height / 2 + 0.5) ** 2 <= (0.3 * min(width, height)) ** 2
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 1], rgb[..., 2] = 9 * n, 8 * i
            rgb[disk] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _record(n: int) -> dict:
    width, height, frames = CLIPS[n]
    clip = {"clip_id": f"clip-{n:03d}", "video_id": f"video-{n}", "start_frame": 0, "end_frame": frames - 1,
            "start_s": 0.0, "end_s": frames / 8, "num_frames": frames, "caption": f"caption {n}", "drop_reason": None,
            "width": width, "height": height,
            "video_bytes": b"not a video at all" if n == BAD else _clip(n, width, height, frames)}
    return {"video_id": f"video-{n}", "uri": f"/videos/{n}.mp4", "size_bytes": 1000, "status": "ok",
            "error_class": None, "error_message": None, "fps": 8.0, "width": width, "height": height,
            "duration_s": frames / 8, "num_frames": frames, "clips": [clip]}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> ClipTable:
    root = tmp_path_factory.mktemp("bucketed")
    dataset = CuratedDataset(str(root))
    create_tables(dataset)
    committer = BatchCommitter(dataset, 1, every=8)
    for n in sorted(CLIPS):
        committer.add(_record(n))
    committer.flush()
    written = finish_filters(dataset, KEEP_ALL, 1, [])
    tag_version(dataset, 1, {"dataset_version": 1, "counts": written.counts})
    return ClipTable.open(str(root))


def _buckets():
    return stage_buckets(BUCKETS, STAGE, MULTIPLE)


def _data(**changes) -> DataConfig:
    return DataConfig(**{"decode_concurrency": 2, "prefetch_batches": 1, **changes})


def _number(clip_id: str) -> int:
    return int(clip_id.removeprefix("clip-"))


def _row_of(table: ClipTable, n: int) -> int:
    return table.metadata()["clip_id"].index(f"clip-{n:03d}")


def test_bucket_shapes_follow_the_rule():
    for ratio in (16 / 9, 9 / 16, 4 / 3, 1.0, 2.35):
        for size, multiple in ((32, 4), (256, 16), (17 * 8, 8)):
            h, w = bucket_shape(ratio, size, multiple)
            assert h % multiple == 0 and w % multiple == 0
            assert abs(math.log(w / h / ratio)) < 2 * multiple / min(h, w)  # the nearest multiples, no more off
            assert abs(h * w / size**2 - 1) < 4 * multiple / size  # about the stage's square in pixels
    assert bucket_shape(1.0, 32, 4) == (32, 32)  # 1:1 is the stage's square
    shapes = {(b.height, b.width) for b in _buckets().buckets}
    assert shapes == {(24, 44), (44, 24), (28, 36), (32, 32)}
    assert sorted({b.num_frames for b in _buckets().buckets}) == [4, 8]
    merged = stage_buckets(BucketConfig(aspect_ratios=["16:9", "17:9"]), CurriculumStage(size=16), 4)
    assert [(b.ratio, b.height, b.width) for b in merged.buckets] == [("16:9", 12, 20)]  # one shape, one bucket
    assert stage_buckets(BucketConfig(), STAGE, MULTIPLE) is None  # no buckets: square crops, as before


def test_clips_go_to_the_nearest_bucket_and_unfit_ones_are_counted(table):
    sampler = BucketSampler(table.metadata(), _buckets(), 1, seed=0, rank=0, world_size=1, batch_size=2)
    assert dict(sampler.unfit) == {"aspect": len(WIDE), "frames": len(SHORT), "unknown": 0}
    assert len(sampler.row_bucket) == len(CLIPS) - len(WIDE) - len(SHORT)
    for n, (width, height, frames) in CLIPS.items():
        row = _row_of(table, n)
        if n in WIDE or n in SHORT:
            assert row not in sampler.row_bucket
            continue
        bucket = sampler.bucket_of(row)
        assert abs(math.log(width / height) - bucket.log_aspect) <= BUCKETS.max_aspect_error
        assert bucket.num_frames == (8 if frames >= 8 else 4)  # the largest frame count the clip fills
    assert sampler.bucket_of(_row_of(table, 22)).ratio == "16:9"  # 5:3 is nearest 16:9's 24 x 44
    report = sampler.report()
    assert report["buckets.video.unfit_aspect"] == 2 and report["buckets.video.unfit_frames"] == 2
    assert report["buckets.video.fit_clips"] == len(sampler.row_bucket)
    per_bucket = {k: v for k, v in report.items() if not k.startswith(("buckets.video.unfit", "buckets.video.fit"))}
    assert len(per_bucket) >= 5 and sum(per_bucket.values()) == len(sampler.items)
    assert "2 aspect, 2 frames" in sampler.summary() and "4 fit no bucket" in sampler.summary()


def test_every_micro_batch_is_one_bucket_and_keeps_aspect_ratios(table, caplog):
    bad = _row_of(table, BAD)
    with StageLoader(table, STAGE, _data(), 0, 0, 1, 2, buckets=_buckets()) as loader:
        sampler = loader.sampler
        with_bad = [k for k in range(sampler.batches_per_epoch) if bad in {r for r, _ in sampler.batch_items(k)}]
        assert with_bad
        shapes = set()
        with caplog.at_level(logging.WARNING, logger="reelforge.train.dataset"):
            for k in range(sampler.batches_per_epoch):
                video, captions = loader.batch(k)
                buckets = {sampler.bucket_of(row) for row, _ in sampler.batch_items(k)}
                assert len(buckets) == 1
                (bucket,) = buckets
                assert video.shape == (2, bucket.num_frames, bucket.height, bucket.width, 3)
                shapes.add(video.shape[1:4])
                for clip, caption in zip(video, captions, strict=True):
                    n = int(caption.split()[1])
                    assert n != BAD and n not in WIDE and n not in SHORT
                    width, height, _ = CLIPS[n]
                    assert abs(round(float(np.median(clip[..., 1])) / 9) - n) == 0  # the clip it says it is
                    # the output's ratio is the source's within the crop tolerance, and nothing was stretched
                    assert abs(math.log(bucket.width / bucket.height) - math.log(width / height)) <= 0.2
                    ys, xs = np.nonzero(clip[0, ..., 0] > 128)  # the disk (background red is 0)
                    assert abs(math.log(xs.std() / ys.std())) < 0.08, (n, bucket)
        assert "clip-003" in caplog.text  # the bad clip was replaced by one of its own bucket
        assert len(shapes) >= 5  # several ratios and both frame counts came through


def test_stretching_would_have_been_seen(table):
    """The roundness check above can fail: a 16:9 clip squeezed into a square measures far from round."""
    from training.data import decode_clip

    width, height, frames = CLIPS[0]
    clip = decode_clip(_clip(0, width, height, frames), [0], (24, 44))[0]
    ys, xs = np.nonzero(clip[..., 0] > 128)
    assert abs(math.log(xs.std() / ys.std())) < 0.08
    with av.open(io.BytesIO(_clip(0, width, height, frames))) as container:
        frame = next(container.decode(video=0)).reformat(width=32, height=32, format="rgb24").to_ndarray()
    ys, xs = np.nonzero(frame[..., 0] > 128)
    assert abs(math.log(xs.std() / ys.std())) > 0.3


def test_the_sampler_is_replayable_and_resumes(table):
    def sampler(seed: int, rank: int = 0, world: int = 1) -> BucketSampler:
        return BucketSampler(table.metadata(), _buckets(), 2, seed, rank, world, 2)

    a, b = sampler(0), sampler(0)
    epochs = 3 * a.batches_per_epoch
    assert [a.batch_items(k) for k in range(epochs)] == [b.batch_items(k) for k in reversed(range(epochs))][::-1]
    assert [a.batch_items(k) for k in range(a.batches_per_epoch)] != [sampler(1).batch_items(k)
                                                                       for k in range(a.batches_per_epoch)]
    first = [a.batch_items(k) for k in range(a.batches_per_epoch)]
    second = [a.batch_items(k) for k in range(a.batches_per_epoch, 2 * a.batches_per_epoch)]
    assert first != second  # a new epoch reshuffles
    ranks = [sampler(0, r, 2) for r in range(2)]
    seen = [item for s in ranks for k in range(s.batches_per_epoch) for item in s.batch_items(k)]
    assert len(seen) == len(set(seen))  # the ranks' slices of an epoch are disjoint
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == a.batches_total // 2


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_worker_gives_the_uninterrupted_batches(table, rank):
    """Restart at micro-batch `resume_at`, past the first epoch, on the table opened again with nothing cached."""
    with StageLoader(table, STAGE, _data(), 3, rank, 2, 2, buckets=_buckets()) as whole:
        total = 2 * whole.batches_per_epoch + 2
        resume_at = whole.batches_per_epoch + 1
        expected = [whole.batch(k) for k in range(total)]
    reopened = ClipTable.open(table.data_uri)
    with StageLoader(reopened, STAGE, _data(cache=False, prefetch_batches=0), 3, rank, 2, 2,
                     buckets=_buckets()) as resumed:
        for k in [*range(resume_at, total), 1]:
            video, captions = resumed.batch(k)
            np.testing.assert_array_equal(video, expected[k][0])
            assert captions == expected[k][1]


def test_bucket_config_mistakes_name_their_key():
    cases = {"buckets.aspect_ratios": ["buckets.aspect_ratios=[16x9]"],
             "buckets.max_aspect_error": ["buckets.aspect_ratios=['1:1']", "buckets.max_aspect_error=0"],
             r"curriculum\[0\] \(a\).bucket_frames": [
                 "curriculum=[{name: a, steps: 5, num_frames: 4, fps: 4.0, size: 16, bucket_frames: [4, 8]}]"],
             r"curriculum\[0\] \(b\).bucket_frames: 3 frames": [
                 "buckets.aspect_ratios=['1:1']", "model.overrides={patch_frames: 2}",
                 "curriculum=[{name: b, steps: 5, num_frames: 4, fps: 4.0, size: 16, bucket_frames: [4, 3]}]"]}
    for key, sets in cases.items():
        with pytest.raises(ConfigError, match=key):
            load_config(TrainConfig, None, sets, base={"data": "d", "output": "o"}).validate()


def test_the_demo_config_loads_and_default_runs_hash_as_before():
    config = load_config(TrainConfig, REPO / "configs/train/buckets-demo.yaml", [], base={"data": "d", "output": "o"})
    config.validate()
    assert config.buckets.aspect_ratios and all(s.bucket_frames for s in config.curriculum)
    plain = load_config(TrainConfig, REPO / "configs/train/demo.yaml", [], base={"data": "d", "output": "o"})
    assert plain.buckets == BucketConfig()
    assert sample_shape(plain.buckets, plain.curriculum[-1], 2) == (4, 16, 16)  # the square, as before
    bucketed = load_config(TrainConfig, REPO / "configs/train/demo.yaml", ["buckets.aspect_ratios=['4:3']"],
                           base={"data": "d", "output": "o"})
    assert resume_hash(bucketed) != resume_hash(plain)  # turning buckets on is not a resume of the same run


def test_the_encode_demo_makes_the_cache_the_train_demo_reads():
    """configs/encode-buckets-demo.yaml records the bucket shapes configs/train/buckets-demo.yaml asks for."""
    from pipelines.encode import identity, validate
    from training.buckets import bucket_identity
    from training.latent_encode import EncodeConfig

    base = {"data": "d", "output": "o"}
    encode = load_config(EncodeConfig, REPO / "configs/encode-buckets-demo.yaml", [], base=base)
    validate(encode)
    train = load_config(TrainConfig, REPO / "configs/train/buckets-demo.yaml", [], base=base)
    stages = identity(encode)["stages"]
    multiple = train.model_config().patch_size  # the pixel codec compresses nothing
    for stage in train.curriculum:
        wanted = bucket_identity(stage_buckets(train.buckets, stage, multiple))
        assert {k: stages[stage.name][k] for k in wanted} == wanted and wanted["buckets"]


def test_the_model_trains_and_samples_on_a_non_square_grid():
    torch.manual_seed(0)
    text = FrozenTextEncoder(TextEncoderConfig())
    model = VDiT(vdit_config("VDiT-T/2", depth=2, context_dim=text.width))
    context, mask = text(["a red triangle moving right", "a square"])
    x = torch.randn(2, 3, 4, 8, 20)
    out = model(x, torch.tensor([10, 500]), context, mask)
    assert out.shape == x.shape
    out.float().pow(2).mean().backward()  # gradients flow through the 4 x 10 token grid
    assert model.x_embedder.proj.weight.grad is not None
    videos = generate(model.eval(), text, NoiseSchedule(ScheduleConfig()), ["a", "b"], 2, 12, 3, 2.0, seed=0,
                      width=20)
    assert videos.shape == (2, 3, 2, 12, 20) and torch.isfinite(videos).all()
    square = generate(model, text, NoiseSchedule(ScheduleConfig()), ["a", "b"], 2, 12, 3, 2.0, seed=0)
    assert square.shape == (2, 3, 2, 12, 12)
    assert sample_shape(BUCKETS, STAGE, MULTIPLE) == (8, 24, 44)  # samples: the first ratio, most frames


def _bucketed_config(data: str, output: str, *sets: str) -> TrainConfig:
    curriculum = "curriculum=[{name: video, steps: 3, num_frames: 4, fps: 8.0, size: 32, bucket_frames: [4, 8]}]"
    sets = [curriculum, "buckets.aspect_ratios=['16:9', '9:16', '4:3', '1:1']", "deepspeed.micro_batch_size=2", *sets]
    return load_config(TrainConfig, None, sets, base={"data": data, "output": output})


def test_the_training_loop_reads_one_bucket_per_micro_batch_and_reports_the_unfit(table, caplog):
    from training.loop import CurriculumBatches

    config = _bucketed_config(table.data_uri, "o", "data_loading.prefetch_batches=0")
    config.validate()
    batches = CurriculumBatches(table, config, 0, 1, spatial_multiple=MULTIPLE)
    try:
        with caplog.at_level(logging.INFO, logger="reelforge.train"):
            shapes = {batches.batch(step, 0)[0].shape[1:4] for step in range(3)}
        buckets = {(b.num_frames, b.height, b.width) for b in _buckets().buckets}
        assert shapes <= buckets
        assert "4 fit no bucket (2 aspect, 2 frames" in caplog.text
        metrics = batches.opened_stage(1)
        assert metrics["buckets.video.unfit_aspect"] == 2 and metrics["buckets.video.unfit_frames"] == 2
        assert batches.opened_stage(2) is None
    finally:
        batches.close()


def test_buckets_are_refused_where_they_do_not_apply(table):
    """The video autoencoder trains on squares: one line, before Ray."""
    from training.latent_dataset import check_buckets_supported
    from training.vae.task import VAETask

    config = _bucketed_config(table.data_uri, "o")
    check_buckets_supported(table, config)  # curated data, the diffusion model: fine
    check_buckets_supported(table, TrainConfig(), VAETask)  # no buckets: nothing to refuse
    with pytest.raises(ConfigError, match="VAETask trains on square crops"):
        check_buckets_supported(table, config, VAETask)


@pytest.fixture(scope="module")
def bucketed_cache(table, tmp_path_factory):
    """`reelforge encode`'s stages with buckets, run in this process (tests/encode_here.py): the pixel codec,
    float32, so each latent is exactly its decoded window."""
    from training.latent_encode import EncodeConfig

    out = tmp_path_factory.mktemp("latents")
    config = EncodeConfig(data=table.data_uri, output=str(out), curriculum=[STAGE], buckets=BUCKETS, patch_size=2,
                          dtype="float32", commit_clips=4)
    encoded = encode_here(config)
    return out, encoded.plan, encoded.committed


def test_a_bucketed_latent_cache_is_read_one_bucket_per_micro_batch(table, bucketed_cache):
    from curation.dataset import DatasetError
    from training.data import decode_row
    from training.latent_dataset import LatentLoader, LatentTable, check_buckets_supported

    out, plan, committed = bucketed_cache
    assert plan.unfit == {"video": {"aspect": len(WIDE), "frames": len(SHORT)}}
    assert committed == len(CLIPS) - len(WIDE) - len(SHORT) - 1  # and the undecodable one
    latents = LatentTable.open(str(out))
    buckets = stage_buckets(BUCKETS, STAGE, 2)
    check_buckets_supported(latents, _bucketed_config(str(out), "o"))  # the cache holds the config's buckets
    rows = {r["clip_id"]: r for r in table.take(range(len(table)))}
    with LatentLoader(latents, STAGE, 1, 0, 0, 1, 2, prefetch_batches=1, buckets=buckets) as loader:
        assert loader.batches_per_epoch >= 5
        shapes = set()
        for k in range(loader.batches_per_epoch):
            batch = loader.batch(k)
            shapes.add(batch.mean.shape[2:])  # one array: every row of the micro-batch has the same shape
            offsets = [offset for offset, _ in loader.sampler.batch_items(k)]
            for mean, offset in zip(batch.mean, offsets, strict=True):
                clip_id = latents.table.take([offset], columns=["clip_id"]).to_pylist()[0]["clip_id"]
                row = rows[clip_id]
                bucket = next(b for b in buckets.buckets if (b.num_frames, b.height, b.width) == mean.shape[1:])
                width, height, _ = CLIPS[_number(clip_id)]
                assert buckets.buckets[buckets.fit(width, height, row["num_frames"], row["fps"])[0]] == bucket
                window = decode_row(row, STAGE, 1, bucket)[0]  # (T, H, W, 3) uint8
                np.testing.assert_allclose(mean, window.transpose(3, 0, 1, 2) / 127.5 - 1.0, atol=1e-6)
        assert len(shapes) >= 5
    again = LatentLoader(latents, STAGE, 1, 0, 0, 1, 2, prefetch_batches=0, buckets=buckets)
    assert [again.sampler.batch_items(k) for k in range(4)] == [loader.sampler.batch_items(k) for k in range(4)]
    again.close()
    with pytest.raises(DatasetError, match="curriculum stage 'video' was encoded as"):
        LatentLoader(latents, STAGE, 1, 0, 0, 1, 2)  # square reads of a bucketed cache
    with pytest.raises(DatasetError, match="curriculum stage 'video' was encoded as"):
        LatentLoader(latents, STAGE, 1, 0, 0, 1, 2, buckets=stage_buckets(BUCKETS, STAGE, 4))  # other shapes
    with pytest.raises(DatasetError, match="curriculum stage 'video' was encoded as"):
        check_buckets_supported(latents, _bucketed_config(str(out), "o", "buckets.max_aspect_error=0.3"))


@pytest.mark.slow
@pytest.mark.ray
def test_a_bucketed_run_on_two_ray_workers(table, ray_cluster, tmp_path):
    """`reelforge train`'s workflow with buckets, 2 CPU workers under DeepSpeed ZeRO-2: it trains to the end, the
    run's MLflow metrics count the clips that fit no bucket, and the samples and the export are non-square."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import run_train

    config = _bucketed_config(table.data_uri, str(tmp_path / "run"), "scaling.num_workers=2",
                              "model.overrides={depth: 1}", "checkpoint.every_steps=100", "tracking.log_every_steps=1",
                              "sampling.every_steps=0", "sampling.num_steps=2", "sampling.prompts=['a disk']",
                              "data_loading.prefetch_batches=1")
    summary = run_train(config)
    assert summary["step"] == 3 and summary["model_version"]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert metrics["buckets.video.unfit_aspect"] == 2 and metrics["buckets.video.unfit_frames"] == 2
    params = client.get_run(summary["run_id"]).data.params
    assert "16:9" in params["buckets.aspect_ratios"]
    from PIL import Image

    path = client.download_artifacts(summary["run_id"], "samples/final.gif", str(tmp_path))
    with Image.open(path) as gif:
        assert gif.size[0] > gif.size[1]  # the first ratio, 16:9 (24 x 44, upscaled for the UI)
    exported = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert exported["buckets"]["aspect_ratios"][0] == "16:9"
