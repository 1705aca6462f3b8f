"""The per-worker training loop: a DeepSpeed engine per worker, EMA, the curriculum, sharded checkpoints through
`ray.train.report`, resume, sample videos and metrics logged to MLflow from rank 0, and the final export."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.schedules import NoiseSchedule
from models.text_encoder import FrozenTextEncoder
from models.vdit import VDiT, vdit_config
from pipelines.config import load_config
from training.config import TrainConfig
from training.data import to_model_input, to_uint8
from training.distill import draw_round_timesteps, guided, step_grids, two_step_target

log = logging.getLogger("reelforge.train")

STATE_FILE = "train_state.json"
DS_TAG = "ds"
STAGING_PREFIX = "reelforge-ckpt-"


def deepspeed_config(config: TrainConfig, world_size: int, use_gpu: bool) -> dict:
    """The DeepSpeed config of a run. DeepSpeed's own schedulers give the LR warm-up and decay."""
    ds, optim = config.deepspeed, config.optim
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    warmup = max(1, optim.warmup_steps)
    total = max(config.total_steps, warmup + 1)
    if optim.decay == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {"total_num_steps": total, "warmup_num_steps": warmup,
                                                          "warmup_min_ratio": 0.0, "cos_min_ratio": optim.min_lr_ratio,
                                                          "warmup_type": "linear"}}
    elif optim.decay == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {"total_num_steps": total, "warmup_num_steps": warmup,
                                                         "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                                                         "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": warmup, "warmup_min_lr": 0.0,
                                                    "warmup_max_lr": optim.lr, "warmup_type": "linear"}}
    torch_adam = ds.torch_adam if ds.torch_adam is not None else not use_gpu
    return {
        "train_batch_size": ds.micro_batch_size * ds.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                                  "weight_decay": optim.weight_decay, "torch_adam": torch_adam}},
        "scheduler": scheduler,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class EMA:
    """Exponential moving average of the weights each rank holds: whole parameters under ZeRO 0-2, this rank's
    partition under ZeRO-3 (so the EMA is sharded exactly like the parameters and costs no communication)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters()]
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    @torch.no_grad()
    def update(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            s.lerp_(self._local(p).float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the model (for sampling and export)."""
        backup = [self._local(p).detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow, strict=True):
                    self._local(p).copy_(s)
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    self._local(p).copy_(b)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        mismatched = any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=False))
        if len(shadow) != len(self.shadow) or mismatched:
            raise ValueError("the EMA in the checkpoint does not match the model (different preset or ZeRO layout)")
        self.shadow = [s.float().clone() for s in shadow]


def state_bytes(engine) -> int:
    """Bytes this rank holds for parameters and optimizer state (fp32 master partitions, Adam moments): what ZeRO
    shards. Tensors are counted once by storage, so a partition that aliases a parameter is not counted twice."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    optimizer = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "bit16_groups_flat"):
        for t in getattr(optimizer, name, None) or []:
            add(t)
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        for value in state.values():
            add(value)
    return sum(seen.values())


def weights_fingerprint(engine, zero3: bool) -> float:
    """Sum of |w| over all parameters, in float64: equal before a checkpoint and after its restore. A collective
    under ZeRO-3 (each rank holds a partition), local otherwise."""
    total = torch.zeros(1, dtype=torch.float64)
    for p in engine.module.parameters():
        total += (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).double().abs().sum().cpu()
    if zero3 and dist.is_initialized():
        dist.all_reduce(total)
    return float(total)


def _staging_directory() -> tempfile.TemporaryDirectory:
    """Node-local folder a checkpoint is written to before `ray.train.report` persists it; named by the process id
    so that `sweep_stale_staging` can tell whose it is."""
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_staging(root: str | os.PathLike | None = None) -> list[Path]:
    """Removes the checkpoint staging folders of worker processes that died while saving. A worker killed by the OOM
    killer or a failure never runs its clean-up, and each such folder holds a whole checkpoint shard, so on a node that
    survives many restarts they would fill the disk. Folders of live processes (other runs on the node) are kept."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """Noise, timesteps and caption dropout are a function of (seed, step, rank, micro-step), so a resumed run
    draws the same noise as an uninterrupted one."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)


