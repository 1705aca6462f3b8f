"""Hard cases for shot-cut detection, rendered in code with their truth known by construction.

Each case is a short video of textured "scenes" (a large canvas seen through a moving camera, with moving objects)
joined by hard cuts, dissolves or fades, with the events that fool cheap detectors laid over shots: camera flashes,
lighting ramps, strobing, fast and whip pans, flat-colour animation with impact frames, letterbox changes and cuts
between two views of one scene. `make_cut_cases(out, seed)` writes the videos and returns their truth in the shape of
../shared/videos/GROUND_TRUTH.json (`hard_cuts`, `dissolves`, `fades`) plus the `events` no cut may be found on.
Different seeds give different textures, palettes, timings and speeds of the same kinds of cases: tune on one seed,
check on others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT, FPS = 320, 180, 25
_ENCODER_OPTIONS = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}


# --- scenes: what a camera sees --------------------------------------------------------------------------------------


def _noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Smooth noise in 0..1: a random grid of `cells` across, upscaled bicubically."""
    grid = rng.random((max(2, cells * height // width), cells)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def textured_canvas(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like canvas: multi-scale noise through a random three-colour palette, plus a few hard-edged blobs."""
    field_ = 0.55 * _noise(rng, width, height, 6) + 0.3 * _noise(rng, width, height, 24) + \
        0.15 * _noise(rng, width, height, 96)
    palette = rng.integers(20, 236, (3, 3)).astype(np.float32)
    low, mid, high = palette
    t = field_[..., None]
    canvas = np.where(t < 0.5, low + (mid - low) * (t / 0.5), mid + (high - mid) * ((t - 0.5) / 0.5))
    canvas = canvas.astype(np.uint8)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in rng.integers(10, 246, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(8, 60)), int(rng.integers(8, 40)))
        cv2.ellipse(canvas, centre, axes, float(rng.integers(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return canvas


def flat_canvas(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A cartoon background: sky, ground and flat shapes in a small palette with black outlines."""
    palette = rng.integers(30, 240, (5, 3))
    canvas = np.empty((height, width, 3), np.uint8)
    horizon = int(height * rng.uniform(0.45, 0.7))
    canvas[:horizon] = palette[0]
    canvas[horizon:] = palette[1]
    for _ in range(int(rng.integers(5, 10))):
        x = int(rng.integers(0, width))
        w, h = int(rng.integers(30, 120)), int(rng.integers(30, horizon))
        colour = tuple(int(c) for c in palette[int(rng.integers(2, 5))])
        cv2.rectangle(canvas, (x, horizon - h), (x + w, horizon), colour, -1)
        cv2.rectangle(canvas, (x, horizon - h), (x + w, horizon), (0, 0, 0), 2)
    return canvas


def slide_canvas(rng: np.random.Generator, template: dict) -> np.ndarray:
    """One slide of a deck: the deck's background and title bar, a new title and new bullet lines ("text" bars)."""
    canvas = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    canvas[:] = template["background"]
    canvas[:28] = template["bar"]
    cv2.rectangle(canvas, (12, 8), (12 + int(rng.integers(80, 220)), 20), template["title"], -1)
    y = 44
    for _ in range(int(rng.integers(3, 7))):
        indent = 14 if rng.random() < 0.7 else 30
        cv2.circle(canvas, (indent - 6, y + 4), 2, template["text"], -1)
        x = indent
        for _ in range(int(rng.integers(2, 6))):  # words
            w = int(rng.integers(10, 40))
            if x + w > WIDTH - 10:
                break
            cv2.rectangle(canvas, (x, y), (x + w, y + 7), template["text"], -1)
            x += w + 5
        y += 20
        if y > HEIGHT - 16:
            break
    return canvas


@dataclass
class Sprite:
    """A moving object drawn over the view: an ellipse with a velocity in px/frame, bouncing off the frame edges."""

    colour: tuple[int, int, int]
    position: tuple[float, float]
    velocity: tuple[float, float]
    axes: tuple[int, int]
    outline: bool = False

    def draw(self, frame: np.ndarray, t: int) -> None:
        h, w = frame.shape[:2]
        x = _bounce(self.position[0] + self.velocity[0] * t, w)
        y = _bounce(self.position[1] + self.velocity[1] * t, h)
        cv2.ellipse(frame, (int(x), int(y)), self.axes, 0, 0, 360, self.colour, -1, cv2.LINE_AA)
        if self.outline:
            cv2.ellipse(frame, (int(x), int(y)), self.axes, 0, 0, 360, (0, 0, 0), 2, cv2.LINE_AA)


def _bounce(value: float, size: int) -> float:
    if size <= 0:
        return 0.0
    period = 2 * size
    v = value % period
    return v if v < size else period - v


@dataclass
class Scene:
    """A canvas seen through a WIDTH x HEIGHT camera whose top-left follows `camera(t)`, with sprites on top."""

    canvas: np.ndarray
    camera: Callable[[int], tuple[float, float]]
    sprites: list[Sprite] = field(default_factory=list)
    blur_speed: Callable[[int], float] | None = None  # px/frame of camera travel to smear over (whip pans)

    def render(self, t: int) -> np.ndarray:
        if self.blur_speed is None or self.blur_speed(t) < 4:
            frame = self._view(*self.camera(t))
        else:
            # Motion blur of a fast camera: the average of views along this frame's travel.
            (x0, y0), (x1, y1) = self.camera(t - 1), self.camera(t)
            steps = 6
            views = [self._view(x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps).astype(np.float32)
                     for k in range(1, steps + 1)]
            frame = (sum(views) / steps).astype(np.uint8)
        for sprite in self.sprites:
            sprite.draw(frame, t)
        return frame

    def _view(self, x: float, y: float) -> np.ndarray:
        # The camera turns back at the canvas edges (a continuous path, never a jump that would be a cut).
        ch, cw = self.canvas.shape[:2]
        xi = int(round(_bounce(x, cw - WIDTH)))
        yi = int(round(_bounce(y, ch - HEIGHT)))
        return self.canvas[yi:yi + HEIGHT, xi:xi + WIDTH].copy()


def still_camera(x: float, y: float) -> Callable[[int], tuple[float, float]]:
    return lambda t: (x, y)


def panning_camera(x: float, y: float, vx: float, vy: float = 0.0) -> Callable[[int], tuple[float, float]]:
    return lambda t: (x + vx * t, y + vy * t)


def whip_camera(x: float, y: float, start: int, frames: int, distance: float) -> Callable[[int], tuple[float, float]]:
    """Still, then a smooth (cosine) whip of `distance` px over `frames` frames, then still."""

    def position(t: int) -> tuple[float, float]:
        u = min(1.0, max(0.0, (t - start) / frames))
        return x + distance * (1 - math.cos(math.pi * u)) / 2, y

    return position


def whip_speed(start: int, frames: int, distance: float) -> Callable[[int], float]:
    return lambda t: (math.pi * distance / (2 * frames)) * math.sin(math.pi * min(1.0, max(0.0, (t - start) / frames)))


# --- a case: shots joined by transitions, with events laid over them -------------------------------------------------


@dataclass
class Shot:
    scene: Scene
    frames: int
    letterbox: int = 0  # height of the black bars at top and bottom (px); negative: pillarbox bars of -n px
    enter: str = "cut"  # how this shot starts after the previous one: cut | dissolve | fade
    transition_frames: int = 0  # dissolve length, or fade-out + fade-in length (half each)


@dataclass
class Event:
    """Something laid over frames [start, end] of the video that is not a shot change."""

    kind: str  # flash | lighting | strobe | impact
    start: int
    end: int  # inclusive
    strength: float = 0.8
    colour: tuple[int, int, int] = (255, 255, 255)


def _bars(frame: np.ndarray, letterbox: int) -> np.ndarray:
    if letterbox > 0:
        frame[:letterbox] = 0
        frame[-letterbox:] = 0
    elif letterbox < 0:
        frame[:, :-letterbox] = 0
        frame[:, letterbox:] = 0
    return frame


def _apply(event: Event, index: int, frame: np.ndarray) -> np.ndarray:
    if not event.start <= index <= event.end:
        return frame
    u = (index - event.start) / max(1, event.end - event.start)
    f = frame.astype(np.float32)
    if event.kind in ("flash", "impact"):
        # A flash is brightest on its first frame and decays; an impact frame is a flat burst of colour.
        k = event.strength * (1 - 0.5 * u) if event.kind == "flash" else event.strength
        f = f * (1 - k) + np.array(event.colour, np.float32) * k
    elif event.kind == "lighting":
        # `strength` is the gain at the end of a ramp that starts at gain 1 (below 1: lights dim) and stays there.
        gain = 1 + (event.strength - 1) * u
        f = f * gain
    elif event.kind == "strobe":
        on = ((index - event.start) // 2) % 2 == 0
        f = f * (1.6 if on else 0.45) + (25 if on else 0)
    return f.clip(0, 255).astype(np.uint8)


def _held(event: Event, index: int, frame: np.ndarray) -> np.ndarray:
    """A lighting ramp's final gain holds after the ramp, to the end of its shot (the caller stops it there)."""
    if event.kind == "lighting" and index > event.end:
        return (frame.astype(np.float32) * event.strength).clip(0, 255).astype(np.uint8)
    return frame


@dataclass
class Case:
    name: str
    about: str
    shots: list[Shot]
    events: list[Event] = field(default_factory=list)

    def layout(self) -> tuple[list[tuple[int, int]], dict]:
        """Each shot's span in the video (first, last frame) and the truth: hard cuts, dissolves, fades, events."""
        spans, truth = [], {"hard_cuts": [], "dissolves": [], "fades": []}
        position = 0
        for k, shot in enumerate(self.shots):
            if k and shot.enter == "cut":
                truth["hard_cuts"].append(position)
            elif k and shot.enter == "dissolve":
                # The two shots overlap over the dissolve: the new shot starts `transition_frames` before the old ends.
                position -= shot.transition_frames
                truth["dissolves"].append([position, position + shot.transition_frames - 1])
            elif k and shot.enter == "fade":
                half = shot.transition_frames // 2
                truth["fades"].append([position - half, position + half - 1])
            spans.append((position, position + shot.frames - 1))
            position += shot.frames
        truth["events"] = [{"kind": e.kind, "frames": [e.start, e.end]} for e in self.events]
        truth["num_frames"] = position
        return spans, truth

    def frames(self):
        spans, _ = self.layout()
        total = spans[-1][1] + 1
        for index in range(total):
            layers = []
            for k, (first, last) in enumerate(spans):
                if first <= index <= last:
                    shot = self.shots[k]
                    frame = _bars(shot.scene.render(index - first), shot.letterbox)
                    for event in self.events:
                        if first <= event.start <= last:
                            frame = _held(event, index, _apply(event, index, frame))
                    layers.append((k, frame))
            yield self._mix(index, spans, layers)

    def _mix(self, index: int, spans: list[tuple[int, int]], layers: list[tuple[int, np.ndarray]]) -> np.ndarray:
        if len(layers) == 2:  # inside a dissolve: the incoming shot's weight rises linearly across the overlap
            (_, old), (k, new) = layers
            first = spans[k][0]
            n = self.shots[k].transition_frames
            w = (index - first + 1) / (n + 1)
            return cv2.addWeighted(old, 1 - w, new, w, 0)
        k, frame = layers[0]
        gain = 1.0
        # Fades: the old shot's last half-transition dims to black, the new shot's first half rises from it.
        if k + 1 < len(self.shots) and self.shots[k + 1].enter == "fade":
            half = self.shots[k + 1].transition_frames // 2
            gain = min(gain, (spans[k][1] - index) / half) if spans[k][1] - index < half else gain
        if k > 0 and self.shots[k].enter == "fade":
            half = self.shots[k].transition_frames // 2
            gain = min(gain, (index - spans[k][0]) / half) if index - spans[k][0] < half else gain
        if gain < 1.0:
            frame = (frame.astype(np.float32) * max(0.0, gain)).astype(np.uint8)
        return frame


# --- the cases -------------------------------------------------------------------------------------------------------


class _Builder:
    """Draws the random parts of the cases (canvases, palettes, camera starts, speeds) from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def sprites(self, count: int, speed: float, outline: bool = False,
                size: tuple[int, int] = (6, 22)) -> list[Sprite]:
        out = []
        for _ in range(count):
            angle = self.uniform(0, 2 * math.pi)
            out.append(Sprite(tuple(int(c) for c in self.rng.integers(0, 256, 3)),
                              (self.uniform(0, WIDTH), self.uniform(0, HEIGHT)),
                              (speed * math.cos(angle), speed * math.sin(angle)),
                              (self.integer(*size), self.integer(size[0], size[1] * 4 // 5)), outline))
        return out

    def scene(self, camera_speed: float = 0.0, sprites: int = 2, sprite_speed: float = 2.0,
              canvas: np.ndarray | None = None) -> Scene:
        canvas = textured_canvas(self.rng, WIDTH * 6, HEIGHT + 60) if canvas is None else canvas
        x, y = self.uniform(0, WIDTH * 2), self.uniform(0, 60)
        direction = 1 if self.rng.random() < 0.5 else -1
        camera = panning_camera(x, y, direction * camera_speed, 0.0) if camera_speed else still_camera(x, y)
        return Scene(canvas, camera, self.sprites(sprites, sprite_speed))

    def slides(self, count: int) -> list[Scene]:
        """A deck of static slides with a slowly moving pointer: one template, a new title and text per slide."""
        light = self.rng.random() < 0.7
        template = {"background": (245, 245, 240) if light else (30, 34, 48),
                    "bar": tuple(int(c) for c in self.rng.integers(40, 200, 3)),
                    "title": (250, 250, 250), "text": (40, 40, 40) if light else (220, 220, 210)}
        scenes = []
        for _ in range(count):
            canvas = slide_canvas(self.rng, template)
            pointer = Sprite((200, 30, 30), (self.uniform(40, WIDTH - 40), self.uniform(40, HEIGHT - 40)),
                             (self.uniform(-1, 1), self.uniform(-1, 1)), (3, 3))
            scenes.append(Scene(np.tile(canvas, (1, 2, 1)), still_camera(0, 0), [pointer]))
        return scenes

    def cartoon(self, camera_speed: float, sprite_speed: float, shake: float = 0.0,
                size: tuple[int, int] = (14, 50)) -> Scene:
        """A flat-colour scene; with `shake`, the camera jitters by up to that many px a frame (action scenes)."""
        canvas = flat_canvas(self.rng, WIDTH * 6, HEIGHT + 60)
        x, y = self.uniform(0, WIDTH * 2), self.uniform(0, 60)
        camera = panning_camera(x, y, camera_speed, self.uniform(-0.5, 0.5))
        if shake:
            jitter = self.rng.uniform(-shake, shake, (4096, 2))
            pan = camera
            camera = lambda t: (pan(t)[0] + jitter[t % 4096, 0], pan(t)[1] + jitter[t % 4096, 1])  # noqa: E731
        return Scene(canvas, camera, self.sprites(3, sprite_speed, outline=True, size=size))

    def length(self, low_s: float = 1.6, high_s: float = 3.0) -> int:
        return self.integer(int(low_s * FPS), int(high_s * FPS))


def build_cases(seed: int = 0) -> list[Case]:
    b = _Builder(seed)
    cases = []

    shots = [Shot(b.scene(sprites=2), b.length(2.4, 3.2)) for _ in range(3)]
    events = []
    position = 0
    for shot in shots:  # two or three flashes per shot, each at least 10 frames from a cut
        for _ in range(b.integer(2, 3)):
            start = position + b.integer(10, shot.frames - 14)
            if all(abs(start - e.start) > 6 for e in events):
                events.append(Event("flash", start, start + b.integer(0, 2), b.uniform(0.6, 0.9)))
        position += shot.frames
    about = "camera flashes (1-3 frames, decaying) inside shots, hard cuts between"
    cases.append(Case("flashes", about, shots, events))

    shots = [Shot(b.scene(sprites=1, sprite_speed=1.0), b.length(3.0, 3.6)) for _ in range(3)]
    spans = [sum(s.frames for s in shots[:k]) for k in range(3)]
    events = [
        Event("lighting", spans[0] + 10, spans[0] + 10 + b.integer(40, 55), b.uniform(0.3, 0.45)),  # slow dimming
        Event("lighting", spans[1] + 12, spans[1] + 12 + b.integer(10, 14), b.uniform(1.5, 1.9)),  # lights up
        Event("lighting", spans[2] + 8, spans[2] + 8 + b.integer(25, 35), b.uniform(0.45, 0.6)),
    ]
    cases.append(Case("lighting", "slow and medium lighting ramps (gain 0.3x to 1.9x over 0.4-2.2 s)", shots, events))

    shots = [Shot(b.scene(camera_speed=b.uniform(9, 14), sprites=1), b.length()) for _ in range(4)]
    cases.append(Case("fast_pans", "cameras panning 9-14 px/frame (3-4 % of the width), hard cuts between", shots))

    shots = []
    for _ in range(3):
        n, start, frames = b.length(2.4, 3.0), b.integer(15, 30), b.integer(6, 10)
        distance = b.uniform(WIDTH * 1.2, WIDTH * 2.0)
        scene = b.scene(sprites=1)
        x, y = scene.camera(0)
        scene.camera = whip_camera(x, y, start, frames, distance)
        scene.blur_speed = whip_speed(start, frames, distance)
        shots.append(Shot(scene, n))
    cases.append(Case("whip_pans", "whip pans (up to 100 px/frame, motion-blurred) inside shots, hard cuts between",
                      shots))

    shots = [Shot(b.scene(sprites=2), b.length()),
             Shot(b.scene(sprites=2), b.length(), enter="dissolve", transition_frames=b.integer(10, 16)),
             Shot(b.scene(camera_speed=3, sprites=1), b.length(), enter="dissolve",
                  transition_frames=b.integer(20, 30)),
             Shot(b.scene(sprites=2), b.length())]
    cases.append(Case("dissolves", "dissolves of 0.4-1.2 s and a hard cut", shots))

    shots = [Shot(b.scene(sprites=2), b.length()),
             Shot(b.scene(sprites=2), b.length(), enter="fade", transition_frames=2 * b.integer(8, 14)),
             Shot(b.scene(sprites=2), b.length()),
             Shot(b.scene(sprites=1), b.length(), enter="fade", transition_frames=2 * b.integer(5, 8))]
    cases.append(Case("fades", "fades through black (neutral) and a hard cut", shots))

    shots = [Shot(b.scene(sprites=2), b.length(2.8, 3.4)) for _ in range(3)]
    spans = [sum(s.frames for s in shots[:k]) for k in range(3)]
    events = [Event("strobe", spans[0] + 10, spans[0] + 10 + b.integer(25, 40)),
              Event("strobe", spans[2] + 12, spans[2] + 12 + b.integer(20, 30))]
    cases.append(Case("strobe", "strobing light (2 frames on, 2 off) inside shots, hard cuts between", shots, events))

    shots = [Shot(b.cartoon(b.uniform(2, 8), b.uniform(6, 12)), b.length(2.4, 3.2)) for _ in range(3)]
    # An action shot: big sprites crossing a third of the frame a frame, the camera shaking.
    shots.insert(2, Shot(b.cartoon(b.uniform(4, 10), b.uniform(25, 40), shake=10, size=(30, 70)), b.length(2.4, 3.2)))
    spans = [sum(s.frames for s in shots[:k]) for k in range(4)]
    events = []
    for k in (0, 2, 3):
        start = spans[k] + b.integer(12, shots[k].frames - 16)
        colour = tuple(int(c) for c in b.rng.integers(150, 256, 3))
        events.append(Event("impact", start, start + b.integer(0, 2), b.uniform(0.7, 0.95), colour))
    about = "flat-colour cartoon scenes with fast outlined sprites, impact frames and an action shot (camera shake)"
    cases.append(Case("animation", about, shots, events))

    bar = (HEIGHT - round(WIDTH / 2.39)) // 2
    shots = [Shot(b.scene(sprites=2), b.length(), letterbox=bar),
             Shot(b.scene(sprites=2), b.length(), letterbox=bar),
             Shot(b.scene(sprites=2), b.length()),
             Shot(b.scene(sprites=2), b.length(), letterbox=-(WIDTH - round(HEIGHT * 4 / 3)) // 2),
             Shot(b.scene(sprites=2), b.length(), letterbox=bar)]
    cases.append(Case("letterbox", "cuts inside 2.39:1 letterboxing and between letterboxed, full and pillarboxed",
                      shots))

    canvas = textured_canvas(b.rng, WIDTH * 6, HEIGHT + 60)
    shots = []
    for _ in range(4):
        scene = b.scene(camera_speed=b.uniform(0, 2), sprites=2, canvas=canvas)
        shots.append(Shot(scene, b.length()))
    cases.append(Case("same_scene", "cuts between views of one scene (one canvas, other camera positions)", shots))

    shots = [Shot(scene, b.length(1.2, 3.0)) for scene in b.slides(5)]
    cases.append(Case("slides", "a screencast: static slides of one template (new title and text each)", shots))
    return cases


# --- writing ---------------------------------------------------------------------------------------------------------


def encode(path: Path, frames, fps: int = FPS) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(_ENCODER_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode(None))


def make_cut_cases(out: Path, seed: int = 0, names: list[str] | None = None) -> dict:
    """Write the cases as OUT/<name>.mp4 and OUT/cut_truth.json; return the truth: {file name: truth}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for case in build_cases(seed):
        if names is not None and case.name not in names:
            continue
        _, entry = case.layout()
        entry["about"] = case.about
        encode(out / f"{case.name}.mp4", case.frames())
        truth[f"{case.name}.mp4"] = entry
    (out / "cut_truth.json").write_text(json.dumps({"seed": seed, "fps": FPS, "videos": truth}, indent=1))
    return truth
