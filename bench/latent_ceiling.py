"""What a VAE leaves of the prompt: prompt adherence of real curated clips and of the same clips through a VAE codec,
at several clip shapes. A latent model's videos are decoded through that VAE, so the reconstructions' adherence is
the ceiling of the latent model's (the pixel model's ceiling is the real clips' own).

    python bench/latent_ceiling.py --data runs/quickstart/curated --vae runs/vae/vae [--clips 48] \
        [--shape 5x2x32 --shape 5x4x32]   # frames x fps x size
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from models.codec import CodecConfig, build_codec
from training.evaluate import VideoFormat, load_real_clips
from training.metrics import prompt_adherence

KEYS = ("color_accuracy", "direction_accuracy", "background_accuracy")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a curated dataset of the sample dump (captions it can score)")
    parser.add_argument("--vae", required=True, help="the vae/ folder of `reelforge train-vae`")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--shape", action="append", help="FRAMESxFPSxSIZE (default 5x1x32, 5x2x32, 9x2x32, 5x4x32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec = build_codec(CodecConfig(kind="reelforge-vae", model=args.vae))
    print(f"codec {codec.id}; {args.clips} clips of {args.data}")
    print("frames fps size | real colour/direction/background | through the VAE colour/direction/background | PSNR")
    for shape in args.shape or ["5x1x32", "5x2x32", "9x2x32", "5x4x32"]:
        frames, fps, size = shape.split("x")
        real = load_real_clips(args.data, VideoFormat(int(frames), int(size), float(fps)), args.clips)
        with torch.no_grad():
            rebuilt = codec.decode(codec.encode(real.videos))
        a, b = prompt_adherence(real.videos, real.captions), prompt_adherence(rebuilt, real.captions)
        print(f"{frames} {fps} {size} | {' '.join(f'{a[k]:.2f}' for k in KEYS)} | "
              f"{' '.join(f'{b[k]:.2f}' for k in KEYS)} | {psnr(rebuilt, real.videos):.1f} dB "
              f"({a['num_scored']} scored)", flush=True)


if __name__ == "__main__":
    main()
