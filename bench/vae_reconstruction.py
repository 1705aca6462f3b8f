"""How far the causal VAE's held-out reconstruction gets on the sample dump, and how fast: the model, loss and
metrics of `reelforge train-vae` (models/causal_vae.py, training/vae/loss.py, training/vae/quality.py) in a plain
PyTorch loop over clips decoded once, so it runs where Ray, DeepSpeed and Lance are not installed (a GPU box).

    # decode the curated sample dump's clips once (train rows and the held-out rows train-vae holds out)
    python bench/vae_reconstruction.py decode --data runs/quickstart/curated --out clips.npz --frames 9 --size 32
    # train and print the held-out PSNR/SSIM curve (JSON lines; --device cuda on a GPU)
    python bench/vae_reconstruction.py train --clips clips.npz --preset CausalVAE-T-4x4x4 --minutes 5

It is a measurement of the model, not of the engine: `reelforge train-vae` is the way to train one for use."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.causal_vae import CausalVAE, causal_vae_config  # noqa: E402
from training.vae.config import VAELossConfig  # noqa: E402
from training.vae.loss import vae_loss  # noqa: E402
from training.vae.quality import psnr, ssim  # noqa: E402


def decode(args: argparse.Namespace) -> None:
    from training.config import CurriculumStage
    from training.data import decode_row
    from training.dataset import ClipTable
    from training.vae import heldout

    table = ClipTable.open(args.data)
    train, held = heldout.split(table, args.heldout)
    stage = CurriculumStage(name="bench", num_frames=args.frames, fps=args.fps, size=args.size)
    rows = {"train": train.rows, "heldout": held}
    clips = {}
    for name, indices in rows.items():
        out = []
        for start in range(0, len(indices), 64):
            for row in table.take(indices[start:start + 64]):
                out.extend(decode_row(row, stage, 1))
        clips[name] = np.stack(out)
    np.savez_compressed(args.out, **clips, data=table.data_uri, frames=args.frames, fps=args.fps, size=args.size)
    print(json.dumps({"train": clips["train"].shape, "heldout": clips["heldout"].shape, "data": table.data_uri}))


def _to_input(videos: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(videos).to(device).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)


@torch.no_grad()
def _evaluate(model: CausalVAE, heldout: np.ndarray, device: torch.device) -> dict[str, float]:
    model.eval()
    outputs = []
    for start in range(0, len(heldout), 16):
        mean, _ = model.encode(_to_input(heldout[start:start + 16], device))
        video = (model.decode(mean).float().clamp(-1, 1) + 1) * 127.5
        outputs.append(video.round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy())
    model.train()
    reconstructions = np.concatenate(outputs)
    return {"psnr": float(psnr(heldout, reconstructions).mean()), "ssim": float(ssim(heldout, reconstructions).mean())}


def train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = np.load(args.clips)
    train_clips, heldout = data["train"], data["heldout"]
    model = CausalVAE(causal_vae_config(args.preset)).to(device)
    ema = CausalVAE(model.config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_config = VAELossConfig(args.reconstruction, args.kl_weight, args.gradient_weight)
    rng = np.random.default_rng(args.seed)
    started, step, budget = time.perf_counter(), 0, args.minutes * 60
    print(json.dumps({"step": 0, "seconds": 0.0, **_evaluate(model, heldout, device), "preset": args.preset,
                      "train_clips": len(train_clips), "heldout_clips": len(heldout), "device": str(device),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)
    while step < args.steps and time.perf_counter() - started < budget:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = _to_input(train_clips[rng.integers(0, len(train_clips), args.batch)], device)
        noise = torch.randn(model.latent_shape(tuple(x.shape)), device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            reconstruction, mean, logvar = model(x, noise)
        loss = vae_loss(x, reconstruction, mean, logvar, loss_config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1.0 - args.ema_decay)
        step += 1
        if step % args.every == 0:
            print(json.dumps({"step": step, "seconds": round(time.perf_counter() - started, 1),
                              "loss": float(loss.detach()), **_evaluate(ema, heldout, device)}), flush=True)
    print(json.dumps({"step": step, "seconds": round(time.perf_counter() - started, 1), "final": True,
                      **_evaluate(ema, heldout, device)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--heldout", type=int, default=16)  # = eval.heldout_clips of configs/train-vae.yaml
    d.add_argument("--frames", type=int, default=9)
    d.add_argument("--fps", type=float, default=8.0)
    d.add_argument("--size", type=int, default=32)
    d.set_defaults(func=decode)
    t = sub.add_parser("train")
    t.add_argument("--clips", required=True)
    t.add_argument("--preset", default="CausalVAE-T-4x4x4")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--steps", type=int, default=1_000_000)
    t.add_argument("--minutes", type=float, default=5.0)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--reconstruction", default="l1")
    t.add_argument("--kl-weight", type=float, default=1e-6)
    t.add_argument("--gradient-weight", type=float, default=0.0)
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--every", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=train)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
