"""Training throughput of the VDiT on one device, all figures from one run: samples/s, tokens/s, model TFLOP/s, MFU
and peak memory of a plain PyTorch step and of the project's engine (training.engine.Engine: DeepSpeed ZeRO-2).

    python bench/train_gpu.py [--device cpu|cuda] [--presets VDiT-S/2,VDiT-B/2] [--shapes latent|shipped|all]
        [--steps 10] [--warmup 3] [--compile] [--peak-tflops 989] [--threads N] [--json OUT]
        [--zero-stage 2] [--zero-options JSON] [--variant LABEL] [--profile DIR]

The engine path runs ZeRO stage --zero-stage with --zero-options added to DeepSpeed's zero_optimization section (the
train config's deepspeed.zero_options); --variant labels such rows. --profile DIR writes torch.profiler's table of one
more step per row (the ops by self device time, or CPU time on the CPU) to DIR: where an engine's step goes.

Shapes: `latent` is 4 x 16 x 32 x 32 (a VAE latent of 16 frames at 256 px: 4,096 tokens a sample at patch 2; on the
CPU a tiny 4 x 4 x 16 x 16); `shipped` are the two curriculum stages of configs/train/vdit-s.yaml for its preset
(VDiT-S/2, CUDA only). FLOPs are counted, not estimated: torch.utils.flop_counter on one forward and backward of the
model on the meta device (see bench/README.md). Only torch and einops are needed for the plain path; the engine path
also needs deepspeed and the project's training config (open_clip) and is skipped with a note where they are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.vdit import VDiT, vdit_config  # noqa: E402

GPU_PRESETS = ["VDiT-S/2", "VDiT-B/2", "VDiT-L/2", "VDiT-XL/2"]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 without sparsity, by a substring of the device name
ROW_PREFIX = "TRAIN_GPU_ROW "


@dataclass(frozen=True)
class Shape:
    """One training input: clips of (channels, frames, size, size), `batch` of them per step."""

    name: str
    channels: int
    frames: int
    size: int
    batch: int
    grad_checkpointing: bool = False
    context_dim: int | None = None  # None: the preset's
    preset: str | None = None  # only this preset (a shipped config's)

    def tokens(self, patch_frames: int, patch_size: int) -> int:
        return (self.frames // patch_frames) * (self.size // patch_size) ** 2


LATENT = Shape("latent", channels=4, frames=16, size=32, batch=4)
LATENT_CPU = Shape("latent-tiny", channels=4, frames=4, size=16, batch=2)
# configs/train/vdit-s.yaml: its two curriculum stages at micro-batch 16 with grad checkpointing, text from ViT-L-14
# (768 wide); tests/test_bench_train_gpu.py keeps these equal to the YAML
SHIPPED = [
    Shape("vdit-s low-res", 3, 8, 64, 16, grad_checkpointing=True, context_dim=768, preset="VDiT-S/2"),
    Shape("vdit-s full", 3, 16, 128, 16, grad_checkpointing=True, context_dim=768, preset="VDiT-S/2"),
]


@dataclass
class Row:
    preset: str
    shape: str
    path: str
    batch: int
    tokens_per_sample: int
    flops_per_step: int = 0
    seconds_per_step: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_bytes: int | None = None
    real_over_plain: float | None = None
    note: str = ""
    variant: str = ""  # what the engine row ran beyond the defaults, e.g. "z0" or "z2+overlap"


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, FLOPs, memory


def make_model(preset: str, shape: Shape, device: torch.device) -> VDiT:
    overrides = {"in_channels": shape.channels, "grad_checkpointing": shape.grad_checkpointing}
    if shape.context_dim:
        overrides["context_dim"] = shape.context_dim
    torch.manual_seed(0)
    with device:  # built where it runs: on the meta device an XL/2 costs no memory and no init time
        return VDiT(vdit_config(preset, **overrides))


def make_batch(model: VDiT, shape: Shape, text_tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Noisy clips, timesteps, random text tokens with a padding mask (cross-attention runs masked, as in training)
    and a target."""
    g = torch.Generator().manual_seed(0)
    b = shape.batch
    x_t = torch.randn(b, shape.channels, shape.frames, shape.size, shape.size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, text_tokens, model.config.context_dim, generator=g)
    lengths = torch.randint(1, text_tokens + 1, (b, 1), generator=g)
    mask = torch.arange(text_tokens)[None] < lengths  # (B, L)
    target = torch.randn(x_t.shape, generator=g)
    return tuple(v.to(device) for v in (x_t, t, context, mask, target))


