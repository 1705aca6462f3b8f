"""Encode throughput of the video VAE codecs (models/video_vae.py): clips per second per worker and peak memory per
clip, each row in its own process so its memory peak and time limit are its own.

    python bench/vae_encode.py --device cpu --tiny [--json OUT]
    python bench/vae_encode.py --device cuda [--dtype bfloat16] [--row-timeout 240] [--json OUT]

`--tiny`: the four diffusers classes (Wan, CogVideoX, HunyuanVideo, LTX) from tiny configs at 17 x 64 x 64 (LTX
17 x 128 x 128), untiled and tiled. Otherwise Wan 2.1's and CogVideoX-2b's VAEs built from their real configs (written
out below) at 17 x 256 x 256 and 17 x 512 x 512 with tiling, plus 17 x 512 x 512 untiled for what tiling saves. Weights
are RANDOM (nothing can be downloaded here): speed and memory are those of the real architectures, the latents mean
nothing. Each VAE is saved with save_pretrained and loaded back through models.codec.build_codec, so the figures are
the codec's as training and `reelforge encode` use it (uint8 in, normalised latents out, host to device included).

Imports only torch, diffusers and the project's models/ package: it runs on a bare GPU machine without the reelforge
environment. One JSON line per row on stdout; `--json OUT` writes them all (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROW_PREFIX = "VAE_ENCODE_ROW "

# Wan 2.1's VAE (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, vae/config.json): AutoencoderKLWan's defaults, written out.
WAN21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)
# CogVideoX-2b's VAE (THUDM/CogVideoX-2b, vae/config.json).
COGVIDEOX_2B = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 512], latent_channels=16,
                    layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32,
                    temporal_compression_ratio=4, sample_height=480, sample_width=720, scaling_factor=1.15258426,
                    use_quant_conv=False, use_post_quant_conv=False,
                    down_block_types=["CogVideoXDownBlock3D"] * 4, up_block_types=["CogVideoXUpBlock3D"] * 4)
TINY = {
    "AutoencoderKLWan": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    "AutoencoderKLCogVideoX": dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1,
                                   norm_num_groups=4, sample_height=64, sample_width=64),
    "AutoencoderKLHunyuanVideo": dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1,
                                      norm_num_groups=4),
    "AutoencoderKLLTXVideo": dict(block_out_channels=(8, 16, 16, 16), decoder_block_out_channels=(8, 16, 16, 16),
                                  latent_channels=4, layers_per_block=(1, 1, 1, 1, 1),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1)),
}


def planned_rows(tiny: bool, frames: int) -> list[dict]:
    """Each row: a VAE (class and config), a clip size and tiling (tile_size None: the class's default tiles)."""
    if tiny:
        rows = []
        for cls, config in TINY.items():
            size = 128 if cls == "AutoencoderKLLTXVideo" else 64
            for tiling in (False, True):
                rows.append({"name": f"tiny-{cls[len('AutoencoderKL'):].lower()}", "vae_class": cls,
                             "vae_config": config, "frames": frames, "size": size, "tiling": tiling,
                             "tile_size": size // 2 if tiling else None})
        return rows
    rows = []
    for name, cls, config in (("wan2.1", "AutoencoderKLWan", WAN21),
                              ("cogvideox-2b", "AutoencoderKLCogVideoX", COGVIDEOX_2B)):
        for size, tiling in ((256, True), (512, True), (512, False)):
            rows.append({"name": name, "vae_class": cls, "vae_config": config, "frames": frames, "size": size,
                         "tiling": tiling, "tile_size": None})
    return rows


# ---------------------------------------------------------------- one row, in a child process


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_row(row: dict, device: str, dtype: str, batch: int, repeats: int) -> dict:
    import diffusers
    import numpy as np
    import torch

    from models.codec import CodecConfig, build_codec

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="vae-encode-") as folder:
        t0 = time.perf_counter()
        with torch.device(device if cuda else "cpu"):  # random init where it is fast
            vae = getattr(diffusers, row["vae_class"])(**row["vae_config"])
        params = sum(p.numel() for p in vae.parameters())
        vae.save_pretrained(folder)
        del vae
        codec = build_codec(CodecConfig(kind="diffusers", model=folder, vae_class=row["vae_class"], dtype=dtype,
                                        device=device, tiling=row["tiling"], tile_size=row["tile_size"]))
        build_s = time.perf_counter() - t0
    video = np.random.default_rng(0).integers(0, 256, (batch, row["frames"], row["size"], row["size"], 3),
                                              dtype=np.uint8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loaded_rss = _rss_mib()
    latents = codec.encode(video)  # warm-up (cuDNN autotuning, allocator)
    sync()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        latents = codec.encode(video)
    sync()
    seconds = (time.perf_counter() - t0) / repeats
    cpu_seconds = (time.process_time() - cpu0) / repeats  # below seconds * threads: the machine was shared
    out = {"status": "ok", "params_m": round(params / 1e6, 2), "latent_shape": list(latents.shape[1:]),
           "tiles": bool(codec.vae.use_tiling), "build_s": round(build_s, 2), "encode_s": round(seconds, 4),
           "encode_cpu_s": round(cpu_seconds, 4),
           "clips_per_s": round(batch / seconds, 4)}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(weights_mib=round(loaded / 2**20, 1), peak_mib=round(peak / 2**20, 1),
                   peak_per_clip_mib=round((peak - loaded) / batch / 2**20, 1),
                   gpu=torch.cuda.get_device_name(), memory_counter="torch.cuda.max_memory_allocated")
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out.update(loaded_rss_mib=round(loaded_rss, 1), peak_rss_mib=round(peak_rss, 1),
                   peak_per_clip_mib=round(max(0.0, peak_rss - loaded_rss) / batch, 1),
                   threads=torch.get_num_threads(), memory_counter="ru_maxrss above RSS once loaded")
    return out


# ---------------------------------------------------------------- the parent: rows, limits, output


def run_in_child(row: dict, args) -> dict:
    spec = json.dumps(row)
    command = [sys.executable, str(Path(__file__).resolve()), "--row", spec, "--device", args.device, "--dtype",
               args.dtype, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.row_timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"failed (exit {done.returncode}): {tail[:300]}"}


def _versions() -> dict:
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the four classes (CPU smoke test)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bfloat16 on cuda, "
                                                      "float32 on cpu)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (1 + 8k fits every class)")
    parser.add_argument("--batch", type=int, default=1, help="clips per encode call")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes after one warm-up")
    parser.add_argument("--models", default="", help="comma-separated row names to keep (e.g. wan2.1)")
    parser.add_argument("--row-timeout", type=float, default=300.0, help="seconds per row, build included")
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    if args.row:
        result = run_row(json.loads(args.row), args.device, args.dtype, args.batch, args.repeats)
        print(ROW_PREFIX + json.dumps(result), flush=True)
        return 0

    rows = planned_rows(args.tiny, args.frames)
    if args.models:
        keep = set(args.models.split(","))
        rows = [r for r in rows if r["name"] in keep]
    environment = {**_versions(), "load_average": os.getloadavg()[0], "cpus": os.cpu_count(), "device": args.device,
                   "dtype": args.dtype, "batch": args.batch,
                   "repeats": args.repeats, "weights": "random (architecture only: latents mean nothing)"}
    print(json.dumps({"environment": environment}), flush=True)
    results = []
    for row in rows:
        figures = run_in_child(row, args)
        line = {"model": row["name"], "vae_class": row["vae_class"], "clip": f"{row['frames']}x{row['size']}x"
                f"{row['size']}", "tiling": row["tiling"], "tile_size": row["tile_size"], "dtype": args.dtype,
                "device": args.device, "batch": args.batch, **figures}
        print(json.dumps(line), flush=True)
        results.append(line)
        if args.json:
            Path(args.json).write_text(json.dumps({"environment": environment, "rows": results}, indent=1))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
