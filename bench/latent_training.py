"""Training step time from a latent cache against from curated video, same model, same clips, one run.

    .venv/bin/python bench/latent_training.py [--clips 32] [--steps 20] [--text-model ViT-B-32] [--json OUT]

It writes a curated dataset of synthetic clips with the curation writer, encodes it into a latent cache with the
stages of `reelforge encode` (called in this process: the bench times training, not encoding), then times optimizer
steps of one VDiT on each source the way training/loop.py runs them: the curated path through StageLoader (decode
threads, prefetch) and VideoInputs (text tower and codec in the step), the cached path through LatentLoader and
CachedInputs (x0 drawn from the cached distribution, cached caption encodings). Per source: the median step
(data wait + inputs + forward/backward/AdamW), the data wait, and the inputs' own time in the step. Steps are
interleaved in rounds so a slow spell of a shared machine hits both. The decoded-clip cache of StageLoader is off: it
stands for a dataset larger than the workers' memory, where every epoch decodes again (with it on, epochs after the
first skip decoding but still run the text tower).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.config import CurateConfig, FilterConfig, ScoreFilter  # noqa: E402
from curation.dataset import CuratedDataset  # noqa: E402
from curation.writer import BatchCommitter, create_tables, finish_filters, tag_version  # noqa: E402
from models.codec import CodecConfig, build_codec  # noqa: E402
from models.schedules import NoiseSchedule, ScheduleConfig  # noqa: E402
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig  # noqa: E402
from models.vdit import VDiT, vdit_config  # noqa: E402
from training.config import CurriculumStage, DataConfig  # noqa: E402
from training.dataset import ClipTable, StageLoader  # noqa: E402
from training.latent_dataset import CachedInputs, LatentLoader, LatentTable  # noqa: E402
from training.loop import VideoInputs, step_generator  # noqa: E402
from training.objective import DiffusionObjective  # noqa: E402

KEEP_ALL = CurateConfig(filters=FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(), aesthetic=ScoreFilter(),
                                             caption_match=ScoreFilter()))


def _clip_bytes(seed: int, frames: int, width: int, height: int) -> bytes:
    """A moving noise texture: decodes at the cost of real footage of that size, not of a flat colour."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "23", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.ascontiguousarray(texture[:, i * 2 % width:i * 2 % width + width])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def write_curated(root: Path, clips: int, frames: int, width: int, height: int) -> None:
    dataset = CuratedDataset(str(root))
    create_tables(dataset)
    committer = BatchCommitter(dataset, 1, every=8)
    for n in range(clips):
        clip = {"clip_id": f"clip-{n:04d}", "video_id": f"video-{n}", "start_frame": 0, "end_frame": frames - 1,
                "start_s": 0.0, "end_s": frames / 24, "num_frames": frames,
                "caption": f"a textured surface sliding to the left, take {n}", "drop_reason": None,
                "width": width, "height": height, "video_bytes": _clip_bytes(n, frames, width, height)}
        committer.add({"video_id": f"video-{n}", "uri": f"/bench/{n}.mp4", "size_bytes": 1, "status": "ok",
                       "error_class": None, "error_message": None, "fps": 24.0, "width": width, "height": height,
                       "duration_s": frames / 24, "num_frames": frames, "clips": [clip]})
    committer.flush()
    written = finish_filters(dataset, KEEP_ALL, 1, [])
    tag_version(dataset, 1, {"dataset_version": 1, "counts": written.counts})


def encode_here(data: str, output: str, stage: CurriculumStage, text: TextEncoderConfig) -> float:
    """The cache as `reelforge encode` writes it, its stages called here; returns the seconds it took."""
    from pipelines.encode import EncodeCommitter, _null_text, identity, plan_encode
    from training.latent_cache import LatentCache
    from training.latent_dataset import cache_uri
    from training.latent_encode import ClipWindowsStage, CodecStage, EncodeConfig, TextStage

    config = EncodeConfig(data=f"{data}@v1", output=output, text=text, curriculum=[stage])
    started = time.perf_counter()
    ident = identity(config)
    cache = LatentCache(cache_uri(output))
    cache.claim(ident, output)
    cache.put_rows([_null_text(config, ident)])
    plan = plan_encode(config, CuratedDataset(data).open("shards", 1), cache)
    stages = [ClipWindowsStage(config.data, config.curriculum, 1), CodecStage(config.codec, config.dtype),
              TextStage(config.text, config.dtype, False)]
    committer = EncodeCommitter(cache, ident, plan.rows, 16)
    for stage in stages:
        stage.setup()
    for start in range(0, len(plan.pending), 8):
        batch = pa.Table.from_pylist(plan.pending[start:start + 8])
        for stage in stages:
            batch = stage(batch)
        for row in batch.to_pylist():
            committer.add(row)
    committer.flush()
    cache.tag(1, {"dataset_version": 1, "counts": {"encoded": committer.committed}, **ident})
    return time.perf_counter() - started


