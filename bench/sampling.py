"""Seconds per video of each way reelforge samples a model, all measured in one run against the teacher's DDIM 32 steps
with classifier-free guidance: the teacher with DDIM and with DPM-Solver++ (2M), students at 16/8/4 steps, and (CPU)
the denoiser under ONNX Runtime in fp32 and with int8 weights; (GPU) eager against torch.compile.

    python bench/sampling.py [--model DIR] [--repeats 3] [--threads N] [--json OUT]          # CPU, quickstart model
    python bench/sampling.py --device cuda --preset VDiT-B/2 --latent 16x5x32x32 [--compile default,reduce-overhead]

CPU: the quickstart's model (VDiT-T/2 on 3 x 4 x 16 x 16 pixels, the tiny text tower's 32 x 64 context), randomly
initialised unless --model names an exported model (the quickstart's train/model): time per video does not depend on
what the weights learned, and a student is the teacher's network sampled with fewer steps and no guidance.
GPU (--device cuda; --device cpu smoke-tests the same path): one video at a latent shape with the preset's network in
bf16, eager and under each torch.compile mode ("reduce-overhead" captures CUDA graphs). That mode needs only torch,
numpy, einops and the project's models/ package.

Every row runs models.guided_sampling.sample_guided, the loop `reelforge generate` and evaluation run, from encoded
prompts (text encoding, once per prompt, is left out) to the model's data; decoding and writing files are left out.
Each row is warmed up by one whole trajectory (compilation, CUDA graph capture, ONNX Runtime's first run), then timed
over --repeats trajectories: on the CPU in interleaved rounds (every row once per round, the fastest round kept, so a
shared machine's load falls on all rows alike), on a GPU row by row (each compile mode in turn), the median kept.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.guided_sampling import sample_guided  # noqa: E402
from models.schedules import NoiseSchedule, ScheduleConfig  # noqa: E402
from models.vdit import VDiT, vdit_config  # noqa: E402

CFG_SCALE = 3.0  # the quickstart teacher's guidance (configs/quickstart.yaml train.sampling.cfg_scale)


@dataclass(frozen=True)
class Sampling:
    name: str
    sampler: str
    steps: int
    cfg_scale: float

    @property
    def evaluations(self) -> int:
        """Network evaluations per video: guidance runs the conditional and unconditional halves (one batch of 2)."""
        return self.steps * (2 if self.cfg_scale != 1.0 else 1)


TEACHER = Sampling("teacher DDIM 32 + CFG", "ddim", 32, CFG_SCALE)
SAMPLINGS = [
    TEACHER,
    Sampling("teacher DPM-Solver++ 16 + CFG", "dpmpp-2m", 16, CFG_SCALE),
    Sampling("teacher DPM-Solver++ 8 + CFG", "dpmpp-2m", 8, CFG_SCALE),
    Sampling("student 16", "ddim", 16, 1.0),
    Sampling("student 8", "ddim", 8, 1.0),
    Sampling("student 4", "ddim", 4, 1.0),
]
ONNX_SAMPLINGS = [TEACHER, SAMPLINGS[-1]]  # the slowest and the fastest, through each ONNX graph


@dataclass(frozen=True)
class Shape:
    channels: int
    frames: int
    height: int
    width: int
    context_length: int
    context_dim: int


@dataclass
class Row:
    name: str
    backend: str
    sampler: str
    steps: int
    cfg_scale: float
    evaluations: int
    seconds_per_video: float
    speedup: float | None = None  # the reference row's seconds over this row's
    peak_mem_bytes: int | None = None
    note: str = ""


def parse_latent(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--latent {text!r}: expected CHANNELSxFRAMESxHEIGHTxWIDTH, e.g. 16x5x32x32")
    return tuple(int(p) for p in parts)


def encoded_prompts(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A prompt's and the empty prompt's text features: random, at the encoder's shape, with padding masks."""
    g = torch.Generator().manual_seed(0)
    context = torch.randn((2, shape.context_length, shape.context_dim), generator=g).to(device, dtype)
    mask = torch.arange(shape.context_length)[None] < torch.tensor([[12], [2]])  # 12 real tokens; SOT + EOT
    return context[:1], mask[:1].to(device), context[1:], mask[1:].to(device)


