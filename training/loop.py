"""The per-worker training loop, top to bottom like DiT's train.py: build the model and its objective, restore, then
step, log, sample and save until the curriculum ends or a stop is requested, and export the EMA weights."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.codec import PixelCodec, build_codec
from models.schedules import NoiseSchedule
from models.text_encoder import FrozenTextEncoder
from models.vdit import VDiT, VDiTConfig
from training.buckets import BucketSampler, sample_shape, stage_buckets
from training.checkpoint import Checkpointer, sweep_stale_staging
from training.config import TrainConfig
from training.dataset import ClipTable, StageLoader
from training.ema import EMA
from training.engine import Engine, all_reduce_host
from training.latent_dataset import CachedInputs, LatentLoader, LatentTable, open_training_data
from training.objective import DiffusionObjective, DistillationObjective, DistillRound
from training.preemption import StopWatcher
from training.sample import SampleLogger
from training.stage_data import StageData, open_frame_loader, plan_stages, subset_view
from training.tracker import WorkerTracker

log = logging.getLogger("reelforge.train")


@dataclass
class TrainJob:
    """What the driver hands every worker."""

    config: TrainConfig
    tracking_uri: str | None = None
    run_id: str | None = None
    distill: DistillRound | None = None  # None: plain diffusion training
    # What the run trains: None is DiffusionTask (diffusion, or a distillation round with `distill`); another task
    # class with the same methods (training/vae/task.py: the video autoencoder) reuses this loop and its engine.
    task: type | None = None
    # What each curriculum stage reads, resolved by the driver (training/stage_data.plan_stages); None: resolved here
    stages: list[StageData] | None = None


@dataclass
class Built:
    model: VDiT
    model_config: VDiTConfig
    text_encoder: FrozenTextEncoder
    schedule: NoiseSchedule
    objective: DiffusionObjective | DistillationObjective


def build(job: TrainJob, codec: PixelCodec, device: torch.device) -> Built:
    """The model to train, its text encoder and schedule, and the objective: a fresh model for diffusion, or for a
    distillation round a student that starts as a copy of its frozen teacher."""
    config = job.config
    if job.distill is None:
        model_config = config.model_config()
        model_config.in_channels = codec.channels
        text_encoder = FrozenTextEncoder(config.text).to(device)
        model_config.context_dim = text_encoder.width
        schedule = NoiseSchedule(config.schedule)
        return Built(VDiT(model_config), model_config, text_encoder, schedule, DiffusionObjective(schedule))
    from training.export import load_model

    loaded = load_model(job.distill.teacher, device=str(device))
    teacher = loaded.model.requires_grad_(False).eval()
    model = VDiT(teacher.config)
    model.load_state_dict(teacher.state_dict())
    null_text = None
    if job.distill.cfg_scale != 1.0:  # the empty prompt's encoding, for the teacher's guidance: once per run
        null_context, null_mask = loaded.text_encoder([""] * config.deepspeed.micro_batch_size)
        null_text = (null_context.to(device).float(), null_mask.to(device))
    objective = DistillationObjective(job.distill, teacher, loaded.schedule, null_text, loaded.codec.clip_range)
    return Built(model, teacher.config, loaded.text_encoder, loaded.schedule, objective)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Noise, timesteps and caption dropout are a function of (seed, step, rank, micro-step), so a resumed run
    draws the same noise as an uninterrupted one."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)


class CurriculumBatches:
    """Micro-batch m of optimizer step `step` for this rank: the stage's loader, over the stage's data (`stages`),
    at a position that depends only on (step, m), so a resumed run reads exactly the batches an uninterrupted one
    would, in whichever stage it resumes."""

    def __init__(self, table: ClipTable, config: TrainConfig, rank: int, world_size: int,
                 stages: list[StageData] | None = None, spatial_multiple: int = 1):
        self.table, self.config, self.rank, self.world_size = table, config, rank, world_size
        self.spatial_multiple = spatial_multiple  # buckets' sides are multiples of it (training/buckets.py)
        self.stages = stages or [StageData() for _ in config.curriculum]
        self.stage_index: int | None = None
        self.loader: StageLoader | None = None
        self.opened_at: int | None = None  # the step at which the current stage's loader was opened

    def batch(self, step: int, micro: int):
        """(video uint8, captions) from curated data; (LatentBatch, None) from a latent cache."""
        index, stage = self.config.stage_at(step)
        if index != self.stage_index:
            self.close()
            self.stage_index = index
            self.loader = self._loader(stage, self.stages[index], self.config.seed + index)
            self.opened_at = step
            if self.rank == 0 and isinstance(self.loader.sampler, BucketSampler):
                log.info("buckets: %s", self.loader.sampler.summary())
        start = sum(s.steps for s in self.config.curriculum[:index])
        k = (step - start) * self.config.deepspeed.grad_accum + micro
        return (self.loader.batch(k), None) if isinstance(self.table, LatentTable) else self.loader.batch(k)

    def _loader(self, stage, selection: StageData, seed: int):
        data, batch_size = self.config.data_loading, self.config.deepspeed.micro_batch_size
        if isinstance(self.table, LatentTable):
            return LatentLoader(self.table, stage, data.windows_per_clip, seed, self.rank, self.world_size,
                                batch_size, data.prefetch_batches,
                                stage_buckets(self.config.buckets, stage, self.spatial_multiple))
        if selection.source != "video":  # one frame per sample: curated keyframes or an image folder
            return open_frame_loader(self.table, stage, selection, self.config, seed, self.rank, self.world_size)
        return StageLoader(subset_view(self.table, selection), stage, data, seed, self.rank, self.world_size,
                           batch_size, cache_bytes=data.cache_mib * 2**20,
                           buckets=stage_buckets(self.config.buckets, stage, self.spatial_multiple))

    def opened_stage(self, step: int) -> dict[str, float] | None:
        """After optimizer step `step` (1-based): the metrics of the stage whose loader that step opened (its index,
        the items it samples from, its frames per sample), else None."""
        if self.opened_at != step - 1:
            return None
        index = self.stage_index
        metrics = {"stage_index": index, "stage_items": len(self.loader.sampler.items),
                   "stage_frames": self.config.curriculum[index].num_frames}
        if isinstance(self.loader.sampler, BucketSampler):  # clips per bucket, and those that fit none, by reason
            metrics |= self.loader.sampler.report()
        return metrics

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None


class DiffusionTask:
    """The parts of a run that are the diffusion model's: what is built (model, text tower, schedule, codec,
    objective), the loss of a micro-batch, sample videos, and the exported `model/` folder. The loop calls only
    these methods, so another task (the video autoencoder) plugs into the same loop, engine and checkpoints."""

    EXPORT_DIR = "model"  # what _export writes under the output and pipelines/train.py registers
    DESCRIPTION = "reelforge text-to-video diffusion models (VDiT)"

    def __init__(self, job: TrainJob, device: torch.device):
        self.job, self.config, self.device = job, job.config, device
        self.codec = build_codec(self.config.codec)
        self.built = build(job, self.codec, device)
        self.model = self.built.model
        self.samples: SampleLogger | None = None

    @staticmethod
    def registration_tags(config: TrainConfig) -> dict[str, str]:
        return {"preset": config.model.preset, "steps": str(config.total_steps),
                "sampling_steps": str(config.sampling.num_steps)}

    def training_table(self, table: ClipTable | LatentTable) -> ClipTable | LatentTable:
        """Chooses the step's inputs once, by what --data is: a latent cache gives x0 and the caption encodings
        (no decode, no text tower in the step); curated video is encoded in the step."""
        if isinstance(table, LatentTable):
            self.inputs = CachedInputs(table.null_text(), self.config.cfg_dropout, self.device)
        else:
            self.inputs = VideoInputs(self.built.text_encoder, self.codec, self.config.cfg_dropout, self.device)
        return table

    def attach(self, engine: Engine, tracker: WorkerTracker, step: int) -> None:
        """Called once the engine exists and the checkpoint (if any) is restored, at `step`."""
        if self.config.model.compile:
            engine.module.compile_blocks()
        self.samples = SampleLogger(self.config.sampling, self.built.text_encoder, self.built.schedule, self.codec,
                                    tracker, engine.dtype, self.device)

    def loss(self, engine: Engine, video, captions: list[str] | None, g: torch.Generator) -> torch.Tensor:
        x0, context_, mask = self.inputs(video, captions, g)
        noised = self.built.objective.noised(x0, context_, mask, g)
        out = engine(noised.x_t.to(engine.dtype), noised.t, context_.to(engine.dtype), mask)
        return F.mse_loss(out.float(), noised.target.float())

    def due(self, step: int) -> bool:
        return self.samples.due(step, self.config.total_steps)

    @property
    def spatial_multiple(self) -> int:
        """Pixels per token side: a bucket's height and width are multiples of it."""
        return self.built.model_config.patch_size * self.codec.space_compression

    def log_samples(self, engine: Engine, ema: EMA, step: int, tag: str) -> None:
        stage = self.config.stage_at(step - 1)[1]
        shape = sample_shape(self.config.buckets, stage, self.spatial_multiple)  # the stage's square without buckets
        self.samples.log(engine.module, ema, stage, tag, step, shape)

    def export(self, engine: Engine, ema: EMA, rank: int) -> None:
        _export(engine, ema, self.built, self.codec, self.config, rank, self.job.distill)


