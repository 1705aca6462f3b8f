"""Keyframes with and without text, rendered with their truth, for the OCR stage's tests and bench/ocr.py.

Each frame is what VideoStage stores for a 16:9 video: 454x256 RGB, JPEG quality 90. Positives carry text the way
videos do (subtitles, title cards, corner watermarks, scene text on a sign in perspective, end credits); negatives
are the textures a text detector confuses with writing (stripes, grids, checkerboards, foliage-like noise, brick,
scattered shapes and lines) and plain scenes. The truth of a positive is its text and the fraction of the frame its
glyph boxes cover (the union of the rendered lines' bounding boxes).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import cv2
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

W, H = 454, 256
FONTS = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf")
WORDS = ("the night we left the city was colder than anyone remembered and nobody said a word about where we were "
         "going next summer maybe never again until morning light came through old windows river station market "
         "house garden coffee open north street hotel bakery pharmacy").split()
BRANDS = ("STOCKCLIPS", "VIDEOHIVE", "FOOTAGE PRO", "@travelvlog", "CHANNEL 7", "PREVIEW")
POSITIVE_KINDS = ("subtitle", "title", "watermark", "scene", "credits")
NEGATIVE_KINDS = ("plain", "stripes", "grid", "checker", "foliage", "brick", "shapes")


@dataclass
class TextFrame:
    name: str
    kind: str  # a POSITIVE_KINDS or NEGATIVE_KINDS name
    image: np.ndarray  # (H, W, 3) uint8 RGB
    text: str | None  # what was rendered, lines joined by spaces; None on negatives
    text_area: float  # the union of the rendered lines' boxes over the frame area; 0 on negatives

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def jpeg(self, quality: int = 90) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.image).save(out, format="JPEG", quality=quality)
        return out.getvalue()


# Backgrounds ------------------------------------------------------------------------------------------------------

def smooth(rng: np.random.Generator) -> Image.Image:
    """Upscaled colour noise: a soft, photo-like picture with no edges."""
    small = rng.integers(0, 256, (rng.integers(4, 10), rng.integers(6, 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.BICUBIC)


def scene(rng: np.random.Generator) -> Image.Image:
    """A sky gradient over ground with a few soft blobs and sensor noise."""
    y = np.linspace(0, 1, H)[:, None, None]
    top, bottom = rng.integers(60, 230, 3), rng.integers(20, 160, 3)
    image = (top * (1 - y) + bottom * y) * np.ones((1, W, 1))
    horizon = int(rng.integers(H // 3, 2 * H // 3))
    image[horizon:] = image[horizon:] * 0.5 + rng.integers(20, 120, 3) * 0.5
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = rng.integers(0, W), rng.integers(0, H), rng.integers(10, 60)
        yy, xx = np.ogrid[:H, :W]
        mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * r * r))[..., None]
        image = image * (1 - mask) + rng.integers(0, 256, 3) * mask
    image += rng.normal(0, 4, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def foliage(rng: np.random.Generator) -> Image.Image:
    """Leaves: multi-octave green noise with many small bright and dark blobs (dense high-frequency detail)."""
    image = np.zeros((H, W, 3))
    for octave, weight in ((4, 0.4), (16, 0.3), (64, 0.2), (128, 0.1)):
        small = rng.random((max(2, H * octave // W), octave, 3))
        image += weight * cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
    image = image * np.array([70, 150, 60]) + np.array([10, 30, 10])
    for _ in range(int(rng.integers(150, 400))):
        center = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        axes = (int(rng.integers(2, 9)), int(rng.integers(1, 5)))
        shade = rng.uniform(0.3, 1.6)
        color = tuple(float(c) for c in np.clip(np.array([60, 140, 50]) * shade, 0, 255))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def stripes(rng: np.random.Generator) -> Image.Image:
    """Square or sine stripes at any angle and period (blinds, fences, shirts)."""
    period, angle = rng.uniform(4, 30), rng.uniform(0, math.pi)
    yy, xx = np.mgrid[:H, :W]
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    wave = np.sin(phase) if rng.random() < 0.5 else np.sign(np.sin(phase))
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    image = a + (b - a) * (0.5 + 0.5 * wave)[..., None]
    return Image.fromarray(image.astype(np.uint8))


def grid(rng: np.random.Generator) -> Image.Image:
    """Thin lines on a plain ground (tiles, windows of a tower, graph paper)."""
    image = Image.new("RGB", (W, H), tuple(int(c) for c in rng.integers(100, 256, 3)))
    draw = ImageDraw.Draw(image)
    step, width = int(rng.integers(8, 40)), int(rng.integers(1, 4))
    ink = tuple(int(c) for c in rng.integers(0, 100, 3))
    for x in range(int(rng.integers(0, step)), W, step):
        draw.line([(x, 0), (x, H)], fill=ink, width=width)
    for y in range(int(rng.integers(0, step)), H, step):
        draw.line([(0, y), (W, y)], fill=ink, width=width)
    return image


def checker(rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(6, 40))
    yy, xx = np.mgrid[:H, :W]
    cells = ((xx // size + yy // size) % 2)[..., None]
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return Image.fromarray((a * cells + b * (1 - cells)).astype(np.uint8))


def brick(rng: np.random.Generator) -> Image.Image:
    """Courses of bricks with mortar lines, each brick its own shade."""
    bh, bw = int(rng.integers(8, 20)), int(rng.integers(20, 50))
    mortar = tuple(int(c) for c in rng.integers(150, 220, 3))
    image = Image.new("RGB", (W, H), mortar)
    draw = ImageDraw.Draw(image)
    base = rng.integers(90, 180, 3) * np.array([1.0, 0.5, 0.4])
    for row, y in enumerate(range(0, H, bh)):
        offset = (bw // 2) * (row % 2)
        for x in range(-offset, W, bw):
            shade = tuple(int(c) for c in np.clip(base * rng.uniform(0.7, 1.3), 0, 255))
            draw.rectangle([x + 1, y + 1, x + bw - 2, y + bh - 2], fill=shade)
    return image


def shapes(rng: np.random.Generator) -> Image.Image:
    """Scattered rectangles, circles and lines: hard edges at every scale, none of them glyphs."""
    image = scene(rng)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 30))):
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        w, h = int(rng.integers(4, 80)), int(rng.integers(4, 80))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        choice = rng.integers(0, 3)
        if choice == 0:
            draw.rectangle([x, y, x + w, y + h], fill=color)
        elif choice == 1:
            draw.ellipse([x, y, x + w, y + h], outline=color, width=int(rng.integers(1, 4)))
        else:
            draw.line([(x, y), (x + w, y + h)], fill=color, width=int(rng.integers(1, 4)))
    return image


BACKGROUNDS = {"plain": scene, "smooth": smooth, "stripes": stripes, "grid": grid, "checker": checker,
               "foliage": foliage, "brick": brick, "shapes": shapes}


# Text -------------------------------------------------------------------------------------------------------------

def font(rng: np.random.Generator, size: int, faces: tuple[str, ...] = FACES) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(FONTS, faces[int(rng.integers(0, len(faces)))]), size)


def sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), words))


def _union_area(boxes: list[tuple[int, int, int, int]]) -> float:
    mask = np.zeros((H, W), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return float(mask.mean())


def _lines(draw: ImageDraw.ImageDraw, lines: list[str], fnt, center_x: float, top: float, spacing: float,
           **style) -> list[tuple[int, int, int, int]]:
    """Draw centred lines; returns each line's ink box."""
    boxes = []
    for i, line in enumerate(lines):
        width = draw.textlength(line, font=fnt)
        xy = (center_x - width / 2, top + i * spacing)
        draw.text(xy, line, font=fnt, **style)
        boxes.append(tuple(int(round(v)) for v in draw.textbbox(xy, line, font=fnt,
                                                                stroke_width=style.get("stroke_width", 0))))
    return boxes