class Trajectory:
    """One row's sampling run on fixed inputs: `run()` samples one video and returns its wall seconds."""

    def __init__(self, denoiser, schedule: NoiseSchedule, sampling: Sampling, shape: Shape, device: torch.device,
                 dtype: torch.dtype, clip_x0: float | None):
        self.denoiser, self.schedule, self.sampling = denoiser, schedule, sampling
        self.device, self.dtype, self.clip_x0 = device, dtype, clip_x0
        self.prompts = encoded_prompts(shape, device, dtype)
        self.noise = torch.randn((1, shape.channels, shape.frames, shape.height, shape.width),
                                 generator=torch.Generator().manual_seed(1)).to(device)

    def run(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tick = time.perf_counter()
        s = self.sampling
        x = sample_guided(self.denoiser, self.schedule, self.noise.clone(), *self.prompts, s.steps, s.cfg_scale,
                          s.sampler, self.clip_x0, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - tick
        if not torch.isfinite(x).all():
            raise RuntimeError(f"{s.name}: the sample is not finite")
        return elapsed


def time_sampling(denoiser, schedule: NoiseSchedule, sampling: Sampling, shape: Shape, device: torch.device,
                  dtype: torch.dtype, repeats: int, clip_x0: float | None) -> float:
    """Median seconds of one video's trajectory over `repeats`, after one warm-up trajectory."""
    trajectory = Trajectory(denoiser, schedule, sampling, shape, device, dtype, clip_x0)
    trajectory.run()  # warm-up: compilation, graph capture, allocator and ONNX Runtime's first-run setup
    return statistics.median(trajectory.run() for _ in range(repeats))


def time_interleaved(trajectories: list[Trajectory], repeats: int) -> list[float]:
    """The fastest of `repeats` rounds per trajectory, every round running each trajectory once in turn (after one
    warm-up each), so load from other processes on a shared machine falls on every row alike."""
    for trajectory in trajectories:
        trajectory.run()
    best = [math.inf] * len(trajectories)
    for _ in range(repeats):
        for i, trajectory in enumerate(trajectories):
            best[i] = min(best[i], trajectory.run())
    return best


def save_partial(path: str | None, rows: list[Row]) -> None:
    """The rows so far, rewritten after each one: a run stopped at its time limit keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps({"partial": True, "rows": [asdict(r) for r in rows]}, indent=2))


def with_speedups(rows: list[Row]) -> list[Row]:
    """speedup of each row against the first row of the same backend family's reference (the eager/torch teacher)."""
    reference = rows[0].seconds_per_video
    for row in rows:
        row.speedup = reference / row.seconds_per_video
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the quickstart's model, PyTorch and ONNX Runtime


def quickstart_model(model_dir: str | None) -> tuple[VDiT, NoiseSchedule, Shape, str]:
    """The exported model at `model_dir`, or a random VDiT-T/2 built as configs/quickstart.yaml trains it."""
    if model_dir:
        from training.export import load_model

        loaded = load_model(model_dir)
        stage = (loaded.config.get("curriculum") or [{}])[-1]
        config = loaded.model.config
        shape = Shape(config.in_channels, int(stage["num_frames"]), int(stage["size"]), int(stage["size"]),
                      loaded.text_encoder.config.context_length, config.context_dim)
        return loaded.model, loaded.schedule, shape, f"exported model {model_dir}"
    torch.manual_seed(0)
    model = VDiT(vdit_config("VDiT-T/2")).eval()  # in_channels 3, context_dim 64: the tiny text tower's width
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction="v", logsnr_shift=-2.77))
    return model, schedule, Shape(3, 4, 16, 16, 32, 64), "random VDiT-T/2 at the quickstart's shapes"


def onnx_denoisers(model: VDiT, shape: Shape, directory: Path) -> dict[str, object]:
    """The model exported to ONNX (fp32) and its int8 copy, each as an OnnxDenoiser session."""
    from training.onnx_export import DenoiserShapes, OnnxDenoiser, export_denoiser, quantize_denoiser

    shapes = DenoiserShapes(**asdict(shape))
    fp32, int8 = directory / "denoiser.onnx", directory / "denoiser-int8.onnx"
    export_denoiser(model, fp32, shapes)
    quantize_denoiser(fp32, int8)
    return {"onnxruntime fp32": OnnxDenoiser(fp32), "onnxruntime int8": OnnxDenoiser(int8)}


