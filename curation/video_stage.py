"""The single pass over one video: decode once and feed shots, motion, keyframes and the clip encoder.

Clips stream out as shot boundaries become final (a fixed lag behind the newest frame), so a worker's memory is
bounded by the longest clip window, not by the video's length.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field

import cv2
import pyarrow as pa

from curation import schema
from curation.config import CurateConfig, DecodeConfig
from curation.decode import (
    DecodeFailed,
    Frame,
    VideoInfo,
    VideoRejected,
    analysis_size,
    decode_frames,
    is_run_error,
    local_path,
    probe,
    work_size,
)
from curation.encode import ClipEncoder, frame_step, jpeg_bytes
from curation.filters import ClipFilter
from curation.isolate import ChildCrashed, ChildTimedOut, IsolatedWorker, set_time_limit
from curation.motion import MotionScorer
from curation.phash import ClipSignature
from curation.redact import redact_uri
from curation.shots import ShotDetector

log = logging.getLogger(__name__)


@dataclass
class _OpenClip:
    start: Frame
    last: Frame
    signature: ClipSignature
    encoder: ClipEncoder | None = None  # opened on the clip's first frame on the encode grid
    first_jpeg: bytes | None = None  # of that frame
    num_frames: int = 1
    grid_frames: int = 0  # frames on the encode grid: the ones encoded and the only ones with a working-size picture
    tail: deque = field(default_factory=deque)  # grid frames from the current middle one to the newest


class ClipAssembler:
    """Turns finalized frames into clips: shots minus transitions, trimmed at cuts, split into windows.

    A clip's bytes hold its frames on the encode grid (every `step`-th frame of the video, encode.fps) and its
    keyframes are the first, middle and last of them; the other frames are released by the decoding loop, so only
    grid frames pay for their working-size picture."""

    def __init__(self, config: CurateConfig, info: VideoInfo, video_id: str, motion: MotionScorer):
        self.config = config
        self.info = info
        self.video_id = video_id
        self.motion = motion
        self.filter = ClipFilter(config.filters)
        fps = info.fps
        self.step = frame_step(fps, config.encode.fps)
        self.trim = max(0, round(config.shots.trim_seconds * fps))
        # A clip never holds more frames than its longest window at twice the average rate (room for VFR passages),
        # whatever the timestamps say: ones that crawl or freeze would otherwise keep one clip open for good.
        self.max_clip_frames = max(1, math.ceil(min(2 * config.shots.max_seconds * fps, config.decode.max_frames)))
        self.clips: list[dict] = []
        self._open: _OpenClip | None = None
        self._segment: int = -1  # index of the last cut at or before the current frame

    def on_grid(self, frame: Frame) -> bool:
        """Whether the frame is encoded (when its clip is kept) and may be a keyframe."""
        return frame.index % self.step == 0

    def _next_time(self, frame: Frame) -> float:
        return frame.time_s + 1.0 / self.info.fps

    def _keyframes(self, clip: _OpenClip) -> list[bytes]:
        quality = self.config.keyframes.jpeg_quality
        if clip.grid_frames:
            middle, last = clip.tail[0], clip.tail[-1]
            return [clip.first_jpeg, jpeg_bytes(middle.rgb, quality), jpeg_bytes(last.rgb, quality)]
        # A clip shorter than the grid's step (under 1/encode.fps seconds): its analysis pictures, enlarged.
        size = (self.info.work_width, self.info.work_height)
        return [jpeg_bytes(cv2.resize(f.analysis, size, interpolation=cv2.INTER_LINEAR), quality)
                for f in (clip.start, clip.last, clip.last)]

    def _close(self) -> None:
        clip, self._open = self._open, None
        if clip is None:
            return
        start, last = clip.start, clip.last
        end_s = self._next_time(last)
        duration = end_s - start.time_s
        stats = self.motion.stats(start.index, last.index)
        # Only the absolute bounds that need no run statistics: a clip failing them is never encoded.
        reason = self.filter.early_reason(duration, min(self.info.width, self.info.height), stats.mean, stats.median)
        video_bytes = None
        if clip.encoder is not None:
            if reason is None:
                video_bytes = clip.encoder.close()
            else:
                clip.encoder.abort()
        self.clips.append({
            "clip_id": f"{self.video_id}-{start.index:07d}",
            "video_id": self.video_id,
            "start_frame": start.index,
            "end_frame": last.index,
            "start_s": round(start.time_s, 6),
            "end_s": round(end_s, 6),
            "num_frames": clip.num_frames,
            "motion_mean": stats.mean,
            "motion_median": stats.median,
            "motion_p90": stats.p90,
            "is_static": stats.is_static,
            "keyframes": self._keyframes(clip),
            "kept": reason is None,
            "drop_reason": reason,
            # Filled by the model stages (curation/captions.py, curation/clip_scores.py) when they run.
            "caption": None,
            "caption_source": None,
            "aesthetic": None,
            "caption_match": None,
            "clip_embedding": None,
            "score_model": None,
            "frame_hashes": clip.signature.hashes if clip.signature.interval_s > 0 else None,
            "frame_thumbs": b"".join(clip.signature.thumbs) if clip.signature.interval_s > 0 else None,
            "video_bytes": video_bytes,
            "width": clip.encoder.width if clip.encoder else self.info.work_width,
            "height": clip.encoder.height if clip.encoder else self.info.work_height,
            # What video_bytes hold: every step-th frame of the clip, at fps / step (the shard row's fps, num_frames).
            "encode_fps": self.info.fps / self.step if video_bytes is not None else None,
            "encode_frames": clip.encoder.num_frames if video_bytes is not None else None,
        })
        self.motion.forget_before(last.index)

    def _open_clip(self, frame: Frame) -> None:
        dedup = self.config.filters.dedup
        signature = ClipSignature(dedup.hash_interval_s if dedup.enabled else 0.0, frame.time_s)
        self._open = _OpenClip(start=frame, last=frame, signature=signature, num_frames=0)
        self._extend(frame)

    def _extend(self, frame: Frame) -> None:
        clip = self._open
        clip.last = frame
        clip.signature.add(frame.time_s, frame.analysis)
        clip.num_frames += 1
        if not self.on_grid(frame):
            return
        if clip.first_jpeg is None:
            clip.first_jpeg = jpeg_bytes(frame.rgb, self.config.keyframes.jpeg_quality)
            if self.config.encode.short_side >= 0:
                clip.encoder = ClipEncoder(self.config.encode, frame.rgb.shape[1], frame.rgb.shape[0],
                                           self.info.fps / self.step)
        if clip.encoder is not None:
            clip.encoder.add(frame.time_s, frame.rgb)
        clip.grid_frames += 1
        clip.tail.append(frame)
        # Keep only the grid frames from the middle one on: the middle keyframe is known when the clip closes.
        while len(clip.tail) > clip.grid_frames - (clip.grid_frames - 1) // 2:
            clip.tail.popleft()

    def add(self, frame: Frame, cuts: list[int], transitions: list, next_boundary: int) -> None:
        """Place one finalized frame. `next_boundary`: the first cut or transition start after it, if known."""
        segment = max((c for c in cuts if c <= frame.index), default=0)
        in_transition = any(t.start_frame <= frame.index <= t.end_frame for t in transitions)
        last_boundary = max([segment] + [t.end_frame + 1 for t in transitions if t.end_frame < frame.index])
        after_cut = segment > 0 and frame.index - last_boundary < self.trim
        near_cut = after_cut or next_boundary - frame.index <= self.trim
        if segment != self._segment:
            self._close()
            self._segment = segment
        if in_transition or near_cut:
            self._close()
            return
        if self._open is not None and (frame.time_s - self._open.start.time_s >= self.config.shots.max_seconds
                                       or self._open.num_frames >= self.max_clip_frames):
            self._close()
        if self._open is None:
            self._open_clip(frame)
        else:
            self._extend(frame)

    def finish(self) -> None:
        self._close()


def _video_row(video_id: str, uri: str, size: int) -> dict:
    row = {name: None for name in schema.VIDEOS.names}
    row.update(video_id=video_id, uri=uri, size_bytes=size, cut_frames=[], transitions=[], clips=[])
    return row


def set_frame_sizes(info: VideoInfo, config: CurateConfig) -> None:
    """The sizes the decoder yields: the working size (keyframes, clips) and the analysis size (shots, motion)."""
    if config.motion.mode == "video2dataset":  # upstream flows on full-resolution frames
        info.work_width, info.work_height = work_size(info.width, info.height, 0)
        return
    info.work_width, info.work_height = work_size(info.width, info.height, config.decode.work_short_side)
    info.analysis_width, info.analysis_height = analysis_size(info.work_width, info.work_height,
                                                              config.shots.analysis_width)


def quarantined_row(video_id: str, uri: str, size: int, error_class: str, message: str) -> dict:
    """A fresh videos row for a rejected input: nothing a failed decode half-filled survives into it."""
    row = _video_row(video_id, uri, size)
    row.update(status="quarantined", error_class=error_class, error_message=message)
    return row


def decode_time_limit(config: DecodeConfig, info: VideoInfo | None) -> float | None:
    """The wall-clock limit for one video: decode.timeout_s plus decode.timeout_per_video_second per second of its
    probed duration (or of the longest duration allowed, when the header gives none). None: no limit."""
    if not config.timeout_s:
        return None
    duration = config.max_duration_s
    if info is not None and info.duration_s:
        duration = min(info.duration_s, config.max_duration_s)
    elif info is not None and info.num_frames and info.fps > 0:
        duration = min(info.num_frames / info.fps, config.max_duration_s)
    return config.timeout_s + config.timeout_per_video_second * duration


_child_stage: VideoStage | None = None  # the isolated child's stage, set up once and reused across videos


def _process_in_child(config: CurateConfig, video_id: str, uri: str, size: int) -> dict:
    """VideoStage.process's body, in the isolated child process (the entry point IsolatedWorker calls)."""
    global _child_stage
    if _child_stage is None or _child_stage.config != config:
        _child_stage = VideoStage(config)
        _child_stage.setup()
    return _child_stage._process_here(video_id, uri, size)