class VideoInputs:
    """The diffusion step's inputs from curated video: the captions (the empty prompt where dropped) through the
    text tower and the frames through the codec."""

    def __init__(self, text_encoder: FrozenTextEncoder, codec, cfg_dropout: float, device: torch.device):
        self.text_encoder, self.codec, self.cfg_dropout, self.device = text_encoder, codec, cfg_dropout, device

    def __call__(self, video, captions: list[str], g: torch.Generator) -> tuple[torch.Tensor, ...]:
        drop = torch.rand(len(captions), generator=g) < self.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        context_, mask = self.text_encoder(captions)
        return self.codec.encode(video).to(self.device), context_.to(self.device), mask.to(self.device)


class MetricsWindow:
    """Sums between two log steps. The loss stays a device tensor until the log step, so no step waits on the GPU."""

    def __init__(self):
        self.loss: torch.Tensor | float = 0.0
        self.count = self.steps = 0
        self.data_wait = self.step_time = 0.0

    def reduce(self, world_size: int) -> dict[str, float]:
        loss = self.loss.detach().double().cpu() if isinstance(self.loss, torch.Tensor) else torch.tensor(0.0)
        totals = torch.tensor([float(loss), self.count, self.data_wait, self.step_time], dtype=torch.float64)
        totals = all_reduce_host(totals)  # every rank reaches the log step at the same step
        step_time = float(totals[3]) / (world_size * self.steps)
        return {"loss": float(totals[0] / totals[1]), "step_time_s": step_time,
                "data_wait_s": float(totals[2]) / (world_size * self.steps),
                "data_wait_fraction": float(totals[2] / totals[3]) if totals[3] > 0 else 0.0}


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    job: TrainJob = loop_config["job"]
    config = job.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device(config, context.get_local_rank())
    stale = sweep_stale_staging()
    if stale:
        log.warning("removed %d checkpoint staging folder(s) left by dead workers: %s", len(stale),
                    ", ".join(p.name for p in stale))
    torch.manual_seed(config.seed)  # identical initial weights (and random text tower) on every rank and restart

    task = (job.task or DiffusionTask)(job, device)
    engine = Engine(task.model, config, world, device.type == "cuda")
    ema = EMA(engine.local_tensors(), config.ema_decay)
    table = task.training_table(open_training_data(config.data))
    checkpointer = Checkpointer(engine, ema, config, rank, world, table.version)
    tracker = WorkerTracker(rank, job.tracking_uri, job.run_id, config.output)
    step, restored = checkpointer.restore()
    if restored is not None:
        tracker.metrics({"resumed_weights_fingerprint": restored}, step)
    task.attach(engine, tracker, step)
    # buckets are the diffusion model's (pipelines/train.py refuses them for other tasks)
    batches = CurriculumBatches(table, config, rank, world, job.stages or plan_stages(config, table),
                                getattr(task, "spatial_multiple", 1))
    stop = StopWatcher(config.output, world)

    resumed_at, stopped = step, False
    final_step = min(config.total_steps, config.stop_after_steps or config.total_steps)
    window = MetricsWindow()
    engine.train()
    while step < final_step and not stopped:
        started = time.perf_counter()
        for micro in range(config.deepspeed.grad_accum):
            t0 = time.perf_counter()
            video, captions = batches.batch(step, micro)
            window.data_wait += time.perf_counter() - t0
            loss = task.loss(engine, video, captions, step_generator(config.seed, step, rank, micro))
            engine.backward(loss)
            engine.step()
            window.loss = window.loss + loss.detach()
            window.count += 1
        ema.update()
        step += 1
        window.steps += 1
        window.step_time += time.perf_counter() - started
        opened = batches.opened_stage(step)
        if opened is not None:  # what the stage reads, where it starts (again, on a resume within it)
            tracker.metrics(opened, step)
        if step == resumed_at + 1:  # optimizer state exists after the first step
            _log_state_sizes(engine, tracker, world, step)
        if step % config.tracking.log_every_steps == 0 or step == final_step:
            _log_window(window.reduce(world), engine, config, tracker, step, world)
            window = MetricsWindow()
        if task.due(step):
            task.log_samples(engine, ema, step, f"step_{step:08d}")
        stopped = stop.requested()
        if stopped or step % config.checkpoint.every_steps == 0 or step == final_step:
            checkpointer.save(step, {"step": step, "stopped": stopped})
        if stopped and rank == 0:
            log.warning("stop requested: saved a checkpoint at step %d; rerun the same command to continue", step)
    batches.close()
    if step == resumed_at:  # nothing to train (a rerun of a finished or stopped run): say where the run stands
        import ray.train

        ray.train.report({"step": step})
    if stopped or step < config.total_steps:  # checkpointed above; the rerun continues
        return
    if step > resumed_at:
        task.log_samples(engine, ema, step, "final")
    task.export(engine, ema, rank)


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    torch.set_num_threads(config.scaling.threads_per_worker)
    if config.scaling.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _log_state_sizes(engine: Engine, tracker: WorkerTracker, world: int, step: int) -> None:
    """MiB of parameters + optimizer state on each rank: what ZeRO's stage changes."""
    held = torch.zeros(world, dtype=torch.float64)
    held[dist.get_rank() if world > 1 else 0] = engine.state_bytes() / 2**20
    held = all_reduce_host(held)  # each rank fills its own slot
    tracker.metrics({f"state_mib_rank{r}": float(v) for r, v in enumerate(held)}, step)