def bench_cpu(args) -> tuple[list[Row], dict]:
    device = torch.device("cpu")
    model, schedule, shape, what = quickstart_model(args.model)
    jobs = [("torch fp32", model, sampling) for sampling in SAMPLINGS]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_onnx:
            for backend, denoiser in onnx_denoisers(model, shape, Path(tmp)).items():
                jobs += [(backend, denoiser, sampling) for sampling in ONNX_SAMPLINGS]
        trajectories = [Trajectory(denoiser, schedule, sampling, shape, device, torch.float32, 1.0)
                        for _, denoiser, sampling in jobs]
        seconds = time_interleaved(trajectories, args.repeats)
    rows = [Row(s.name, backend, s.sampler, s.steps, s.cfg_scale, s.evaluations, t)
            for (backend, _, s), t in zip(jobs, seconds, strict=True)]
    return with_speedups(rows), {"model": what, "shape": asdict(shape), "timing": "fastest of interleaved rounds"}


# ---------------------------------------------------------------------------------------------------------------------
# GPU: a preset at a latent shape, eager and compiled


def bench_preset(args) -> tuple[list[Row], dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    channels, frames, height, width = parse_latent(args.latent)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = VDiT(vdit_config(args.preset, in_channels=channels)).to(dtype).eval()
    shape = Shape(channels, frames, height, width, args.context_length, model.config.context_dim)
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction="v"))
    modes = [m for m in args.compile.split(",") if m and m != "none"]
    samplings = [s for s in SAMPLINGS if not args.samplings or s.name in args.samplings.split(";")]
    rows = []
    for mode in ["eager", *modes]:
        if mode == "eager":
            denoiser = model
        else:
            torch._dynamo.reset()
            # static shapes: the guided (batch 2) and unguided (batch 1) calls each get their own graph
            denoiser = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
        for sampling in samplings:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tick = time.perf_counter()
            try:
                seconds = time_sampling(denoiser, schedule, sampling, shape, device, dtype, args.repeats, None)
            except Exception as err:  # noqa: BLE001 - a failed compile mode is a row with its error, not a lost run
                print(f"{sampling.name} ({mode}): failed: {type(err).__name__}: {err}", flush=True)
                rows.append(Row(sampling.name, f"torch {mode}", sampling.sampler, sampling.steps, sampling.cfg_scale,
                                sampling.evaluations, float("nan"), note=f"failed: {type(err).__name__}"))
                continue
            warm = time.perf_counter() - tick - seconds * args.repeats
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            rows.append(Row(sampling.name, f"torch {mode}", sampling.sampler, sampling.steps, sampling.cfg_scale,
                            sampling.evaluations, seconds, peak_mem_bytes=peak,
                            note=f"warm-up {warm:.1f} s"))
            print(f"{sampling.name} ({mode}): {seconds:.4f} s/video (warm-up {warm:.1f} s)", flush=True)
            save_partial(args.json, rows)
    tokens = (frames // model.config.patch_frames) * (height // model.config.patch_size) * \
        (width // model.config.patch_size)
    info = {"model": f"random {args.preset} in {str(dtype).removeprefix('torch.')}", "shape": asdict(shape),
            "tokens": tokens, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    return with_speedups(rows), info


# ---------------------------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = ["| sampling | backend | evaluations | s/video | speedup | peak GiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = f"{r.peak_mem_bytes / 2**30:.2f}" if r.peak_mem_bytes else ""
        lines.append(f"| {r.name} | {r.backend} | {r.evaluations} | {r.seconds_per_video:.4g} | "
                     f"{r.speedup:.2f}x | {peak} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu (the quickstart model) unless --preset is given")
    parser.add_argument("--preset", default=None, help="a VDiT preset (VDiT-B/2) timed at --latent: the GPU mode")
    parser.add_argument("--latent", default="16x5x32x32", help="CHANNELSxFRAMESxHEIGHTxWIDTH for --preset")
    parser.add_argument("--context-length", type=int, default=77, help="text tokens for --preset")
    parser.add_argument("--compile", default="default,reduce-overhead",
                        help="torch.compile modes timed after eager for --preset (comma-separated; none: eager only)")
    parser.add_argument("--samplings", default="", help="only these rows for --preset (names joined by ';')")
    parser.add_argument("--model", default=None, help="CPU: an exported model folder instead of a random VDiT-T/2")
    parser.add_argument("--skip-onnx", action="store_true", help="CPU: leave out the ONNX Runtime rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset:
        args.device = args.device or "cuda"
        rows, info = bench_preset(args)
    else:
        if args.device not in (None, "cpu"):
            raise SystemExit("the quickstart model is timed on the CPU; give --preset for --device cuda")
        rows, info = bench_cpu(args)
    info.update(threads=torch.get_num_threads(), repeats=args.repeats, cfg_scale=CFG_SCALE)
    print(json.dumps(info))
    print(table(rows))
    result = {"info": info, "rows": [asdict(r) for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