class Trainer:
    """One optimizer step as the loop runs it, minus DeepSpeed: inputs, noise, forward, MSE, backward, AdamW."""

    def __init__(self, model: VDiT, objective: DiffusionObjective):
        self.model, self.objective = model, objective
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self, inputs, batch, captions, g: torch.Generator) -> float:
        """Returns the seconds the step's inputs took (text tower and codec, or the draw from the cache)."""
        started = time.perf_counter()
        x0, context, mask = inputs(batch, captions, g)
        prepared = time.perf_counter() - started
        noised = self.objective.noised(x0, context, mask, g)
        loss = F.mse_loss(self.model(noised.x_t, noised.t, context, mask).float(), noised.target.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per source (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--source", default="256x144", help="WxH of the curated clips")
    parser.add_argument("--text-model", default="ViT-B-32",
                        help="open_clip text tower (random weights: only its cost matters here)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's threads_per_worker)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = map(int, args.source.split("x"))
    stage = CurriculumStage(name="bench", steps=args.steps, num_frames=args.frames, fps=8.0, size=args.size)
    text = TextEncoderConfig(model_name=args.text_model, context_length=32)
    with tempfile.TemporaryDirectory() as tmp:
        curated, latents = Path(tmp) / "curated", str(Path(tmp) / "latents")
        write_curated(curated, args.clips, 48, width, height)
        encode_s = encode_here(str(curated), latents, stage, text)
        results = run(args, stage, text, ClipTable.open(str(curated)), LatentTable.open(latents))
    results.update(encode_seconds=encode_s, encode_clips_per_s=args.clips / encode_s)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def run(args, stage: CurriculumStage, text: TextEncoderConfig, clips: ClipTable, latents: LatentTable) -> dict:
    torch.manual_seed(0)
    encoder = FrozenTextEncoder(text)
    codec = build_codec(CodecConfig())
    config = vdit_config("VDiT-T/2", in_channels=codec.channels, context_dim=encoder.width)
    objective = DiffusionObjective(NoiseSchedule(ScheduleConfig()))
    model = VDiT(config)
    trainers = {"curated": Trainer(model, objective), "cache": Trainer(VDiT(config), objective)}
    trainers["cache"].model.load_state_dict(model.state_dict())
    data = DataConfig(cache=False, prefetch_batches=2)
    sources = {
        "curated": (StageLoader(clips, stage, data, 0, 0, 1, args.batch),
                    VideoInputs(encoder, codec, 0.1, torch.device("cpu"))),
        "cache": (LatentLoader(latents, stage, 1, 0, 0, 1, args.batch, 2),
                  CachedInputs(latents.null_text(), 0.1, torch.device("cpu"))),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "wait": [], "inputs": []} for k in sources}
    for k in range(args.steps + 2):  # interleaved: step k of each source, back to back
        for name, (loader, inputs) in sources.items():
            started = time.perf_counter()
            batch = loader.batch(k)
            waited = time.perf_counter() - started
            batch, captions = (batch, None) if name == "cache" else batch
            prepared = trainers[name].step(inputs, batch, captions, step_generator(0, k, 0, 0))
            if k >= 2:
                times[name]["step"].append(time.perf_counter() - started)
                times[name]["wait"].append(waited)
                times[name]["inputs"].append(prepared)
    for loader, _ in sources.values():
        loader.close()
    out = {name: {"step_s": statistics.median(t["step"]), "data_wait_s": statistics.median(t["wait"]),
                  "inputs_s": statistics.median(t["inputs"])} for name, t in times.items()}
    out["ratio"] = out["curated"]["step_s"] / out["cache"]["step_s"]
    return out


def report(results: dict, args) -> str:
    lines = [f"{args.clips} clips of {args.source}, stage {args.frames} frames at {args.size}px, micro-batch "
             f"{args.batch}, VDiT-T/2, text tower {args.text_model} (random weights), {args.threads} torch thread(s)",
             f"{'source':<10} {'step (median)':>14} {'data wait':>10} {'inputs in step':>15}"]
    for name in ("curated", "cache"):
        step, wait = results[name]["step_s"] * 1000, results[name]["data_wait_s"] * 1000
        lines.append(f"{name:<10} {step:>12.1f}ms {wait:>8.1f}ms {results[name]['inputs_s'] * 1000:>13.1f}ms")
    lines.append(f"curated / cache step time: {results['ratio']:.2f}x")
    lines.append(f"encode (stages in one process): {results['encode_clips_per_s']:.2f} clips/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