def subtitle(rng: np.random.Generator, background: Image.Image) -> tuple[Image.Image, str, float]:
    """One or two lines near the bottom, white or yellow with a dark outline, 11-18 px (a 1080p subtitle is ~4%
    of the frame height)."""
    size = int(rng.integers(11, 19))
    fnt = font(rng, size, FACES[:2])
    lines = [sentence(rng, int(rng.integers(3, 7))) for _ in range(int(rng.integers(1, 3)))]
    while max(ImageDraw.Draw(background).textlength(line, font=fnt) for line in lines) > W - 20:
        lines = [" ".join(line.split()[:-1]) for line in lines]
    draw = ImageDraw.Draw(background)
    top = H - 10 - len(lines) * (size + 4)
    fill = "white" if rng.random() < 0.7 else (255, 230, 40)
    boxes = _lines(draw, lines, fnt, W / 2, top, size + 4, fill=fill, stroke_width=max(1, size // 8),
                   stroke_fill="black")
    return background, " ".join(lines), _union_area(boxes)


def title(rng: np.random.Generator, background: Image.Image) -> tuple[Image.Image, str, float]:
    """A title card: 1-3 short lines of 24-44 px, centred, on a darkened or plain ground."""
    if rng.random() < 0.5:
        background = Image.new("RGB", (W, H), tuple(int(c) for c in rng.integers(0, 60, 3)))
    else:
        background = Image.blend(background, Image.new("RGB", (W, H), (0, 0, 0)), 0.6)
    size = int(rng.integers(24, 45))
    fnt = font(rng, size)
    count = int(rng.integers(1, 4))
    lines = [sentence(rng, int(rng.integers(1, 4))).upper() for _ in range(count)]
    draw = ImageDraw.Draw(background)
    while max(draw.textlength(line, font=fnt) for line in lines) > W - 30:
        size -= 2
        fnt = font(rng, size)
    top = H / 2 - count * (size + 8) / 2
    boxes = _lines(draw, lines, fnt, W / 2, top, size + 8, fill=tuple(int(c) for c in rng.integers(180, 256, 3)))
    return background, " ".join(lines), _union_area(boxes)


def watermark(rng: np.random.Generator, background: Image.Image) -> tuple[Image.Image, str, float]:
    """A brand in a corner, 12-18 px, half transparent."""
    size = int(rng.integers(12, 19))
    fnt = font(rng, size, FACES[:2])
    text = BRANDS[int(rng.integers(0, len(BRANDS)))]
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = draw.textlength(text, font=fnt)
    x = 8 if rng.random() < 0.5 else W - 8 - width
    y = 6 if rng.random() < 0.5 else H - 8 - size
    alpha = int(rng.integers(140, 230))
    draw.text((x, y), text, font=fnt, fill=(255, 255, 255, alpha), stroke_width=1, stroke_fill=(0, 0, 0, alpha // 2))
    box = tuple(int(round(v)) for v in draw.textbbox((x, y), text, font=fnt, stroke_width=1))
    image = Image.alpha_composite(background.convert("RGBA"), layer).convert("RGB")
    return image, text, _union_area([box])


def scene_text(rng: np.random.Generator, background: Image.Image) -> tuple[Image.Image, str, float]:
    """A shop sign seen at an angle: a light board with one or two dark words, warped by a random perspective and
    pasted on the scene; the truth is the warped ink boxes' area."""
    size = int(rng.integers(16, 30))
    fnt = font(rng, size, FACES[1:2] + FACES[3:4])
    lines = [sentence(rng, int(rng.integers(1, 3))).upper() for _ in range(int(rng.integers(1, 3)))]
    probe = ImageDraw.Draw(background)
    bw = int(max(probe.textlength(line, font=fnt) for line in lines)) + 24
    bh = len(lines) * (size + 6) + 16
    board = Image.new("RGB", (bw, bh), tuple(int(c) for c in rng.integers(190, 256, 3)))
    ink = tuple(int(c) for c in rng.integers(0, 90, 3))
    boxes = _lines(ImageDraw.Draw(board), lines, fnt, bw / 2, 8, size + 6, fill=ink)
    scale = min(1.0, (W - 40) / bw, (H - 40) / bh)
    src = np.float32([[0, 0], [bw, 0], [bw, bh], [0, bh]])
    jitter = rng.uniform(-0.12, 0.12, (4, 2)) * np.array([bw, bh]) * scale
    x0, y0 = rng.uniform(10, max(11, W - bw * scale - 10)), rng.uniform(10, max(11, H - bh * scale - 10))
    dst = np.float32(src * scale + np.array([x0, y0]) + jitter)
    matrix = cv2.getPerspectiveTransform(src, dst)
    warped = cv2.warpPerspective(np.asarray(board), matrix, (W, H))
    mask = cv2.warpPerspective(np.ones((bh, bw), np.uint8), matrix, (W, H)).astype(bool)
    image = np.asarray(background).copy()
    image[mask] = warped[mask]
    ink_mask = np.zeros((H, W), np.uint8)
    for bx0, by0, bx1, by1 in boxes:
        corners = cv2.perspectiveTransform(np.float32([[[bx0, by0], [bx1, by0], [bx1, by1], [bx0, by1]]]), matrix)
        cv2.fillPoly(ink_mask, [np.round(corners[0]).astype(np.int32)], 1)
    return Image.fromarray(image), " ".join(lines), float(ink_mask.mean())


def credits(rng: np.random.Generator, background: Image.Image) -> tuple[Image.Image, str, float]:
    """End credits: 4-8 lines of 10-14 px on black, roles and names."""
    background = Image.new("RGB", (W, H), (0, 0, 0))
    size = int(rng.integers(10, 15))
    fnt = font(rng, size, FACES[:1] + FACES[2:3])
    count = int(rng.integers(4, 9))
    lines = [f"{sentence(rng, 1)} {sentence(rng, 2)}".title() for _ in range(count)]
    top = H / 2 - count * (size + 6) / 2
    boxes = _lines(ImageDraw.Draw(background), lines, fnt, W / 2, top, size + 6, fill=(235, 235, 235))
    return background, " ".join(lines), _union_area(boxes)


WRITERS = {"subtitle": subtitle, "title": title, "watermark": watermark, "scene": scene_text, "credits": credits}


def render(kind: str, seed: int) -> TextFrame:
    """One frame of `kind` (a positive or negative kind), fully determined by `seed`."""
    rng = np.random.default_rng([seed, (POSITIVE_KINDS + NEGATIVE_KINDS).index(kind)])
    if kind in NEGATIVE_KINDS:
        image = BACKGROUNDS[kind](rng)
        return TextFrame(f"{kind}-{seed}", kind, np.asarray(image.convert("RGB")), None, 0.0)
    ground = ("plain", "smooth", "foliage", "brick", "shapes")[int(rng.integers(0, 5))]
    image, text, area = WRITERS[kind](rng, BACKGROUNDS[ground](rng))
    return TextFrame(f"{kind}-{seed}-on-{ground}", kind, np.asarray(image.convert("RGB")), text, area)


def rendered_set(per_kind: int, seed: int = 0) -> list[TextFrame]:
    """`per_kind` frames of every positive and negative kind."""
    return [render(kind, seed * 1000 + i) for kind in POSITIVE_KINDS + NEGATIVE_KINDS for i in range(per_kind)]


# Videos -----------------------------------------------------------------------------------------------------------

def write_video(path, subtitled: bool, seconds: float = 3.0, fps: int = 12, seed: int = 0) -> str | None:
    """An H.264 MP4 of a scene panning right (so the motion filter keeps it), with one burned-in subtitle for its
    whole length or none. Returns the subtitle's text."""
    import av

    wide = foliage(np.random.default_rng([seed, 1])).resize((W * 2, H))  # twice as wide: the pan moves across it
    text = None
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(int(seconds * fps)):
            x = int(i * W / (seconds * fps))
            frame = wide.crop((x, 0, x + W, H))
            if subtitled:  # the same generator state each frame: the same line at the same place
                frame, text, _ = subtitle(np.random.default_rng([seed, 2]), frame)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return text
