"""Perceptual hashes of frames and the temporal signature of a clip, for finding copies without any weights.

A frame's hash is the DCT pHash (Zauner 2010, as `imagehash.phash` computes it): the picture's luma at 32x32, its
2-D DCT, and one bit per coefficient of the 8x8 lowest frequencies, set where the coefficient is above their median.
Re-encoding, resizing and re-muxing move few of the 64 bits; other content moves about half of them. A clip's
signature is the hash of a frame every `interval_s` of its time, so a copy trimmed at either end is the same
sequence shifted: `align` finds the shift.

pHash sees luma only, and its bits are set against their median, so a red disc on blue and a green disc on yellow
moving alike hash alike. Each sample therefore also keeps the frame's mean colour (8 bits a channel, packed in an
int32); a pair of samples whose mean colours differ by more than `max_color` levels in a channel counts as all 64
bits different. Re-encoding and resizing move a mean colour by a level or two.

A frame with almost no texture (a flat colour, black) hashes to noise around the median: it gets FLAT, which
never matches anything (two black frames of different videos are not copies of each other).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BITS = 64
FLAT = 0  # the hash of a frame too flat to hash; a real pHash has half its bits set, never none
MIN_STD = 2.0  # luma levels: below this standard deviation at 32x32 a frame is flat
_SIDE, _LOW = 32, 8
THUMB = 4  # colour thumbnail side


def phash(picture: np.ndarray) -> int:
    """The 64-bit pHash of an (H, W, 3) RGB or (H, W) grey uint8 picture, as a signed int64 value (FLAT when the
    picture is flat)."""
    grey = picture if picture.ndim == 2 else cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    if small.std() < MIN_STD:
        return FLAT
    low = cv2.dct(small)[:_LOW, :_LOW].ravel()  # (64,)
    bits = low > np.median(low)
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value  # int64, as Arrow stores it


def thumbnail(picture: np.ndarray) -> bytes:
    """The picture's colours as a THUMB x THUMB RGB thumbnail (area means): 48 bytes."""
    rgb = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=2)
    return cv2.resize(rgb, (THUMB, THUMB), interpolation=cv2.INTER_AREA).tobytes()


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest difference in any cell and channel between thumbnails: `a` (m, 48) and `b` (n, 48) uint8 give
    (m, n)."""
    return np.abs(a[:, None, :].astype(np.int16) - b[None, :, :].astype(np.int16)).max(axis=-1)


def thumbnails(packed: bytes | None, count: int) -> np.ndarray:
    """A signature's packed thumbnails as (count, 48) uint8."""
    return np.frombuffer(packed or b"", np.uint8).reshape(count, THUMB * THUMB * 3)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between int64 hashes, elementwise with broadcasting."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64))


class ClipSignature:
    """The hashes of one clip's frames, one every `interval_s` from its first frame: `add` every frame in order,
    the frames at or after each sampling time are hashed, the others cost nothing."""

    def __init__(self, interval_s: float, start_s: float):
        self.interval_s = interval_s
        self.next_s = start_s
        self.hashes: list[int] = []
        self.thumbs: list[bytes] = []

    def add(self, time_s: float, picture: np.ndarray) -> None:
        if self.interval_s <= 0 or time_s + 1e-6 < self.next_s:
            return
        self.hashes.append(phash(picture))
        self.thumbs.append(thumbnail(picture))
        # The next sample is one interval after the time due, not after this frame: the samples stay on the grid.
        while self.next_s <= time_s + 1e-6:
            self.next_s += self.interval_s


@dataclass(frozen=True)
class Alignment:
    """How one signature lies on another: `b[i + offset]` is the sample of `a[i]`; over `overlap` pairs of
    non-flat samples, the median of their hamming distances is `hamming`."""

    offset: int
    overlap: int
    hamming: float


def distances(a: np.ndarray, b: np.ndarray, colors_a: np.ndarray, colors_b: np.ndarray,
              max_color: int) -> np.ndarray:
    """(m, n) hamming distances between the samples of two signatures, BITS where their colours differ."""
    bits = hamming(np.asarray(a, np.int64)[:, None], np.asarray(b, np.int64)[None, :])
    far = color_distance(colors_a, colors_b) > max_color
    return np.where(far, BITS, bits)


def align(a: np.ndarray, b: np.ndarray, colors_a: np.ndarray, colors_b: np.ndarray, max_color: int,
          min_overlap: float, min_samples: int) -> Alignment | None:
    """The shift of `b` against `a` with the smallest median hamming distance among the shifts where the two
    overlap on at least `min_samples` non-flat pairs and on `min_overlap` of the shorter signature's non-flat
    samples; None when no shift overlaps that much. One frame in each pair may be up to interval_s / 2 from the
    other (the sampling grids of a trimmed copy are out of phase), hence the median, not the mean."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if not len(a) or not len(b):
        return None
    valid = (a[:, None] != FLAT) & (b[None, :] != FLAT)  # (m, n)
    pairs = distances(a, b, colors_a, colors_b, max_color)  # (m, n)
    shorter = min(int((a != FLAT).sum()), int((b != FLAT).sum()))
    needed = max(min_samples, int(np.ceil(min_overlap * shorter)))
    # Every shift at once: the valid pairs sorted by (shift, distance), so each shift's median is in the middle of
    # its run.
    shift = (np.arange(len(b))[None, :] - np.arange(len(a))[:, None])[valid]
    values = pairs[valid]
    order = np.lexsort((values, shift))
    shift, values = shift[order], values[order]
    shifts, starts, counts = np.unique(shift, return_index=True, return_counts=True)
    enough = counts >= needed
    if not enough.any():
        return None
    shifts, starts, counts = shifts[enough], starts[enough], counts[enough]
    medians = (values[starts + (counts - 1) // 2] + values[starts + counts // 2]) / 2
    best = int(np.argmin(medians))  # the first (smallest) shift among equals, as a loop over shifts would pick
    return Alignment(int(shifts[best]), int(counts[best]), float(medians[best]))