def count_flops(preset: str, shape: Shape, text_tokens: int) -> int:
    """FLOPs of one forward and backward of the model, counted on the meta device: no memory or time for any shape,
    attention counted as the matmuls it is (the CPU's fused kernel has no formula and would count 0, flash's backward
    would add its recomputation), and without grad checkpointing's recomputation: model FLOPs, not hardware FLOPs."""
    meta = torch.device("meta")
    model = make_model(preset, Shape(**{**asdict(shape), "grad_checkpointing": False}), meta)
    x_t, t, context, mask, target = make_batch(model, shape, text_tokens, meta)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(model(x_t, t, context, mask).float(), target).backward()
    return counter.get_total_flops()


def memory_now(device: torch.device) -> int:
    """Bytes in use: allocated by torch on a GPU, this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS")


def peak_memory(device: torch.device) -> int:
    """The high-water mark of memory_now since the process started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the peak in KiB (Linux, BSD)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# The two paths: each returns a step function with no host sync inside


def plain_step(model: VDiT, batch: tuple[torch.Tensor, ...], device: torch.device, grad_clip: float, spec: dict):
    """Plain PyTorch: bf16 autocast and fused AdamW on a GPU, fp32 on the CPU; the engine's gradient clipping."""
    x_t, t, context, mask, target = batch
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=cuda)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(x_t, t, context, mask)
        F.mse_loss(out.float(), target).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_step(model: VDiT, batch: tuple[torch.Tensor, ...], device: torch.device, grad_clip: float, spec: dict):
    """The project's path: training.engine.Engine (DeepSpeed ZeRO-2, bf16 on a GPU, fp32 on the CPU)."""
    from training.config import TrainConfig
    from training.engine import Engine

    init_single_process_group(device)
    cuda = device.type == "cuda"
    config = TrainConfig()
    config.deepspeed.zero_stage = spec["zero_stage"]
    config.deepspeed.zero_options = dict(spec["zero_options"])
    config.deepspeed.precision = "bf16" if cuda else "fp32"
    config.deepspeed.micro_batch_size = batch[0].shape[0]
    config.deepspeed.grad_accum = 1
    config.scaling.use_gpu = cuda
    config.optim.lr, config.optim.weight_decay, config.optim.grad_clip = 1e-4, 0.0, grad_clip
    engine = Engine(model, config, world_size=1, use_gpu=cuda)
    x_t, t, context, mask, target = batch

    def step() -> None:
        out = engine(x_t, t, context, mask)
        engine.backward(F.mse_loss(out.float(), target))
        engine.step()

    return step


def init_single_process_group(device: torch.device) -> None:
    """DeepSpeed wants torch.distributed: one process here, as the worker of a 1-worker Ray Train run."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def measure(row: Row, shape: Shape, device: torch.device, spec: dict) -> None:
    """Fill row with one path's figures. Runs in its own process (see run_row)."""
    if row.path == "real":
        try:
            import deepspeed  # noqa: F401

            import training.engine  # noqa: F401
        except ImportError as err:
            row.note = f"skipped: {err}"
            return
    baseline = memory_now(device)  # after the imports: what the row itself adds is measured
    model = make_model(row.preset, shape, device)
    batch = make_batch(model, shape, spec["text_tokens"], device)
    if spec["compile"]:
        model.compile_blocks()
    build = plain_step if row.path == "plain" else engine_step
    step = build(model, batch, device, grad_clip=1.0, spec=spec)
    for _ in range(spec["warmup"]):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / spec["steps"]
    row.peak_mem_bytes = peak_memory(device) - baseline
    row.seconds_per_step = seconds
    row.samples_per_s = shape.batch / seconds
    row.tokens_per_s = shape.batch * row.tokens_per_sample / seconds
    row.tflops = row.flops_per_step / seconds / 1e12
    if spec["peak_tflops"]:
        row.mfu = row.tflops / spec["peak_tflops"]
    if spec.get("profile"):
        profile_step(step, row, device, Path(spec["profile"]))