def _batches(shard, batch_size: int, prefetch: int):
    """Endless micro-batches of one curriculum stage: epochs of this worker's dataset shard."""
    def collate(batch: dict) -> tuple[torch.Tensor, list[str]]:
        return to_model_input(batch["video"]), [str(c) for c in batch["caption"]]

    while True:
        produced = False
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch,
                                              collate_fn=collate, local_shuffle_buffer_size=4 * batch_size):
            produced = True
            yield batch
        if not produced:
            raise ValueError(f"a worker's shard of the curated data holds fewer than {batch_size} clips: lower "
                             "deepspeed.micro_batch_size or scaling.num_workers, or curate more videos")


class _Tracker:
    """MLflow logging from rank 0; a no-op elsewhere. One run, created by the driver, across restarts."""

    def __init__(self, rank: int, uri: str | None, run_id: str | None):
        self.client = None
        self.run_id = run_id
        if rank == 0 and uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: str, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, path, artifact_path)


def _progress(output: str, record: dict) -> None:
    """A small progress file beside the run (step, loss, pid, ...) for people and tools watching a long run."""
    from curation.outputs import OutputDir

    with contextlib.suppress(OSError):
        OutputDir(output).write_bytes_atomic("progress.json", json.dumps(record).encode())


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    config = load_config(TrainConfig, base=loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.scaling.threads_per_worker)
    use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", context.get_local_rank()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    stale = sweep_stale_staging()
    if stale:
        log.warning("removed %d checkpoint staging folder(s) left by dead workers: %s", len(stale),
                    ", ".join(p.name for p in stale))
    torch.manual_seed(config.seed)  # identical initial weights (and random text tower) on every rank and restart

    distill = loop_config.get("distill")  # a progressive-distillation round: see training/distill.py
    if distill:
        from training.export import load_model

        # The student starts as a copy of its teacher; the teacher (frozen, outside DeepSpeed) gives the targets.
        loaded = load_model(distill["teacher"], device=str(device))
        teacher = loaded.model.requires_grad_(False).eval()
        text_encoder, schedule, model_config = loaded.text_encoder, loaded.schedule, teacher.config
        model = VDiT(model_config)
        model.load_state_dict(teacher.state_dict())
    else:
        model_config = vdit_config(config.model.preset, **config.model.overrides)
        text_encoder = FrozenTextEncoder(config.text).to(device)
        if text_encoder.width != model_config.context_dim:
            model_config.context_dim = text_encoder.width
        model = VDiT(model_config)
        schedule = NoiseSchedule(config.schedule)
    ds_config = deepspeed_config(config, world, use_gpu)
    engine, _, _, lr_scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                      config=ds_config)
    dtype = torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32
    ema = EMA(engine.module, config.ema_decay)
    zero3 = config.deepspeed.zero_stage == 3
    ema_file = f"ema-rank{rank:05d}.pt" if zero3 else "ema.pt"

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            ema.load_state_dict(torch.load(Path(directory) / ema_file, map_location="cpu"))
            step = json.loads((Path(directory) / STATE_FILE).read_text())["step"]
        restored = weights_fingerprint(engine, zero3)
        if rank == 0:
            log.info("resumed from a checkpoint at step %d (weights fingerprint %.6f)", step, restored)

    resumed_at = step
    tracker = _Tracker(rank, loop_config.get("tracking_uri"), loop_config.get("run_id"))
    if checkpoint:
        tracker.metrics({"resumed_weights_fingerprint": restored}, step)
    output = loop_config["output"]

    def save(metrics: dict) -> None:
        fingerprint = weights_fingerprint(engine, zero3)
        tracker.metrics({"weights_fingerprint": fingerprint}, step)
        with _staging_directory() as directory:
            engine.save_checkpoint(directory, tag=DS_TAG, client_state={"step": step})
            if zero3 or rank == 0:
                torch.save(ema.state_dict(), Path(directory) / ema_file)
            if rank == 0:
                state = {"step": step, "stage": config.stage_at(max(0, step - 1))[1].name, "world_size": world,
                         "zero_stage": config.deepspeed.zero_stage, "weights_fingerprint": fingerprint}
                (Path(directory) / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"step_{step:08d}")

    def sample_videos(tag: str) -> None:
        """Every rank runs the sampler (under ZeRO-3 the forward is a collective); rank 0 writes and logs."""
        from training.sample import generate, tile, write_gif, write_mp4

        s = config.sampling
        _, stage = config.stage_at(max(0, step - 1))
        engine.module.eval()
        with ema.swapped_in():
            videos = generate(engine.module, text_encoder, schedule, s.prompts, stage.num_frames, stage.size,
                              s.num_steps, s.cfg_scale, s.seed, model_config.in_channels, dtype, device)
        engine.module.train()
        if rank == 0 and tracker.client is not None:
            from training.metrics import prompt_adherence

            clips = to_uint8(videos)
            scores = prompt_adherence(clips, s.prompts)  # 0 scored when the prompts are not the sample dump's
            if scores["num_scored"]:
                tracker.metrics({f"samples_{k}": float(v) for k, v in scores.items() if k != "num_scored"}, step)
            frames = tile(clips)
            with tempfile.TemporaryDirectory() as directory:
                gif, mp4 = Path(directory) / f"{tag}.gif", Path(directory) / f"{tag}.mp4"
                write_gif(frames, gif, stage.fps)
                write_mp4(frames, mp4, stage.fps)
                (Path(directory) / "prompts.txt").write_text("\n".join(s.prompts) + "\n")
                for path in (gif, mp4, Path(directory) / "prompts.txt"):
                    tracker.artifact(str(path), "samples")

    if distill:
        grids = step_grids(schedule, distill["student_steps"])
        # the empty prompt's encoding is the same every step: once per run, for the teacher's guidance
        null_text = None
        if distill["cfg_scale"] != 1.0:
            null_context, null_mask = text_encoder([""] * config.deepspeed.micro_batch_size)
            null_text = (null_context.to(device).float(), null_mask.to(device))
    iterators: dict[int, object] = {}
    micro, accum = config.deepspeed.micro_batch_size, config.deepspeed.grad_accum
    window = {"loss": 0.0, "count": 0, "data_wait": 0.0, "step_time": 0.0, "steps": 0}
    engine.train()
    final_step = min(config.total_steps, config.stop_after_steps or config.total_steps)
    while step < final_step:
        stage_index, stage = config.stage_at(step)
        if stage_index not in iterators:
            shard = ray.train.get_dataset_shard(f"stage{stage_index}")
            iterators[stage_index] = _batches(shard, micro, config.data_loading.prefetch_batches)
            if rank == 0:
                log.info("curriculum stage %d (%s): %d frames at %g fps, %dx%d", stage_index, stage.name,
                         stage.num_frames, stage.fps, stage.size, stage.size)
        started = time.perf_counter()
        data_wait = 0.0
        for m in range(accum):
            t0 = time.perf_counter()
            video, captions = next(iterators[stage_index])
            data_wait += time.perf_counter() - t0
            g = _step_generator(config.seed, step, rank, m)
            drop = torch.rand(len(captions), generator=g) < config.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            x0 = video.to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.randint(0, config.schedule.num_train_timesteps, (x0.shape[0],), generator=g).to(device)
            text, mask = text_encoder(captions)
            if distill:
                target, t, x_t = _distill_batch(distill, teacher, null_text, schedule, x0, noise,
                                                text.to(device), mask.to(device), grids, g)
            else:
                x_t = schedule.add_noise(x0, noise, t)
                target = schedule.target(x0, noise, t)
            out = engine(x_t.to(dtype), t, text.to(device, dtype), mask.to(device))
            loss = F.mse_loss(out.float(), target.float())
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["count"] += 1
        ema.update()
        step += 1
        if step == resumed_at + 1:  # optimizer state exists after the first step
            mine = torch.tensor([state_bytes(engine) / 2**20], dtype=torch.float64)
            held = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
            if world > 1:
                dist.all_gather(held, mine)
            else:
                held = [mine]
            tracker.metrics({f"state_mib_rank{r}": float(v) for r, v in enumerate(held)}, step)
        window["data_wait"] += data_wait
        window["step_time"] += time.perf_counter() - started
        window["steps"] += 1

        log_now = step % config.tracking.log_every_steps == 0 or step == final_step
        if log_now:
            totals = torch.tensor([window["loss"], window["count"], window["data_wait"], window["step_time"]],
                                  dtype=torch.float64)
            if world > 1:
                dist.all_reduce(totals)  # every rank reaches this at the same steps
            loss_mean = float(totals[0] / totals[1])
            step_time = float(totals[3]) / (world * window["steps"])
            metrics = {
                "loss": loss_mean,
                "lr": float(lr_scheduler.get_last_lr()[0]) if lr_scheduler else config.optim.lr,
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "step_time_s": step_time,
                "data_wait_s": float(totals[2]) / (world * window["steps"]),
                "data_wait_fraction": float(totals[2] / totals[3]) if totals[3] > 0 else 0.0,
                "samples_per_s": micro * accum * world / step_time if step_time > 0 else 0.0,
                "curriculum_stage": stage_index,
            }
            tracker.metrics(metrics, step)
            if rank == 0:
                remaining = (config.total_steps - step) * step_time
                log.info("step %d/%d [%s] loss %.4f lr %.2e %.1f samples/s data wait %.0f%% eta %.0fs", step,
                         config.total_steps, stage.name, loss_mean, metrics["lr"], metrics["samples_per_s"],
                         100 * metrics["data_wait_fraction"], remaining)
                _progress(output, {"step": step, "total_steps": config.total_steps, "stage": stage.name,
                                   "loss": loss_mean, "pid": os.getpid(), "time": time.time()})
            window = dict.fromkeys(window, 0.0)
        if config.sampling.every_steps and step % config.sampling.every_steps == 0 and step < config.total_steps:
            sample_videos(f"step_{step:08d}")
        if step % config.checkpoint.every_steps == 0 or step == final_step:
            save({"step": step})

    if step > resumed_at:  # a rerun of a finished run only re-exports
        sample_videos("final")
    else:
        ray.train.report({"step": step})  # so the driver learns where the run stands
    extra = None
    if distill:
        extra = {"distilled_from": distill["teacher"], "round": distill["round"],
                 "teacher_steps": 2 * distill["student_steps"], "teacher_cfg_scale": distill["cfg_scale"],
                 "base_model": distill.get("base_model", distill["teacher"])}
    _export(engine, ema, text_encoder, model_config, config, rank, zero3, output, extra)


