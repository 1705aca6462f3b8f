"""Training overhead benchmark, all figures from one run on this machine:

1. steps per second of the full path (Ray Train + DeepSpeed, one worker, data read from the curated shards table by
   training.dataset.StageLoader) against a plain PyTorch loop on the same model, batch shape, optimizer and thread
   count, with its batches already in memory (target: at most 15% overhead);
2. the time workers wait for data, as a fraction of step time (target: under 10%);
3. per-rank memory of parameters plus optimizer state under ZeRO-0, 1, 2 and 3 with 2 workers (ZeRO-3 should be
   near half of ZeRO-0), as counted by training.engine.Engine.state_bytes after the first optimizer step.

    python bench/train_overhead.py [--steps 60] [--json out.json]

It curates the sample dump first (under --workdir) when no --data is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _curated(workdir: Path) -> str:
    from curation.config import CurateConfig
    from curation.dataset import CuratedDataset
    from curation.sample_dump import make_sample_dump
    from pipelines.config import load_config
    from pipelines.curate import run_curate

    out = workdir / "curated"
    dataset = CuratedDataset(str(out))
    if not dataset.exists() or dataset.latest() is None:  # an unfinished version is finished by the rerun
        make_sample_dump(workdir / "dump")
        run_curate(load_config(CurateConfig, None, ["tracking.enabled=false"],
                               base={"input": str(workdir / "dump"), "output": str(out)}))
    return str(out)


def _train_config(data: str, output: str, steps: int, zero: int, workers: int, sets: list[str]):
    from pipelines.config import load_config
    from training.config import TrainConfig

    overrides = [f"curriculum=[{{name: bench, steps: {steps}, num_frames: 8, fps: 8.0, size: 32}}]",
                 f"deepspeed.zero_stage={zero}", f"scaling.num_workers={workers}", "sampling.every_steps=0",
                 "sampling.num_steps=2", f"checkpoint.every_steps={steps}", "tracking.log_every_steps=1",
                 "deepspeed.micro_batch_size=4", *sets]
    return load_config(TrainConfig, None, overrides, base={"data": data, "output": output})


def _history(summary: dict, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    return {m.step: m.value for m in client.get_metric_history(summary["run_id"], key)}


def plain_loop(config, steps: int, warmup: int) -> float:
    """Seconds per step of a plain PyTorch loop: same model, batch shape, objective, AdamW, clipping, EMA, threads."""
    import torch
    import torch.nn.functional as F

    from models.schedules import NoiseSchedule
    from models.text_encoder import FrozenTextEncoder
    from models.vdit import VDiT, vdit_config
    from training.ema import EMA

    torch.set_num_threads(config.scaling.threads_per_worker)
    torch.manual_seed(0)
    text_encoder = FrozenTextEncoder(config.text)
    model_config = vdit_config(config.model.preset, **config.model.overrides)
    model_config.context_dim = text_encoder.width
    model = VDiT(model_config)
    ema = EMA.of_module(model, config.ema_decay)
    schedule = NoiseSchedule(config.schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas))
    stage = config.curriculum[0]
    b = config.deepspeed.micro_batch_size
    batches = [(torch.rand(b, 3, stage.num_frames, stage.size, stage.size) * 2 - 1,
                ["a red circle moving left on a blue background"] * b) for _ in range(4)]
    times = []
    for step in range(steps + warmup):
        start = time.perf_counter()
        x0, captions = batches[step % len(batches)]
        g = torch.Generator().manual_seed(step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, config.schedule.num_train_timesteps, (b,), generator=g)
        text, mask = text_encoder(captions)
        loss = F.mse_loss(model(schedule.add_noise(x0, noise, t), t, text, mask), schedule.target(x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        ema.update()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a curated dataset; default: curate the sample dump under --workdir")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timings")
    parser.add_argument("--zero-steps", type=int, default=3, help="steps of each ZeRO memory run")
    parser.add_argument("--set", action="append", default=[], help="extra train config overrides")
    parser.add_argument("--parts", default="overhead,zero", help="overhead (1+2), zero (3), or both")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    import ray


    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="reelforge-bench-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    data = args.data or _curated(workdir)

    parts = set(args.parts.split(","))
    figures: dict = {"steps": args.steps, "zero_state_mib_per_rank": {}}
    if "overhead" in parts:
        _overhead(args, data, workdir, figures)
    if "zero" in parts:
        _zero_memory(args, data, workdir, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ray.shutdown()
    return 0


def _overhead(args, data: str, workdir: Path, figures: dict) -> None:
    """1 + 2: one worker, full path, against the plain loop."""
    from pipelines.train import run_train

    config = _train_config(data, str(workdir / "train-1w"), args.steps + args.warmup, 2, 1, args.set)
    summary = run_train(config)
    step_times = _history(summary, "step_time_s")
    waits = _history(summary, "data_wait_s")
    timed = [s for s in step_times if s > args.warmup]
    ray_step = statistics.median(step_times[s] for s in timed)
    wait_fraction = sum(waits[s] for s in timed) / sum(step_times[s] for s in timed)
    plain_step = plain_loop(config, args.steps, args.warmup)
    figures.update({"ray_deepspeed_step_s": ray_step, "plain_pytorch_step_s": plain_step,
                    "overhead": ray_step / plain_step - 1.0, "data_wait_fraction": wait_fraction})
    print(f"Ray Train + DeepSpeed (1 worker): {1 / ray_step:.2f} steps/s; plain PyTorch: {1 / plain_step:.2f} "
          f"steps/s; overhead {100 * figures['overhead']:+.1f}% (target <= 15%)")
    print(f"data wait: {100 * wait_fraction:.1f}% of step time (target < 10%)")



def _zero_memory(args, data: str, workdir: Path, figures: dict) -> None:
    """3: per-rank state memory under each ZeRO stage with 2 workers."""
    from pipelines.train import run_train

    for zero in (0, 1, 2, 3):
        summary = run_train(_train_config(data, str(workdir / f"zero{zero}"), args.zero_steps, zero, 2, args.set))
        per_rank = {rank: _history(summary, f"state_mib_rank{rank}").get(1) for rank in (0, 1)}
        figures["zero_state_mib_per_rank"][zero] = per_rank
        print(f"ZeRO-{zero}: parameters + optimizer state per rank: "
              + ", ".join(f"rank {r}: {v:.2f} MiB" for r, v in per_rank.items()))
    zero0 = figures["zero_state_mib_per_rank"][0][0]
    zero3 = figures["zero_state_mib_per_rank"][3][0]
    figures["zero3_over_zero0"] = zero3 / zero0
    print(f"ZeRO-3 / ZeRO-0 per-rank state: {zero3 / zero0:.2f} (target near 0.5)")


if __name__ == "__main__":
    sys.exit(main())
