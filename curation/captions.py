"""Captions: a clip keeps the caption that came with its video (a sidecar file), else a captioner writes one.

Sidecars sit next to the video with the same name and another extension; `name.json` is read first, then
`name.txt` (for `dump/a/clip01.mp4`: `dump/a/clip01.json`, then `dump/a/clip01.txt`):

- `name.txt`: the whole file, stripped, is the video's caption (video2dataset writes WebVid captions this way).
- `name.json`: an object with the video's caption under `"caption"`, `"text"` or `"name"` (the first present wins;
  `name` is WebVid's caption column), and optionally per-segment captions:
  `{"caption": "...", "segments": [{"start_s": 0.0, "end_s": 3.2, "caption": "..."}, ...]}`
  with times in seconds from the video's first frame (the clips table's `start_s`/`end_s`); a segment's caption may
  also be under `"text"`. Other keys are ignored.

A clip takes the caption of the segment that overlaps it longest in time (the first such on ties); a clip that no
segment overlaps takes the video's caption. An empty caption counts as none. A sidecar without any caption (e.g. a
metadata-only `.json`) is skipped, so `name.txt` or the captioner fills in.

A sidecar that cannot be used is skipped the same way, with a warning, and the video row records why
(error_class "sidecar_unusable", error_message naming the file; the video stays "ok"): any error reading or parsing it
(not UTF-8, not JSON, nested too deep, wrong types such as `"segments": 5`), larger than captions.sidecar_max_bytes,
not a regular file, or a symbolic link (never followed: a link could make a caption of any file, /proc/self/environ
included). Any other error in one video's row quarantines that video only (curation/model_stage.py).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import posixpath
import stat
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from curation.config import CaptionConfig
from curation.discover import filesystem_and_path, join_uri
from curation.model_stage import per_video
from curation.redact import redact_uri

log = logging.getLogger(__name__)

SIDECAR_EXTENSIONS = (".json", ".txt")
CAPTION_KEYS = ("caption", "text", "name")
SIDECAR = "sidecar"  # caption_source of captions that came with the dump
PREPROCESS = ("tensor", "pil")  # keyframes batched on the model's device (models/image_batch.py), or PIL per image
UNUSABLE = "sidecar_unusable"  # error_class of an ok video whose sidecar was skipped (error_message says why)


@dataclass
class Segment:
    start_s: float
    end_s: float
    caption: str


@dataclass
class Sidecar:
    uri: str
    caption: str | None = None
    segments: list[Segment] = field(default_factory=list)

    def caption_for(self, start_s: float, end_s: float) -> str | None:
        """The caption of the segment overlapping [start_s, end_s) longest, else the video's caption."""
        best, best_overlap = None, 0.0
        for segment in self.segments:
            overlap = min(end_s, segment.end_s) - max(start_s, segment.start_s)
            if overlap > best_overlap:
                best, best_overlap = segment, overlap
        return best.caption if best is not None else self.caption


def _text(value) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _seconds(value) -> float:
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite number of seconds")
    return seconds


