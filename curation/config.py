"""The curation config: one nested dataclass per stage family. Defaults run on a laptop CPU."""

from __future__ import annotations

from dataclasses import dataclass, field

VIDEO_EXTENSIONS = [".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"]


@dataclass
class DiscoverConfig:
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    # video_id hashes the size plus this many bytes from the start, middle and end of the file: a renamed or
    # copied file keeps its id, and ids are cheap to compute on object stores.
    id_sample_bytes: int = 4 << 20


@dataclass
class DecodeConfig:
    # Tried in order. PyAV first: decord's native decode thread runs ahead of a slower consumer without bound
    # (dmlc/decord#157), so a worker's memory grew 4.2x from a 1- to a 10-minute 720p video (bench/README.md);
    # PyAV stays flat (1.06x) at the same speed. decord remains the fallback.
    backends: list[str] = field(default_factory=lambda: ["pyav", "decord"])
    work_short_side: int = 256  # frames are decoded straight to this short side (never upscaled)
    threads: int = 1  # decoder threads per video; Ray parallelism is across videos
    chunk_frames: int = 16  # frames fetched per decoder call (bounded memory)
    # Limits that protect workers from hostile or broken files.
    min_side: int = 16
    max_side: int = 8192
    max_duration_s: float = 4 * 3600.0
    max_frames: int = 1_000_000
    max_fps: float = 1000.0
    max_file_bytes: int = 64 << 30


@dataclass
class ShotsConfig:
    """Cascaded cut detection on frames downscaled to `analysis_width` (see curation/shots.py)."""

    analysis_width: int = 256
    # Stage 1: AdaptiveDetector on the HSV content score, for clear hard cuts.
    content_threshold: float = 15.0
    adaptive_threshold: float = 3.0
    adaptive_window: int = 2
    # Stage 2: AdaptiveDetector on luma only, for cuts small in absolute terms but large against a static context
    # (slide changes, cuts between similar shots); the ratio keeps fast motion from triggering it.
    luma_adaptive_threshold: float = 5.0
    adaptive_min_content: float = 3.0
    # Stage 3: ThresholdDetector for fades to and from black (mean intensity below this is "black").
    fade_threshold: float = 12.0
    # Stage 4: gradual transitions: frames `gradual_stride` apart differ by at least `gradual_threshold` (mean
    # absolute grey difference) while the middle frame is within `gradual_linearity` of their average, for at
    # least `gradual_min_run` consecutive centres.
    gradual_stride: int = 4
    gradual_threshold: float = 12.0
    gradual_linearity: float = 0.2
    gradual_min_run: int = 3
    max_transition_seconds: float = 1.5
    min_shot_seconds: float = 0.3  # cuts closer than this are merged (flashes)
    # Clips are shots minus transitions, trimmed, at least min_seconds long, split into windows of max_seconds.
    trim_seconds: float = 0.1
    min_seconds: float = 2.0
    max_seconds: float = 10.0


@dataclass
class MotionConfig:
    """Dense optical flow (OpenCV Farneback) on downscaled grey frames."""

    fps: float = 2.0
    analysis_width: int = 256
    static_threshold: float = 0.5  # clips whose median flow is below this (px per second at analysis width)
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2
    # "reelforge": px/s at analysis width, sampled at `fps`. "video2dataset": the exact configuration of
    # video2dataset's OpticalFlowSubsampler test (first `upstream_frames` frames, every int(native_fps / fps)-th,
    # full resolution, mean flow magnitude per pair in px); it decodes at full resolution, so it is slow.
    mode: str = "reelforge"
    upstream_frames: int = 100


@dataclass
class KeyframesConfig:
    jpeg_quality: int = 90


@dataclass
class EncodeConfig:
    short_side: int = 256
    codec: str = "libx264"
    crf: int = 23
    preset: str = "veryfast"
    container: str = "mp4"


@dataclass
class FilterConfig:
    drop_static: bool = True
    min_seconds: float = 2.0


@dataclass
class OutputConfig:
    shard_rows: int = 256  # kept clips per training shard file
    table_rows: int = 100_000  # rows per file of videos/ and clips/


@dataclass
class RayConfig:
    address: str | None = None  # None: join RAY_ADDRESS or a running cluster, else start a local one
    num_cpus: int | None = None  # for a local cluster; None lets Ray count the cores
    video_workers: int | None = None  # concurrent video actors; None: one per CPU
    cpus_per_video: float = 1.0


@dataclass
class CurateConfig:
    input: str = ""
    output: str = ""
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shots: ShotsConfig = field(default_factory=ShotsConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    keyframes: KeyframesConfig = field(default_factory=KeyframesConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    output_files: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
