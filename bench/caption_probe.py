"""Does the demo model use each word of its captions? A single-process probe for issue 4 (motion direction).

Trains the VDiT in a plain PyTorch loop (no Ray, no DeepSpeed: minutes on 2 cores) on curated shards or on a
generated moving-square task, and reports, every --eval-every steps:

- caption sensitivity: the denoising loss on clips with one caption word swapped (the direction for its opposite,
  the colour for another colour) over the loss with the true caption, at fixed timesteps, in percent. A model that
  ignores a word scores 0 %; one that uses it scores well above (the loss is worse with the wrong word). Measured on
  held-out clips and on training clips (the gap between the two is memorisation);
- prompt adherence of videos sampled for the held-out captions (training/metrics.py), and the direction confusion.

    python bench/caption_probe.py --data runs/quickstart/curated --heldout runs/quickstart/heldout-curated \
        --fps 1 --windows 1 --shift -2.77 --steps 6000   # as the demo trains now (configs/train/demo.yaml)
    python bench/caption_probe.py --synthetic direction+colour --init pixart   # the text embedders' old init
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.sample_dump import DIRECTIONS, SHAPE_COLORS, direction_vector, draw_shape  # noqa: E402
from models.schedules import NoiseSchedule, ScheduleConfig  # noqa: E402
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig  # noqa: E402
from models.vdit import VDiT, vdit_config  # noqa: E402
from training.config import CurriculumStage  # noqa: E402
from training.data import decode_row, to_model_input, to_uint8  # noqa: E402
from training.dataset import ClipTable  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.metrics import detect_shape_video, parse_shape_prompt, prompt_adherence  # noqa: E402
from training.sample import generate  # noqa: E402

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PROBE_TIMESTEPS = (400, 700, 900, 970)


def curated_clips(data: str, stage: CurriculumStage, windows: int) -> tuple[np.ndarray, list[str]]:
    videos, captions = [], []
    table = ClipTable.open(data)  # DIR@vN for version N
    for row in table.take(range(len(table))):
        for clip in decode_row(row, stage, windows):
            videos.append(clip)
            captions.append(row["caption"] or "")
    return np.stack(videos), captions


def synthetic_clips(kind: str, count: int, frames: int, speed: tuple[float, float], jitter: float,
                    seed: int) -> tuple[np.ndarray, list[str]]:
    """16x16 clips of a 6 px square crossing the frame centre at `speed` px/frame, start within +-jitter px."""
    rng = np.random.default_rng(seed)
    colors = list(SHAPE_COLORS) if kind == "direction+colour" else ["red"]
    videos, captions = [], []
    for i in range(count):
        direction = DIRECTIONS[i % 4]
        color = colors[int(rng.integers(len(colors)))]
        dx, dy = direction_vector(direction)
        step = rng.uniform(*speed)
        x0, y0 = rng.uniform(8 - jitter, 8 + jitter, size=2) - np.array([dx, dy]) * step * (frames - 1) / 2
        video = np.full((frames, 16, 16, 3), 20, np.uint8)
        for f in range(frames):  # the sample dump's own square, 6 px
            draw_shape(video[f], "square", x0 + dx * step * f, y0 + dy * step * f, 3, SHAPE_COLORS[color])
        videos.append(video)
        captions.append(f"a {color} square moving {direction} on a black background")
    return np.stack(videos), captions


def swapped_captions(captions: list[str]) -> tuple[list[int], list[str], list[str]]:
    """Indices of moving-shape captions, each with its direction reversed, and with its colour changed."""
    colors = list(SHAPE_COLORS)
    keep, by_direction, by_colour = [], [], []
    for i, caption in enumerate(captions):
        prompt = parse_shape_prompt(caption)
        if prompt is None or prompt["kind"] != "moving":
            continue
        keep.append(i)
        direction = prompt["direction"]
        by_direction.append(caption.replace(f"moving {direction}", f"moving {OPPOSITE[direction]}"))
        other = colors[(colors.index(prompt["color"]) + 1) % len(colors)]
        by_colour.append(caption.replace(f"a {prompt['color']} ", f"a {other} ", 1))
    return keep, by_direction, by_colour


class Probe:
    def __init__(self, args):
        self.args = args
        self.encoder = FrozenTextEncoder(TextEncoderConfig(model_name="tiny"))
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        torch.manual_seed(args.seed)
        self.model = VDiT(vdit_config("VDiT-T/2", depth=args.depth, hidden_size=args.hidden,
                                      context_dim=self.encoder.width))
        if args.init == "pixart":  # the text embedders' init before this probe (std=0.02, PixArt-alpha)
            for linear in (*self.model.pooled_text_embedder[::2], self.model.context_embedder.fc1,
                           self.model.context_embedder.fc2):
                torch.nn.init.normal_(linear.weight, std=0.02)
        self.schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction="v", logsnr_shift=args.shift))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for p in prompts:
            if p not in self._cache:
                context, mask = self.encoder([p])
                self._cache[p] = (context[0], mask[0])
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))

    @torch.no_grad()
    def sensitivity(self, videos: np.ndarray, captions: list[str]) -> str:
        keep, by_direction, by_colour = swapped_captions(captions)
        if not keep:
            return "no moving-shape captions"
        x0 = to_model_input(videos[keep])
        true = [captions[i] for i in keep]
        generator = torch.Generator().manual_seed(123)
        parts = []
        for t_value in PROBE_TIMESTEPS:
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.full((len(x0),), t_value)
            x_t, target = self.schedule.add_noise(x0, noise, t), self.schedule.target(x0, noise, t)
            loss = {name: F.mse_loss(self.model(x_t, t, *self.encode(c)), target).item()
                    for name, c in (("true", true), ("direction", by_direction), ("colour", by_colour))}
            parts.append(f"t{t_value}: direction {100 * (loss['direction'] / loss['true'] - 1):+.1f}% "
                         f"colour {100 * (loss['colour'] / loss['true'] - 1):+.1f}%")
        return "  ".join(parts)

    def sample(self, prompt: str, seed: int) -> np.ndarray:
        a = self.args
        video = generate(self.model, self.encode, self.schedule, [prompt], a.frames, a.size, a.sample_steps,
                         a.cfg_scale, seed)
        return to_uint8(video)[0]

    def adherence(self, captions: list[str]) -> str:
        videos = np.stack([self.sample(c, i) for i, c in enumerate(captions)])
        scores = prompt_adherence(videos, captions)
        confusion = collections.Counter()
        for video, caption in zip(videos, captions, strict=True):
            prompt = parse_shape_prompt(caption)
            if prompt and prompt["kind"] == "moving":
                confusion[(prompt["direction"], detect_shape_video(video)["direction"])] += 1
        right = sum(n for (want, got), n in confusion.items() if want == got)
        table = ", ".join(f"{w}->{g}: {n}" for (w, g), n in sorted(confusion.items(), key=str))
        return (f"colour {scores['color_accuracy']:.2f}, direction {scores['direction_accuracy']:.2f} "
                f"(any confidence: {right / max(1, sum(confusion.values())):.2f}), background "
                f"{scores['background_accuracy']:.2f}\n  direction asked->seen: {table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="curated output to train on (its shards)")
    parser.add_argument("--heldout", help="curated held-out output: its captions are the prompts")
    parser.add_argument("--synthetic", choices=["direction", "direction+colour"],
                        help="train and probe on generated squares instead of --data")
    parser.add_argument("--speed", type=float, nargs=2, default=(2.5, 3.0), help="synthetic px per frame")
    parser.add_argument("--jitter", type=float, default=1.5, help="synthetic start position spread, px")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--init", choices=["xavier", "pixart"], default="xavier")
    parser.add_argument("--shift", type=float, default=0.0, help="schedule.logsnr_shift (negative: noisier)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--windows", type=int, default=4, help="training windows per curated clip")
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.synthetic and not (args.data and args.heldout):
        parser.error("give --data and --heldout (curated outputs), or --synthetic")
    torch.set_num_threads(args.threads)

    if args.synthetic:
        args.size = 16
        videos, captions = synthetic_clips(args.synthetic, 1000, args.frames, tuple(args.speed), args.jitter, 0)
        heldout_videos, heldout_captions = synthetic_clips(args.synthetic, 40, args.frames, tuple(args.speed),
                                                           args.jitter, 1)
    else:
        stage = CurriculumStage(num_frames=args.frames, fps=args.fps, size=args.size)
        videos, captions = curated_clips(args.data, stage, args.windows)
        heldout_videos, heldout_captions = curated_clips(args.heldout, stage, 1)
    print(f"{len(videos)} training clips, {len(heldout_videos)} held-out clips", flush=True)

    probe = Probe(args)
    model, schedule = probe.model, probe.schedule
    x_all = to_model_input(videos)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    ema = EMA.of_module(model, 0.995)
    generator = torch.Generator().manual_seed(args.seed)
    seen = np.random.default_rng(0).choice(len(videos), size=min(64, len(videos)), replace=False)  # probed
    losses, started = [], time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 50) * (0.1 + 0.45 * (1 + np.cos(np.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(x_all), (args.batch,), generator=generator)
        drop = torch.rand(args.batch, generator=generator) < 0.1
        batch_captions = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist(), strict=True)]
        x0 = x_all[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, schedule.num_train_timesteps, (args.batch,), generator=generator)
        out = model(schedule.add_noise(x0, noise, t), t, *probe.encode(batch_captions))
        loss = F.mse_loss(out, schedule.target(x0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update()
        losses.append(loss.item())
        if step % 500 == 0:
            print(f"step {step} loss {np.mean(losses[-500:]):.4f} ({time.time() - started:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with ema.swapped_in():
                print(f"== step {step} (EMA weights)")
                print(f"caption sensitivity, held-out: {probe.sensitivity(heldout_videos, heldout_captions)}")
                seen_captions = [captions[i] for i in seen]
                print(f"caption sensitivity, training: {probe.sensitivity(videos[seen], seen_captions)}")
                print(f"sampled prompt adherence ({args.sample_steps} steps, cfg {args.cfg_scale}): "
                      f"{probe.adherence(heldout_captions)}", flush=True)
            model.train()


if __name__ == "__main__":
    main()