def parse_sidecar(uri: str, data: bytes) -> Sidecar:
    """Parse a sidecar's bytes; raises ValueError naming the file when its content has no usable form."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{uri}: not UTF-8 text ({err})") from err
    if posixpath.splitext(urlsplit(uri).path if "://" in uri else uri)[1] == ".txt":  # a URI may end in ?options
        return Sidecar(uri, caption=_text(text))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{uri}: not valid JSON ({err})") from err
    except RecursionError as err:
        raise ValueError(f"{uri}: JSON nested too deeply") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{uri}: expected a JSON object with a 'caption', got {type(doc).__name__}")
    caption = next((_text(doc[k]) for k in CAPTION_KEYS if _text(doc.get(k))), None)
    raw_segments = doc.get("segments") or []
    if not isinstance(raw_segments, list):
        raise ValueError(f"{uri}: 'segments' must be a list, got {type(raw_segments).__name__}")
    segments = []
    for i, seg in enumerate(raw_segments):
        try:
            seg_caption = _text(seg.get("caption")) or _text(seg.get("text"))
            start, end = _seconds(seg["start_s"]), _seconds(seg["end_s"])
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"{uri}: segments[{i}] needs start_s, end_s and caption ({err!r})") from err
        if seg_caption and end > start:
            segments.append(Segment(start, end, seg_caption))
    return Sidecar(uri, caption=caption, segments=segments)


class SidecarUnusable(Exception):
    """A sidecar that exists but cannot be used; the message says why."""


def _too_large(size: int, max_bytes: int) -> SidecarUnusable:
    return SidecarUnusable(f"{size} bytes or more, above captions.sidecar_max_bytes={max_bytes}")


def _read_local(path: str, max_bytes: int) -> bytes | None:
    """The bytes of a local regular file, None if there is none; never through a symbolic link, never more than
    max_bytes, never blocking (a FIFO named like a sidecar is refused, not waited on)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SidecarUnusable("a symbolic link (links are not followed)") from err
        raise
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            return None
        if not stat.S_ISREG(mode):
            raise SidecarUnusable("not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def _read_remote(filesystem: pafs.FileSystem, path: str, max_bytes: int) -> bytes | None:
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    if info.size is not None and info.size > max_bytes:
        raise _too_large(info.size, max_bytes)
    with filesystem.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def find_sidecar(video_uri: str, max_bytes: int = CaptionConfig.sidecar_max_bytes) -> tuple[Sidecar | None, list[str]]:
    """The sidecar of a video (any URI pyarrow.fs reads): the first of name.json, name.txt with a caption; and,
    one line each, the sidecars found but not usable (any error, wrong types, a link, over `max_bytes`)."""
    filesystem, path = filesystem_and_path(video_uri)
    local = isinstance(filesystem, pafs.LocalFileSystem)
    stem = posixpath.splitext(path)[0]
    problems = []
    for ext in SIDECAR_EXTENSIONS:
        candidate = stem + ext
        uri = redact_uri(join_uri(video_uri, candidate))  # for messages: the URI may carry credentials
        try:
            data = _read_local(candidate, max_bytes) if local else _read_remote(filesystem, candidate, max_bytes)
            if data is None:
                continue
            sidecar = parse_sidecar(uri, data)
        except Exception as err:  # noqa: BLE001 - an unusable sidecar means no sidecar; the reason is recorded
            reason = str(err) if isinstance(err, (SidecarUnusable, ValueError)) else f"{type(err).__name__}: {err}"
            reason = reason if reason.startswith(uri) else f"{uri}: {reason}"
            log.warning("ignoring sidecar %s", reason)
            problems.append(reason)
            continue
        if sidecar.caption or sidecar.segments:
            return sidecar, problems
    return None, problems


def read_sidecar(video_uri: str, max_bytes: int = CaptionConfig.sidecar_max_bytes) -> Sidecar | None:
    """The sidecar of a video, or None (find_sidecar without the reasons)."""
    return find_sidecar(video_uri, max_bytes)[0]


class CaptionStage:
    """Ray Data stage on staged video records: fills each clip's `caption` and `caption_source`.

    Sidecar captions win: the captioner runs only on the middle keyframe of clips that have none (and, with
    `skip_dropped`, only on clips still kept). A clip whose caption is already set is left as it is.
    """

    def __init__(self, config: CaptionConfig):
        self.config = config
        self.captioner = None

    def setup(self) -> None:
        if self.config.enabled:
            import torch

            from models.captioner import build_captioner

            c = self.config
            if c.preprocess not in PREPROCESS:
                raise ValueError(f"captions.preprocess={c.preprocess!r} is not one of {', '.join(PREPROCESS)}")
            torch.set_num_threads(max(1, int(c.num_cpus)))
            self.captioner = build_captioner(c.captioner, model_name=c.model_name, pretrained=c.pretrained,
                                             max_tokens=c.max_tokens, device=c.device, precision=c.precision,
                                             cache_dir=c.cache_dir, sha256=c.pretrained_sha256, kv_cache=c.kv_cache)

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        batch = pa.table(batch) if isinstance(batch, dict) else batch
        return per_video(batch, self._caption, "caption_error")

    def _caption(self, videos: list[dict]) -> None:
        wanted = []  # clips the captioner must caption
        for video in videos:
            clips = video["clips"] or []
            sidecar = None
            if self.config.sidecar and clips:
                sidecar, problems = find_sidecar(video["uri"], self.config.sidecar_max_bytes)
                if problems and video["status"] == "ok" and video["error_class"] is None:
                    video.update(error_class=UNUSABLE, error_message="; ".join(problems)[:1000])
            for clip in clips:
                if clip.get("caption"):
                    continue
                caption = sidecar.caption_for(clip["start_s"], clip["end_s"]) if sidecar else None
                if caption:
                    clip.update(caption=caption, caption_source=SIDECAR)
                    continue
                clip.update(caption=None, caption_source=None)
                skipped = self.config.skip_dropped and clip["kept"] is False
                if self.captioner is not None and clip["keyframes"] and not skipped:
                    wanted.append(clip)
        size = max(1, self.config.batch_size)
        for i in range(0, len(wanted), size):
            chunk = wanted[i : i + size]
            if self.config.preprocess == "tensor":
                captions = self.captioner.caption_jpegs([middle_jpeg(clip) for clip in chunk])
            else:
                captions = self.captioner.caption([middle_keyframe(clip) for clip in chunk])
            for clip, caption in zip(chunk, captions, strict=True):
                clip.update(caption=caption or None, caption_source=self.captioner.name if caption else None)


def middle_jpeg(clip: dict) -> bytes:
    """The clip's middle keyframe (keyframes are JPEG first, middle, last), as JPEG bytes."""
    keyframes = clip["keyframes"]
    return keyframes[len(keyframes) // 2]


def middle_keyframe(clip: dict):
    """The clip's middle keyframe as a PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(middle_jpeg(clip))).convert("RGB")
