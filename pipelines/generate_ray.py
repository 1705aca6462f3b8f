"""`reelforge generate --ray`: the pending prompts as a Ray Data job. Each actor of the pool loads the model once, on
the GPU Ray gives it (`--gpus-per-worker`) or the CPU, generates a batch and writes its files; the driver only counts.
Outputs go where a local run writes them, so --out must be a folder every worker sees (one machine, or a shared
filesystem); each video's noise comes from its own seed, so the files equal a local run's."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipelines.generate_batch import Job, Settings, generate_batch, load_generator

log = logging.getLogger("reelforge.generate")


class GenerateWorker:
    """A Ray Data actor: a batch of job rows in, the same rows' indices and generation seconds out."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded, self.codec = load_generator(settings)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [Job(int(i), str(p), int(s), [Path(f) for f in files])
                for i, p, s, files in zip(rows["index"], rows["prompt"], rows["seed"], rows["files"], strict=True)]
        elapsed = generate_batch(self.loaded, self.codec, self.settings, jobs)
        return {"index": rows["index"], "seconds": np.full(len(jobs), elapsed / len(jobs))}


def job_rows(jobs: list[Job]) -> list[dict]:
    return [{"index": j.index, "prompt": j.prompt, "seed": j.seed, "files": [str(f.resolve()) for f in j.files]}
            for j in jobs]


def generate_on_ray(settings: Settings, pending: list[Job], total: int, batch_size: int, workers: int,
                    gpus_per_worker: float, address: str | None = None) -> float:
    """Every pending job on the Ray cluster (`address`, else RAY_ADDRESS or a local one) in batches of `batch_size`
    on `workers` actors, with progress as batches finish; returns the workers' generation seconds summed over
    videos."""
    import ray

    from pipelines.cluster import join_ray

    join_ray(address)
    dataset = ray.data.from_items(job_rows(pending)).map_batches(
        GenerateWorker, fn_constructor_kwargs={"settings": settings}, batch_size=batch_size,
        concurrency=workers, num_gpus=gpus_per_worker, num_cpus=1)
    seconds, done, started = 0.0, total - len(pending), time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        seconds += float(batch["seconds"].sum())
        done += len(batch["index"])
        log.info("%d/%d videos done (%.1f s since the job started)", done, total, time.perf_counter() - started)
    return seconds