REPEATED = "repeated_run_error"  # the quarantine of a video that failed too many runs (pipelines/curate.RunErrors)
# VideoStage.process adds this note to a run error: it names the video in the error's text, which is what reaches the
# driver through Ray (Ray Data hands on the worker's traceback as text, not the exception object).
RUN_ERROR_NOTE = "reelforge: run error on video "
_NOTE = re.compile(re.escape(RUN_ERROR_NOTE) + r"([A-Za-z0-9_.:-]+)")


def run_error_video(err: BaseException) -> tuple[str, str] | None:
    """(video id, the error's line) of a run error raised for one video, found in the error's notes or in its text
    (Ray may wrap it more than once), or None when the error names no video."""
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join([f"{type(current).__name__}: {current}",
                                                          *getattr(current, "__notes__", [])]))
        match = _NOTE.search(text)
        if match:
            before = [line.strip() for line in text[:match.start()].splitlines() if line.strip()]
            return match[1], before[-1][:500]
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


class VideoStage:
    """Ray Data stage: one row per discovered video in, its videos row with all its clips out.

    With decode.isolate (the default) each video is processed in a child process of this worker (curation/isolate.py),
    so a decoder that crashes or hangs quarantines its file (decoder_crash, decode_timeout) and the worker goes on.

    A quarantine says "this file is bad" and a rerun skips it. An error that says "this run had a problem" (a full
    disk, no memory, throttling or a dropped connection to the store: `is_run_error`) is raised instead, so the Ray
    task fails, nothing is recorded for the video and a rerun retries it.
    """

    # What the child runs per video: a module-level function (config, video_id, uri, size) -> row. Tests swap it.
    child_entry = staticmethod(_process_in_child)

    def __init__(self, config: CurateConfig):
        self.config = config
        self._worker: IsolatedWorker | None = None  # started on the first isolated video

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from running one video per CPU

    def close(self) -> None:
        """Stop the isolated child process, if one runs (it also stops when the stage is garbage-collected)."""
        if self._worker is not None:
            self._worker.close()

    def process(self, video_id: str, uri: str, size: int) -> dict:
        try:
            return self._process(video_id, uri, size)
        except Exception as err:
            if is_run_error(err):  # the driver counts these per video: a file that fails every run is quarantined
                err.add_note(RUN_ERROR_NOTE + video_id)
            raise

    def _process(self, video_id: str, uri: str, size: int) -> dict:
        if not self.config.decode.isolate:
            return self._process_here(video_id, uri, size)
        if self._worker is None:
            self._worker = IsolatedWorker(name="reelforge-decode")
        decode = self.config.decode
        # The child raises the limit to decode_time_limit once it has probed the duration; never past the longest
        # video allowed.
        timeout_s = decode.timeout_s or None
        try:
            return self._worker.call(self.child_entry, self.config, video_id, uri, size, timeout_s=timeout_s,
                                     max_timeout_s=decode_time_limit(decode, None))
        except ChildCrashed as err:
            how = err.signal_name or f"exit code {err.exit_code}"
            message = f"the decoding process died with {how}; the file is quarantined"
            error_class = "decoder_crash"
        except ChildTimedOut as err:
            message = (f"decoding took longer than its limit of {err.timeout_s:g}s (decode.timeout_s="
                       f"{decode.timeout_s:g}s + decode.timeout_per_video_second={decode.timeout_per_video_second:g}"
                       " x the probed duration); the process was killed and the file is quarantined")
            error_class = "decode_timeout"
        log.warning("%s: %s", redact_uri(uri), message)
        return quarantined_row(video_id, uri, size, error_class, message)

    def _process_here(self, video_id: str, uri: str, size: int) -> dict:
        """Decode and cut one video in this process. Errors of the file become a quarantined row; errors of the run
        are raised."""
        row = _video_row(video_id, uri, size)
        try:
            with local_path(uri, self.config.decode.max_file_bytes) as path:
                info = probe(path, self.config.decode)
                limit = decode_time_limit(self.config.decode, info)
                if limit is not None:
                    set_time_limit(limit)  # in the sandbox: a long video gets the time it needs
                self._decode(path, info, row)
            row["status"] = "ok"
        except VideoRejected as err:
            return quarantined_row(video_id, uri, size, err.reason, str(err))
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the run; the reason is recorded
            if is_run_error(err):
                log.error("%s: %s: %s; not quarantined, the task fails and a rerun retries the video",
                          redact_uri(uri), type(err).__name__, err)
                raise
            log.exception("unexpected error on %s", redact_uri(uri))
            return quarantined_row(video_id, uri, size, "internal_error", f"{type(err).__name__}: {err}")
        return row

    def _decode(self, path: str, info: VideoInfo, row: dict) -> None:
        config = self.config
        set_frame_sizes(info, config)
        failures = []
        for backend in config.decode.backends:
            try:
                self._run_backend(path, info, backend, row)
                return
            except DecodeFailed as err:
                failures.append(f"{backend}: {err}")
        raise VideoRejected("decode_error", "; ".join(failures))

    def _run_backend(self, path: str, info: VideoInfo, backend: str, row: dict) -> None:
        config = self.config
        shots = ShotDetector(config.shots, info.fps)
        motion = MotionScorer(config.motion, info.fps)
        assembler = ClipAssembler(config, info, row["video_id"], motion)
        pending: deque[Frame] = deque()
        count = 0
        last_time = 0.0

        def drain(limit: int) -> None:
            if not pending or pending[0].index >= limit:
                return
            bounds = shots.boundaries()
            starts = sorted(bounds.cuts + [t.start_frame for t in bounds.transitions])
            while pending and pending[0].index < limit:
                frame = pending.popleft()
                following = [s for s in starts if s > frame.index]
                next_boundary = following[0] if following else math.inf
                assembler.add(frame, bounds.cuts, bounds.transitions, next_boundary)

        for frame in decode_frames(path, info, backend, config.decode):
            if motion.wants(frame.index, frame.time_s):
                motion.push(frame.index, frame.time_s, frame.analysis)
            shots.push(frame.index, frame.analysis)
            # Scale to the working size now, or never: a pending frame must not hold the decoder's full-size picture.
            if assembler.on_grid(frame):
                frame.rgb  # noqa: B018
            else:
                frame.release()
            pending.append(frame)
            count += 1
            last_time = frame.time_s
            # A frame is placed once its boundary status and the trim window after it are final.
            drain(shots.finalized_until - assembler.trim)
        shots.finish()
        drain(math.inf)
        assembler.finish()
        bounds = shots.boundaries()
        row.update(
            backend=backend, fps=info.fps, width=info.width, height=info.height, rotation=info.rotation,
            start_time_s=info.start_time_s, num_frames=count,
            duration_s=(last_time + 1.0 / info.fps) if count else 0.0,
            cut_frames=bounds.cuts,
            transitions=[{"start_frame": t.start_frame, "end_frame": t.end_frame, "kind": t.kind}
                         for t in bounds.transitions],
            motion_mean=motion.mean_magnitude(),
            clips=assembler.clips,
        )

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        batch = pa.table(batch) if isinstance(batch, dict) else batch
        rows = [self.process(r["video_id"], r["uri"], int(r["size_bytes"])) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=schema.STAGED)
