"""An image folder as training data for an image stage of the curriculum: every .jpg/.jpeg/.png/.webp under the
folder (recursively, in sorted order of their relative paths), each with a caption from the folder's
`captions.jsonl` (lines of {"file": "relative/path.jpg", "caption": "..."}) or else from a sidecar text file beside
it (`cat.jpg` -> `cat.txt`); an image with neither is trained on the empty prompt. Every file must lie inside the
folder: a captions.jsonl entry or a symbolic link that leads outside it is refused."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTIONS_FILE = "captions.jsonl"


@dataclass
class FolderImage:
    path: str  # absolute, resolved, inside the folder
    caption: str


@dataclass
class ImageFolder:
    root: str
    images: list[FolderImage]
    uncaptioned: int  # images trained on the empty prompt

    @property
    def content_id(self) -> str:
        """Which images and captions, by relative path, size and caption: a changed folder gives another id."""
        parts = [(str(Path(i.path).relative_to(self.root)), Path(i.path).stat().st_size, i.caption)
                 for i in self.images]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def read_image_folder(folder: str, what: str = "images") -> ImageFolder:
    """The images of `folder` and their captions; one-line ConfigErrors name `what` (the stage) and the problem."""
    root = Path(folder).expanduser()
    if "://" in folder or not root.is_dir():
        raise ConfigError(f"{what}: {folder!r} is not a local folder (an image stage reads a folder every worker "
                          "sees, e.g. on a shared filesystem)")
    root = root.resolve()
    captions = _jsonl_captions(root, what)
    images, uncaptioned = [], 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        resolved = _inside(root, path, what, f"{path.relative_to(root)}")
        if not resolved.is_file():
            continue
        caption = captions.get(resolved)
        if caption is None:
            sidecar = path.with_suffix(".txt")
            caption = _inside(root, sidecar, what, str(sidecar.relative_to(root))).read_text(
                encoding="utf-8").strip() if sidecar.is_file() else None
        if caption is None:
            uncaptioned += 1
        images.append(FolderImage(str(resolved), caption or ""))
    missing = sorted(str(p.relative_to(root)) for p in captions if not p.is_file() or p.suffix.lower() not in
                     IMAGE_SUFFIXES)
    if missing:
        raise ConfigError(f"{what}: {CAPTIONS_FILE} names {len(missing)} file(s) that are not images in {root}, "
                          f"e.g. {missing[0]!r}")
    if not images:
        raise ConfigError(f"{what}: {root} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images")
    return ImageFolder(str(root), images, uncaptioned)


def _inside(root: Path, path: Path, what: str, shown: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{what}: {shown!r} leads outside the image folder {root}; copy the file into it")
    return resolved


def _jsonl_captions(root: Path, what: str) -> dict[Path, str]:
    """{resolved image path: caption} from captions.jsonl, or {} when the folder has none."""
    path = root / CAPTIONS_FILE
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file, caption = entry["file"], entry["caption"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{what}: {CAPTIONS_FILE} line {number}: expected {{\"file\": ..., \"caption\": ...}}"
                              ) from None
        if not isinstance(file, str) or not isinstance(caption, str) or Path(file).is_absolute():
            raise ConfigError(f"{what}: {CAPTIONS_FILE} line {number}: file must be a path relative to the folder "
                              "and caption a string")
        captions[_inside(root, root / file, what, file)] = caption.strip()
    return captions


def square_frame(data: bytes | str, size: int) -> np.ndarray:
    """An encoded image (bytes, or a path) as one frame, (1, size, size, 3) uint8: the short side resized to `size`
    (box filter, as the video decode's area filter) and the centre cropped, as training.data.decode_clip does."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"not a readable image: {err}") from None
    w, h = rgb.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    rgb = rgb.resize((rw, rh), Image.Resampling.BOX)
    top, left = (rh - size) // 2, (rw - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)[None]