def _distill_batch(distill: dict, teacher, null_text: tuple[torch.Tensor, torch.Tensor] | None,
                   schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                   mask: torch.Tensor, grids, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target, t, x_t) of a distillation micro-batch: x0 noised at a student timestep, and the output that makes
    the student's one DDIM step match the teacher's two. The teacher runs in fp32 whatever the student's precision;
    `null_text` is the empty prompt's (context, mask) for guidance, None without it."""
    t, t_mid, t_prev = (v.to(x0.device) for v in draw_round_timesteps(*grids, x0.shape[0], g))
    x_t = schedule.add_noise(x0, noise, t)
    null_context, null_mask = null_text or (None, None)
    fn = guided(teacher, context.float(), mask, null_context, null_mask, distill["cfg_scale"])
    return two_step_target(fn, schedule, x_t, t, t_mid, t_prev), t, x_t


def _export(engine, ema: EMA, text_encoder, model_config, config: TrainConfig, rank: int, zero3: bool,
            output: str, extra: dict | None = None) -> None:
    """Consolidate the EMA weights (gathered from all ranks under ZeRO-3) and write `model/` from rank 0."""
    import deepspeed

    from training.export import save_model

    module = engine.module
    with ema.swapped_in():
        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if zero3 \
            else contextlib.nullcontext()
        with gather:
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 \
                else None
    if rank != 0:
        return
    import pyarrow.fs

    from curation.outputs import OutputDir

    with tempfile.TemporaryDirectory() as directory:
        save_model(directory, state, model_config, text_encoder, config.schedule,
                   {"preset": config.model.preset, "steps": config.total_steps,
                    "curriculum": [vars(s) for s in config.curriculum], "ema_decay": config.ema_decay,
                    "weights": "ema",
                    # how this model is meant to be sampled (evaluation reads it; a distilled student says 1.0)
                    "sampling": {"num_steps": config.sampling.num_steps, "cfg_scale": config.sampling.cfg_scale},
                    **(extra or {})})
        out = OutputDir(output)
        out.makedirs("model")
        pyarrow.fs.copy_files(directory, out.path("model"), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=out.fs)
    log.info("exported the EMA weights to %s/model", output.rstrip("/"))
