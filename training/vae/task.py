"""What `reelforge train-vae` trains, as a task of the shared training loop (training/loop.py): the causal VAE, its
loss (reconstruction + KL), held-out PSNR/SSIM with side-by-side GIFs, and the exported `vae/` folder."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.causal_vae import WEIGHTS_FILE, CausalVAE
from training.data import decode_row, to_model_input, to_uint8
from training.dataset import ClipTable
from training.ema import EMA
from training.engine import Engine
from training.tracker import WorkerTracker
from training.vae import heldout
from training.vae.config import VAETrainConfig
from training.vae.loss import vae_loss
from training.vae.quality import psnr, side_by_side, ssim

log = logging.getLogger("reelforge.train")

INFO_FILE = "reelforge-vae.json"  # beside config.json and model.safetensors: the weights' sha256 and how they scored


@torch.no_grad()
def reconstruct(model: CausalVAE, videos_uint8: np.ndarray, device: torch.device, dtype: torch.dtype,
                batch: int = 4) -> tuple[np.ndarray, torch.Tensor]:
    """(B, T, H, W, 3) uint8 -> (their reconstructions from the latent mean, the latent means (B, C, T', H', W'))."""
    outputs, means = [], []
    for start in range(0, len(videos_uint8), batch):
        x = to_model_input(videos_uint8[start:start + batch]).to(device, dtype)
        mean, _ = model.encode(x)
        outputs.append(to_uint8(model.decode(mean).float()))
        means.append(mean.float().cpu())
    return np.concatenate(outputs), torch.cat(means)


class HeldOutClips:
    """The held-out clips decoded at a curriculum stage's frames, fps and size (once per stage); clips too short
    for the stage are left out and counted."""

    def __init__(self, table: ClipTable, rows: list[int]):
        self.table, self.rows = table, rows
        self._decoded: dict[str, np.ndarray] = {}

    def at(self, stage) -> np.ndarray:
        if stage.name not in self._decoded:
            clips = [c for row in self.table.take(self.rows) for c in decode_row(row, stage, 1)]
            if not clips:
                raise ValueError(f"none of the {len(self.rows)} held-out clips of {self.table.shown} has "
                                 f"{stage.num_frames} frames at {stage.fps:g} fps: raise eval.heldout_clips")
            self._decoded = {stage.name: np.stack(clips)}  # one stage at a time
        return self._decoded[stage.name]


class VAETask:
    """The causal VAE as a task of training/loop.py: the loop reads micro-batches, steps the engine, checkpoints,
    logs, and calls these methods for the model, its loss, its evaluation and its export."""

    EXPORT_DIR = "vae"
    DESCRIPTION = "reelforge causal 3D video autoencoders (CausalVAE)"

    def __init__(self, job, device: torch.device):
        self.config: VAETrainConfig = job.config
        self.device = device
        self.model = CausalVAE(self.config.vae.model_config())
        self.heldout: HeldOutClips | None = None
        self.tracker: WorkerTracker | None = None
        self.dtype = torch.float32
        self.last_scores: dict[str, float] = {}

    @staticmethod
    def registration_tags(config: VAETrainConfig) -> dict[str, str]:
        model = config.vae.model_config()
        return {"preset": config.vae.preset, "steps": str(config.total_steps),
                "latent_channels": str(model.latent_channels), "time_compression": str(model.time_compression),
                "space_compression": str(model.space_compression)}

    def training_table(self, table: ClipTable) -> heldout.RowSubset:
        train, held = heldout.split(table, self.config.eval.heldout_clips)
        self.heldout = HeldOutClips(table, held)
        return train

    def attach(self, engine: Engine, tracker: WorkerTracker, step: int) -> None:
        self.tracker, self.dtype = tracker, engine.dtype
        if step == 0:  # the untrained model's score: the baseline every later one is read against
            self._evaluate(engine.module, 0, "step_00000000")

    def loss(self, engine: Engine, video, captions: list[str], g: torch.Generator) -> torch.Tensor:
        x = to_model_input(video).to(self.device, engine.dtype)  # (B, 3, T, H, W) in [-1, 1]
        noise = torch.randn(self.model.latent_shape(tuple(x.shape)), generator=g)  # replayable on resume
        reconstruction, mean, logvar = engine(x, noise.to(self.device, engine.dtype))
        return vae_loss(x, reconstruction, mean, logvar, self.config.loss)

    def due(self, step: int) -> bool:
        every = self.config.eval.every_steps
        return bool(every) and step % every == 0 and step < self.config.total_steps

    def log_samples(self, engine: Engine, ema: EMA, step: int, tag: str) -> None:
        with ema.swapped_in():
            self._evaluate(engine.module, step, tag)

    def _evaluate(self, module: CausalVAE, step: int, tag: str) -> None:
        """Held-out PSNR, SSIM and KL of `module` (every rank runs it: ZeRO-3 gathers weights collectively) and,
        from rank 0, the metrics and a GIF of originals beside their reconstructions."""
        stage = self.config.stage_at(max(0, step - 1))[1]
        clips = self.heldout.at(stage)
        module.eval()
        reconstructions, means = reconstruct(module, clips, self.device, self.dtype)
        module.train()
        self.last_scores = {"heldout_psnr": float(psnr(clips, reconstructions).mean()),
                            "heldout_ssim": float(ssim(clips, reconstructions).mean()),
                            "heldout_latent_std": float(means.std()), "heldout_clips": float(len(clips))}
        self.tracker.metrics(self.last_scores, step)
        if self.tracker.rank == 0:
            log.info("step %d: held-out PSNR %.2f dB, SSIM %.4f (%d clips)", step, self.last_scores["heldout_psnr"],
                     self.last_scores["heldout_ssim"], len(clips))
        if self.tracker.client is not None and self.config.eval.gif_clips:
            from training.sample import write_gif

            n = self.config.eval.gif_clips
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / f"{tag}.gif"
                write_gif(side_by_side(clips[:n], reconstructions[:n]), path, stage.fps,
                          comment=f"original | reconstruction, step {step}")
                self.tracker.artifact(str(path), "reconstructions")

    def export(self, engine: Engine, ema: EMA, rank: int) -> None:
        """The EMA weights (gathered under ZeRO-3) saved with `save_pretrained` into OUTPUT/vae, with its latent
        scaling factor (1 / std of the held-out latent means) and INFO_FILE: the weights' sha256 and final scores."""
        with ema.swapped_in():
            state = engine.full_state_dict(rank)
            stage = self.config.stage_at(self.config.total_steps - 1)[1]
            _, means = reconstruct(engine.module, self.heldout.at(stage), self.device, self.dtype)
        if rank != 0:
            return
        import pyarrow.fs

        from curation.outputs import OutputDir
        from models.checksum import sha256_of

        model = CausalVAE(self.model.config)
        model.load_state_dict(state)
        model.config.scaling_factor = float(1.0 / means.std().clamp_min(1e-6))
        with tempfile.TemporaryDirectory() as directory:
            weights = model.save_pretrained(directory)
            info = {"weights": WEIGHTS_FILE, "sha256": sha256_of(weights), "preset": self.config.vae.preset,
                    "steps": self.config.total_steps, "weights_kind": "ema", "ema_decay": self.config.ema_decay,
                    "data": self.config.data, "scaling_factor": model.config.scaling_factor,
                    "heldout": {k.removeprefix("heldout_"): v for k, v in self.last_scores.items()}}
            (Path(directory) / INFO_FILE).write_text(json.dumps(info, indent=2))
            out = OutputDir(self.config.output)
            out.makedirs(self.EXPORT_DIR)
            pyarrow.fs.copy_files(directory, out.path(self.EXPORT_DIR),
                                  source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=out.fs)
        log.info("exported the EMA weights to %s/%s (sha256 %s)", self.config.output.rstrip("/"), self.EXPORT_DIR,
                 info["sha256"])
