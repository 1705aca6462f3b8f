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
segment overlaps takes the video's caption. An empty caption counts as none. An unreadable or malformed sidecar is
logged as a warning and skipped; a sidecar without any caption (e.g. a metadata-only `.json`) is skipped too, so
`name.txt` or the captioner fills in.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from curation import schema
from curation.config import CaptionConfig
from curation.discover import filesystem_and_path, join_uri

log = logging.getLogger(__name__)

SIDECAR_EXTENSIONS = (".json", ".txt")
CAPTION_KEYS = ("caption", "text", "name")
SIDECAR = "sidecar"  # caption_source of captions that came with the dump


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


def parse_sidecar(uri: str, data: bytes) -> Sidecar:
    """Parse a sidecar's bytes; raises ValueError naming the file when its content has no usable form."""
    text = data.decode("utf-8-sig")
    if uri.endswith(".txt"):
        return Sidecar(uri, caption=_text(text))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{uri}: not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{uri}: expected a JSON object with a 'caption', got {type(doc).__name__}")
    caption = next((_text(doc[k]) for k in CAPTION_KEYS if _text(doc.get(k))), None)
    segments = []
    for i, seg in enumerate(doc.get("segments") or []):
        try:
            seg_caption = _text(seg.get("caption")) or _text(seg.get("text"))
            start, end = float(seg["start_s"]), float(seg["end_s"])
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{uri}: segments[{i}] needs start_s, end_s and caption ({err!r})") from err
        if seg_caption and end > start:
            segments.append(Segment(start, end, seg_caption))
    return Sidecar(uri, caption=caption, segments=segments)


def read_sidecar(video_uri: str) -> Sidecar | None:
    """The sidecar of a video (any URI pyarrow.fs reads): the first of name.json, name.txt with a caption."""
    filesystem, path = filesystem_and_path(video_uri)
    stem = posixpath.splitext(path)[0]
    for ext in SIDECAR_EXTENSIONS:
        candidate = stem + ext
        if filesystem.get_file_info(candidate).type != pafs.FileType.File:
            continue
        uri = join_uri(video_uri, candidate)
        try:
            with filesystem.open_input_stream(candidate) as f:
                sidecar = parse_sidecar(uri, f.read())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("ignoring sidecar %s: %s", uri, err)
            continue
        if sidecar.caption or sidecar.segments:
            return sidecar
    return None


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

            torch.set_num_threads(max(1, int(self.config.num_cpus)))
            c = self.config
            self.captioner = build_captioner(c.captioner, model_name=c.model_name, pretrained=c.pretrained,
                                             max_tokens=c.max_tokens, device=c.device, precision=c.precision,
                                             cache_dir=c.cache_dir)

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        batch = pa.table(batch) if isinstance(batch, dict) else batch
        videos = batch.to_pylist()
        wanted = []  # clips the captioner must caption
        for video in videos:
            clips = video["clips"] or []
            sidecar = read_sidecar(video["uri"]) if self.config.sidecar and clips else None
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
            captions = self.captioner.caption([middle_keyframe(clip) for clip in chunk])
            for clip, caption in zip(chunk, captions, strict=True):
                clip.update(caption=caption or None, caption_source=self.captioner.name if caption else None)
        return pa.Table.from_pylist(videos, schema=schema.STAGED)


def middle_keyframe(clip: dict):
    """The clip's middle keyframe (keyframes are JPEG first, middle, last) as a PIL image."""
    from PIL import Image

    keyframes = clip["keyframes"]
    return Image.open(io.BytesIO(keyframes[len(keyframes) // 2])).convert("RGB")