def _log_window(metrics: dict, engine: Engine, config: TrainConfig, tracker: WorkerTracker, step: int,
                world: int) -> None:
    micro = config.deepspeed.micro_batch_size * config.deepspeed.grad_accum
    stage_index, stage = config.stage_at(step - 1)
    metrics |= {"lr": engine.lr(), "grad_norm": engine.grad_norm(), "curriculum_stage": stage_index,
                "samples_per_s": micro * world / metrics["step_time_s"] if metrics["step_time_s"] > 0 else 0.0}
    tracker.metrics(metrics, step)
    if tracker.rank == 0:
        remaining = (config.total_steps - step) * metrics["step_time_s"]
        log.info("step %d/%d [%s] loss %.4f lr %.2e %.1f samples/s data wait %.0f%% eta %.0fs", step,
                 config.total_steps, stage.name, metrics["loss"], metrics["lr"], metrics["samples_per_s"],
                 100 * metrics["data_wait_fraction"], remaining)
        tracker.progress({"step": step, "total_steps": config.total_steps, "stage": stage.name,
                          "loss": metrics["loss"], "pid": os.getpid(), "time": time.time()})


def _export(engine: Engine, ema: EMA, built: Built, codec: PixelCodec, config: TrainConfig, rank: int,
            distill: DistillRound | None) -> None:
    """Consolidate the EMA weights (gathered from all ranks under ZeRO-3) and write `model/` from rank 0."""
    with ema.swapped_in():
        state = engine.full_state_dict(rank)
    if rank != 0:
        return
    from training.export import save_model
    from training.publish import publish_model

    extra = {"preset": config.model.preset, "steps": config.total_steps, "codec": codec.id,
             "codec_config": codec.describe()["config"],  # training.export.load_model rebuilds the codec from it
             "curriculum": [vars(s) for s in config.curriculum], "ema_decay": config.ema_decay, "weights": "ema",
             "buckets": vars(config.buckets),  # the aspect ratios it trained on (none: squares)
             # how this model is meant to be sampled (evaluation reads it; a distilled student says 1.0)
             "sampling": {"num_steps": config.sampling.num_steps, "cfg_scale": config.sampling.cfg_scale},
             **(distill.export_info() if distill else {})}
    with tempfile.TemporaryDirectory() as directory:
        save_model(directory, state, built.model_config, built.text_encoder, built.schedule.config, extra)
        sha = publish_model(directory, config.output)  # whole, into models/<sha16>; model/ points at it
    log.info("exported the EMA weights to %s/model (models/%s)", config.output.rstrip("/"), sha[:16])