def profile_step(step, row: Row, device: torch.device, directory: Path) -> None:
    """torch.profiler over one more step, its ops by self time on the device (CPU time on the CPU), into a file."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    directory.mkdir(parents=True, exist_ok=True)
    name = "_".join(filter(None, [row.preset, row.shape, row.path, row.variant]))
    path = directory / f"profile_{''.join(c if c.isalnum() else '-' for c in name)}.txt"
    averages = prof.key_averages()
    path.write_text(averages.table(sort_by=key, row_limit=30) + "\n\nby CPU time:\n"
                    + averages.table(sort_by="cpu_time_total", row_limit=30))


def child(spec: dict) -> int:
    """One measurement in a fresh process: its own peak memory, nothing left by an earlier row (DeepSpeed keeps an
    engine alive through its gradient hooks), and a CUDA error or an out-of-memory ends this row only."""
    device = torch.device(spec["device"], 0) if spec["device"] == "cuda" else torch.device("cpu")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    row = Row(**spec["row"])
    try:
        measure(row, Shape(**spec["shape"]), device, spec)
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    print(ROW_PREFIX + json.dumps(asdict(row)), flush=True)
    return 0


def run_row(row: Row, shape: Shape, spec: dict, timeout: float) -> Row:
    """measure() in a child process; a row that fails or times out comes back with a note saying so."""
    spec = {**spec, "row": asdict(row), "shape": asdict(shape)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.note = f"timed out after {timeout:.0f} s"
        return row
    lines = [line for line in done.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        row.note = f"failed (exit {done.returncode}): {last[:160]}"
        return row
    return Row(**json.loads(lines[-1][len(ROW_PREFIX) :]))


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table(rows: list[Row]) -> str:
    lines = [
        "| preset | shape | path | batch | samples/s | tokens/s | TFLOP/s | MFU | peak mem | real/plain |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.samples_per_s is None:
            lines.append(f"| {r.preset} | {r.shape} | {path_label(r)} | {r.batch} | {r.note} | | | | | |")
            continue
        mfu = f"{100 * r.mfu:.1f} %" if r.mfu is not None else "n/a"
        ratio = f"{r.real_over_plain:.3f}" if r.real_over_plain is not None else ""
        lines.append(
            f"| {r.preset} | {r.shape} | {path_label(r)} | {r.batch} | {r.samples_per_s:.2f} | "
            f"{r.tokens_per_s:,.0f} | {r.tflops:.3g} | {mfu} | {gib(r.peak_mem_bytes)} | {ratio} |"
        )
    return "\n".join(lines)


def path_label(row: Row) -> str:
    return f"{row.path} [{row.variant}]" if row.variant else row.path


def gib(size: int | None) -> str:
    if size is None:
        return ""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def engine_variant(zero_stage: int, zero_options: dict) -> str:
    """The engine rows' label: empty for the defaults (ZeRO-2, nothing added), else the stage and the added keys."""
    if zero_stage == 2 and not zero_options:
        return ""
    return "+".join([f"z{zero_stage}", *(f"{k}={v}" for k, v in sorted(zero_options.items()))])


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--presets", help="comma-separated; default: VDiT-T/2 on the CPU, S/2 to XL/2 on CUDA")
    parser.add_argument("--shapes", choices=["latent", "shipped", "all"], default="latent")
    parser.add_argument("--shape-names", help="comma-separated: only these shapes (e.g. 'vdit-s full')")
    parser.add_argument("--latent-batch", type=int, help="clips a step at the latent shape (default 4; CPU 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed window")
    parser.add_argument("--compile", action="store_true", help="VDiT.compile_blocks() on both paths")
    parser.add_argument("--peak-tflops", type=float, help="for MFU; default by device name (H100/H200: 989)")
    parser.add_argument("--text-tokens", type=int, help="text tokens a clip (default 77; CPU 16)")
    parser.add_argument("--threads", type=int, help="CPU: torch intra-op threads (1 on a busy box: 10x faster)")
    parser.add_argument("--paths", default="plain,real", help="plain, real (the engine), or both")
    parser.add_argument("--row-timeout", type=float, default=600.0, help="seconds one measurement may take")
    parser.add_argument("--json", help="write the rows here too (rewritten after each row)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="the engine path's ZeRO stage")
    parser.add_argument("--zero-options", default="{}", help="JSON: more zero_optimization keys for the engine path")
    parser.add_argument("--variant", default="", help="a label for the engine rows (default: from the ZeRO settings)")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler table of one step per row here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, run by run_row
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    presets = args.presets.split(",") if args.presets else (GPU_PRESETS if cuda else ["VDiT-T/2"])
    latent = LATENT if cuda else LATENT_CPU
    if args.latent_batch:
        latent = Shape(**{**asdict(latent), "batch": args.latent_batch})
    shapes = [latent] if args.shapes in ("latent", "all") else []
    if args.shapes in ("shipped", "all"):
        if cuda:
            shapes += SHIPPED
        else:
            print("shipped shapes: CUDA only (16 clips of 16 x 128 x 128 pixels a step), left out on the CPU")
    if args.shape_names:
        shapes = [s for s in shapes if s.name in args.shape_names.split(",")]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    spec = {
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "peak_tflops": args.peak_tflops or device_peak_tflops(device),
        "text_tokens": args.text_tokens or (77 if cuda else 16),
        "threads": args.threads or (None if cuda else torch.get_num_threads()),
        "zero_stage": args.zero_stage,
        "zero_options": json.loads(args.zero_options),
        "profile": str(Path(args.profile).resolve()) if args.profile else None,
    }
    variant = args.variant or engine_variant(args.zero_stage, spec["zero_options"])
    report = {"device": name, "torch": torch.__version__, **spec, "rows": []}
    print(f"{name}, torch {torch.__version__}, peak {spec['peak_tflops'] or 'n/a'} TFLOP/s, {args.steps} timed steps")

    rows: list[Row] = []
    for shape in shapes:  # every preset at the latent shape first: a run cut short still has the MFU targets' rows
        for preset in presets:
            if shape.preset and shape.preset != preset:
                continue
            config = vdit_config(preset)
            tokens = shape.tokens(config.patch_frames, config.patch_size)
            flops = count_flops(preset, shape, spec["text_tokens"])
            plain = None
            for path in args.paths.split(","):
                row = Row(preset, shape.name, path, shape.batch, tokens, flops,
                          variant=variant if path == "real" else "")
                if path == "real" and importlib.util.find_spec("deepspeed") is None:
                    row.note = "skipped: No module named 'deepspeed'"  # without starting a process to learn it
                else:
                    row = run_row(row, shape, spec, args.row_timeout)
                if path == "plain":
                    plain = row
                elif plain and plain.samples_per_s and row.samples_per_s:
                    row.real_over_plain = row.samples_per_s / plain.samples_per_s
                if row.note.startswith("skipped") and not any(r.note.startswith("skipped") for r in rows):
                    print(f"engine path {row.note}")
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                if args.json:
                    report["rows"] = [asdict(r) for r in rows]
                    Path(args.json).write_text(json.dumps(report, indent=2))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
