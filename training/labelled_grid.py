"""Video grids with their labels drawn in: the model beside each row, the prompt above each column or under each
clip, a title on top. A GIF in the MLflow UI then says what every clip is, at a size a person can read."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 2  # white gap between cells
FONT_PX = 11
LINE_PX = 13
MARGIN = 4
ROW_LABEL_PX = 132  # the band of row labels on the left
MAX_LINES = 6  # a longer label is cut with an ellipsis


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_PX)  # Pillow's bundled scalable font
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap(text: str, width_px: int, font, max_lines: int = MAX_LINES) -> list[str]:
    """`text` in lines that fit `width_px` (each paragraph on its own line), at most `max_lines`."""
    chars = max(4, int(width_px / max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)))
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, chars, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1].rstrip() + "…"
    return lines


def enlargement(height: int, width: int, cell_px: int) -> int:
    """The whole factor that brings a video's short side to at least `cell_px`."""
    return max(1, -(-cell_px // min(height, width)))


def labelled_grid(rows: list[np.ndarray], cell_px: int, row_labels: list[str] | None = None,
                  column_labels: list[str] | None = None, cell_labels: list[list[str]] | None = None,
                  title: str = "") -> np.ndarray:
    """R arrays of (B_r, T, H, W, 3) uint8 (rows may be shorter than the first) -> (T, H', W', 3) uint8: every video
    enlarged (nearest, a whole factor) to at least `cell_px`; `row_labels` (one per row) in a band on the left,
    `column_labels` (one per column) above, `cell_labels` (per row, one per video) under each video, `title` on top.
    The labels are drawn once; each frame pastes the videos' frame into that picture."""
    t, h, w = rows[0].shape[1:4]
    f = enlargement(h, w, cell_px)
    ch, cw = h * f, w * f
    columns = max(len(r) for r in rows)
    font = _font()
    left = ROW_LABEL_PX + PAD if row_labels else 0
    width = left + columns * (cw + PAD) - PAD
    title_lines = wrap(title, width - 2 * MARGIN, font, 3) if title else []
    top = len(title_lines) * LINE_PX + (MARGIN if title_lines else 0)
    headers = [wrap(label, cw, font) for label in column_labels or []]
    header_px = max((len(lines) for lines in headers), default=0) * LINE_PX + (MARGIN if headers else 0)
    under = [[wrap(label, cw, font) for label in labels] for labels in cell_labels or []]
    under_px = max((len(lines) for labels in under for lines in labels), default=0) * LINE_PX
    sides = [wrap(label, ROW_LABEL_PX - MARGIN, font, max(MAX_LINES, ch // LINE_PX)) for label in row_labels or []]
    row_px = max([ch, *(len(lines) * LINE_PX for lines in sides)]) + under_px
    height = top + header_px + len(rows) * (row_px + PAD) - PAD

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((MARGIN, i * LINE_PX), line, fill="black", font=font)
    for c, lines in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((left + c * (cw + PAD), top + i * LINE_PX), line, fill="black", font=font)
    origins = []  # (y, x) of each video, row by row
    for r, row in enumerate(rows):
        y = top + header_px + r * (row_px + PAD)
        for i, line in enumerate(sides[r] if sides else []):
            draw.text((0, y + i * LINE_PX), line, fill="black", font=font)
        for c in range(len(row)):
            x = left + c * (cw + PAD)
            origins.append((y, x))
            for i, line in enumerate(under[r][c] if under else []):
                draw.text((x, y + ch + i * LINE_PX), line, fill="black", font=font)
    base = np.asarray(canvas)
    videos = np.concatenate(rows).repeat(f, axis=2).repeat(f, axis=3)  # (N, T, ch, cw, 3)
    out = np.repeat(base[None], t, axis=0)
    for (y, x), video in zip(origins, videos, strict=True):
        out[:, y:y + ch, x:x + cw] = video
    return out


def labelled_sheet(videos: np.ndarray, labels: list[str], cell_px: int, columns: int = 8,
                   title: str = "") -> np.ndarray:
    """(N, T, H, W, 3) -> (T, H', W', 3): the videos in rows of `columns`, each with its label under it."""
    columns = max(1, min(columns, len(videos)))
    starts = range(0, len(videos), columns)
    return labelled_grid([videos[s:s + columns] for s in starts], cell_px,
                         cell_labels=[labels[s:s + columns] for s in starts], title=title)
