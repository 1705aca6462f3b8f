"""Evaluation metrics for generated videos: Fréchet distances on pluggable features (I3D for FVD, CLIP frames),
CLIPSIM, temporal quality, prompt adherence on the sample dump's shapes, and generation cost.

Every function takes videos as the evaluate step has them: (B, T, H, W, 3) uint8, i.e. `training.data.to_uint8` of
what `training.sample.generate` returns, and real clips decoded the same way (`training.data.decode_clip`).
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import scipy.linalg
import scipy.stats
import torch
from PIL import Image

from curation.config import MotionConfig
from curation.motion import MotionScorer
from curation.sample_dump import BACKGROUND_COLORS, DIRECTIONS, SHAPE_COLORS, SHAPES
from models.checksum import sha256_of

# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def feature_statistics(features: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), in float64.

    `ddof=1` is np.cov's unbiased estimate (pytorch-fid); StyleGAN-V's FeatureStats divides by N (`ddof=0`). The two
    differ by a factor N / (N - 1) on the covariance, negligible at the 2048 videos of the standard FVD."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False, ddof=ddof))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # sqrt(S1) S2 sqrt(S1) has the eigenvalues of S1 S2 but is symmetric positive semi-definite, so a symmetric
    # eigensolver applies: no complex parts, and a singular covariance (N < D) only gives zero eigenvalues.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    # The reference FID code's recipe: sqrtm of the product; if that is not finite, retry with eps on the diagonals;
    # drop an imaginary part that is numerical noise, refuse one that is not.
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(sigma1.shape[0])
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"sqrtm of the covariance product has an imaginary component {imaginary:.3g}; "
                             "the covariances are not positive semi-definite")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)): the Fréchet (2-Wasserstein) distance of two Gaussians, squared.

    `method="eigh"` (default) computes tr(sqrt(S1 S2)) from the symmetric form sqrt(S1) S2 sqrt(S1);
    `method="sqrtm"` is the reference FID code's scipy.linalg.sqrtm with an `eps` diagonal offset when the product is
    near-singular. A negative result from round-off is returned as 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(Protocol):
    """What a Fréchet distance needs: a name for its result and (B, T, H, W, 3) uint8 -> (B, D) float64."""

    name: str

    def features(self, videos_uint8: np.ndarray) -> np.ndarray: ...


def _check_videos(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(f"videos must be (B, T, H, W, 3) uint8 (training.data.to_uint8), got {videos.shape} "
                         f"{videos.dtype}")
    return videos


I3D_STYLEGAN_V_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"


class I3DExtractor:
    """Kinetics-400 I3D from a local TorchScript file: the features of the standard FVD.

    The file is the `i3d_torchscript.pt` that StyleGAN-V (Skorokhodov et al. 2022, src/metrics/
    frechet_video_distance.py) and the common PyTorch FVD code load from I3D_STYLEGAN_V_URL (also mirrored on the
    Hugging Face hub as flateon/FVD-I3D-torchscript); universome/fvd-comparison shows it matches the tf.hub
    i3d-kinetics-400/1 module of the original FVD (Unterthiner et al. 2018) to 1e-6 in FVD. Its signature is
    `forward(x, rescale=False, resize=False, return_features=False)`. Protocol, as StyleGAN-V's `fvd2048_16f`:

    - clip: the first `num_frames` (16) consecutive frames of each video, no temporal resampling here. StyleGAN-V
      takes the first 16 frames of generated videos and 16 consecutive frames at a random offset of real ones
      (shorter real videos are discarded). Real and generated clips must have the same frame rate: decode real
      clips at the fps the model generates (training.data.sample_indices / decode_clip with the stage's fps and
      size). Videos shorter than `num_frames` are an error, not padded.
    - input: (B, 3, T, H, W) uint8 in [0, 255], called with rescale=True, resize=True, return_features=True, exactly
      as StyleGAN-V does. rescale=True maps x -> x / 255 * 2 - 1, the [-1, 1] range of the tf.hub I3D (stated by
      StyleGAN-V's author, universome/fvd-comparison#4 and universome/stylegan-v#41). resize=True resizes every
      frame to 224x224 inside the model; its interpolation mode is the file's own code and was NOT verified here
      (third-party notes say bilinear; the original TF code uses tf.image.resize_bilinear; check with
      `print(torch.jit.load(path).code)`). Give it square frames (decode_clip centre-crops real clips), so no
      aspect-ratio question arises.
    - features: return_features=True gives the 400-d Kinetics logits before the softmax, the original FVD's
      "RGB/inception_i3d/Mean:0" logits layer, not the 1024-d pooled features some other FVD code uses.
    - number of videos: 2048 real and 2048 generated for the standard `fvd2048_16f`. Fewer videos bias the
      Fréchet distance upwards (and with N < 400 the covariance is singular): compare FVDs only at equal N and
      report N beside them.

    A different `num_frames` makes a different metric, so the name becomes `i3d_{n}f` (result `fvd_i3d_{n}f`).
    """

    def __init__(self, path: str | Path, sha256: str | None = None, num_frames: int = 16, device: str = "cpu",
                 batch_size: int = 8):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"I3D TorchScript file {path} does not exist; download i3d_torchscript.pt "
                                    f"({I3D_STYLEGAN_V_URL}) and pass its path")
        if sha256 is not None:
            actual = sha256_of(path)
            if actual != sha256.strip().lower():
                raise ValueError(f"I3D file {path} has sha256 {actual}, expected {sha256.strip().lower()}: "
                                 "re-download it, or fix the expected digest if the file is the one you meant")
        self.path = path
        self.num_frames = num_frames
        self.device = torch.device(device)
        self.batch_size = batch_size
        # A TorchScript archive is code as well as weights and torch.jit.load has no tensors-only mode (the detector
        # ships only in this form): the file is trusted by its sha256, which EvaluateConfig requires with i3d_path.
        with warnings.catch_warnings():  # torch deprecates TorchScript, but the standard detector only ships as one
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        self.name = "i3d" if num_frames == 16 else f"i3d_{num_frames}f"

    @torch.no_grad()
    def features(self, videos_uint8: np.ndarray) -> np.ndarray:
        videos = _check_videos(videos_uint8)
        if videos.shape[1] < self.num_frames:
            raise ValueError(f"{self.name} needs videos of at least {self.num_frames} frames, got {videos.shape[1]}: "
                             "generate longer videos, or use the frechet_clip_frame distance")
        clips = videos[:, : self.num_frames]
        out = []
        for start in range(0, len(clips), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(clips[start : start + self.batch_size]))  # (b, T, H, W, 3)
            x = x.permute(0, 4, 1, 2, 3).contiguous().to(self.device)  # (b, 3, T, H, W) uint8
            logits = self.model(x, rescale=True, resize=True, return_features=True)  # (b, 400)
            out.append(logits.float().reshape(len(x), -1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def _even_indices(num_frames: int, wanted: int | None) -> np.ndarray:
    if wanted is None or wanted >= num_frames:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, wanted)).astype(int))


class ClipFrameExtractor:
    """Mean over `num_frames` evenly spaced frames of the L2-normalised CLIP image embeddings (not re-normalised).

    Needs no weights beyond the CLIP model the project already uses; the distance on these features is
    `frechet_clip_frame`, a per-frame appearance distance blind to motion, never an FVD."""

    name = "clip_frame"

    def __init__(self, clip_scorer, num_frames: int = 8):
        self.clip_scorer = clip_scorer
        self.num_frames = num_frames

    def features(self, videos_uint8: np.ndarray) -> np.ndarray:
        videos = _check_videos(videos_uint8)
        indices = _even_indices(videos.shape[1], self.num_frames)
        out = []
        for video in videos:
            embeddings = self.clip_scorer.embed_images([Image.fromarray(video[i]) for i in indices])  # (n, D)
            out.append(embeddings.double().mean(dim=0).numpy())
        return np.stack(out)


def frechet_name(extractor: FeatureExtractor) -> str:
    """The metric's name: "fvd_i3d" for the I3D extractor only, "frechet_<name>" for every other feature space."""
    if isinstance(extractor, I3DExtractor):
        return f"fvd_{extractor.name}"
    return f"frechet_{extractor.name}"


def frechet_video_metric(extractor: FeatureExtractor, real_videos: np.ndarray,
                         generated_videos: np.ndarray) -> dict[str, float]:
    """{frechet_name(extractor): distance} between the feature statistics of real and generated videos."""
    mu_real, sigma_real = feature_statistics(extractor.features(real_videos))
    mu_gen, sigma_gen = feature_statistics(extractor.features(generated_videos))
    return {frechet_name(extractor): frechet_distance(mu_real, sigma_real, mu_gen, sigma_gen)}


# ---------------------------------------------------------------------------------------------------------------------
# CLIPSIM


def clipsim(clip_scorer, videos_uint8: np.ndarray, captions: list[str], num_frames: int | None = None) -> np.ndarray:
    """Per video, the mean over frames (all, or `num_frames` evenly spaced) of cosine(caption, frame) in [-1, 1].

    Raw cosine, not the 100x-scaled "CLIP score"; only comparable between runs that use the same CLIP weights."""
    videos = _check_videos(videos_uint8)
    if len(captions) != len(videos):
        raise ValueError(f"got {len(videos)} videos and {len(captions)} captions")
    text = clip_scorer.embed_texts(list(captions)).double()  # (B, D), L2-normalised
    indices = _even_indices(videos.shape[1], num_frames)
    scores = np.empty(len(videos), np.float64)
    for b, video in enumerate(videos):
        frames = clip_scorer.embed_images([Image.fromarray(video[i]) for i in indices]).double()  # (n, D)
        scores[b] = float((frames @ text[b]).mean())
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Temporal quality


def flicker(videos_uint8: np.ndarray) -> np.ndarray:
    """Per video, the mean absolute difference between consecutive frames, on the 0-255 scale (0: a still image).

    Not motion-compensated: real motion adds to it too, so read it against the same number for real clips."""
    videos = _check_videos(videos_uint8)
    if videos.shape[1] < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {videos.shape[1]}")
    diffs = np.abs(np.diff(videos.astype(np.int16), axis=1))  # (B, T-1, H, W, 3)
    return diffs.reshape(len(videos), -1).mean(axis=1, dtype=np.float64)


def motion_scores(videos_uint8: np.ndarray, fps: float, config: MotionConfig | None = None) -> np.ndarray:
    """Per video, curation's MotionScorer score (mean Farneback flow magnitude) with frame i at time i / fps.

    With no `config`, curation's defaults sampled at the video's own `fps`, so every consecutive pair is a flow
    sample (curation's 2 samples/s would leave one pair in a 1 s clip). In "reelforge" mode the unit is px/s on a
    frame scaled to motion.reference_width; flow on a small frame still misses sub-pixel motion, so score real clips
    decoded at the generated size and fps with this same function, never the curation table's scores of the
    full-size videos. NaN for a video with fewer than two samples."""
    videos = _check_videos(videos_uint8)
    config = config if config is not None else dataclasses.replace(MotionConfig(), fps=float(fps))
    scores = np.empty(len(videos), np.float64)
    for b, video in enumerate(videos):
        scorer = MotionScorer(config, fps)
        for i, frame in enumerate(video):
            scorer.push(i, i / fps, np.ascontiguousarray(frame))
        scores[b] = scorer.mean_magnitude()
    return scores


def motion_distribution_distance(real_scores: np.ndarray, generated_scores: np.ndarray) -> dict[str, float]:
    """How far the generated motion-score distribution is from the real one: the 1-D Wasserstein distance (in the
    scores' unit) and median(generated) - median(real) (negative: the model moves less than the data). NaNs dropped."""
    real = np.asarray(real_scores, np.float64)
    generated = np.asarray(generated_scores, np.float64)
    real, generated = real[np.isfinite(real)], generated[np.isfinite(generated)]
    if real.size == 0 or generated.size == 0:
        raise ValueError(f"need finite motion scores on both sides, got {real.size} real and {generated.size} "
                         "generated")
    return {"motion_wasserstein": float(scipy.stats.wasserstein_distance(real, generated)),
            "motion_median_difference": float(np.median(generated) - np.median(real))}


# ---------------------------------------------------------------------------------------------------------------------
# Prompt adherence on the sample dump's shapes


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR, _SHAPE = _alternatives(SHAPE_COLORS), _alternatives(SHAPES)
_DIRECTION, _BACKGROUND = _alternatives(DIRECTIONS), _alternatives(BACKGROUND_COLORS)
_PROMPT_PATTERNS = {
    "moving": re.compile(rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) moving (?P<direction>{_DIRECTION}) "
                         rf"on a (?P<background>{_BACKGROUND}) background"),
    "static": re.compile(rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) standing still "
                         rf"on a (?P<background>{_BACKGROUND}) background"),
    "pan": re.compile(rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) on a (?P<background>tiled) background, "
                      rf"the camera panning (?P<direction>{_DIRECTION})"),
}


def parse_shape_prompt(caption: str) -> dict[str, str | None] | None:
    """A one-shot caption of the sample dump's grammar -> {kind, color, shape, direction, background}, else None.

    kind is "moving", "static" (direction None) or "pan" (direction is the camera's, background "tiled")."""
    text = " ".join(caption.lower().split()).rstrip(".")
    for kind, pattern in _PROMPT_PATTERNS.items():
        match = pattern.fullmatch(text)
        if match:
            fields = match.groupdict()
            return {"kind": kind, "color": fields["color"], "shape": fields["shape"],
                    "direction": fields.get("direction"), "background": fields["background"]}
    return None


# A pixel belongs to the foreground when some channel differs from the background by more than this: half the
# dump's minimum shape/background channel contrast (100).
_FOREGROUND_CONTRAST = 50
_BORDER_TOLERANCE = 40  # a border pixel within this (max over channels) of the background estimate matches it
_MIN_AREA_FRACTION = 0.002  # of the frame: smaller blobs are noise (the demo shape covers ~5% of a 32x32 frame)
_MAX_AREA_FRACTION = 0.35


def _nearest_color(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    """The palette entry nearest to `rgb` and a confidence 1 - d1/d2 (1: exact, 0: halfway to the runner-up)."""
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], np.float64) - rgb, axis=1)
    order = np.argsort(distances)
    d1, d2 = distances[order[0]], distances[order[1]]
    return names[order[0]], float(np.clip(1.0 - d1 / max(d2, 1e-9), 0.0, 1.0))


def _largest_blob(mask: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The largest 8-connected blob of a mask and the fraction of the mask's pixels it holds."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == k, float(stats[k, cv2.CC_STAT_AREA] / mask.sum())


def _mean_blob_flow(contrast: np.ndarray, blobs: list[np.ndarray | None]) -> np.ndarray:
    """Mean Farneback flow (px/frame) inside the blob, over consecutive frame pairs, on the contrast image."""
    flows = []
    for i in range(len(contrast) - 1):
        if blobs[i] is None or blobs[i + 1] is None:
            continue
        flow = cv2.calcOpticalFlowFarneback(contrast[i], contrast[i + 1], None, 0.5, 2, 7, 3, 5, 1.1, 0)
        region = cv2.dilate(blobs[i].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        flows.append(flow[region].mean(axis=0))
    return np.mean(flows, axis=0) if flows else np.full(2, np.nan)


def _direction_name(velocity: np.ndarray, axis: int) -> str:
    if axis == 0:
        return "right" if velocity[0] > 0 else "left"
    return "down" if velocity[1] > 0 else "up"  # image rows grow downwards


def detect_shape_video(video_uint8: np.ndarray, still_px: float | None = None,
                       smooth_px: float | None = None) -> dict[str, Any]:
    """Find the sample dump's moving shape in one (T, H, W, 3) uint8 video with plain pixel analysis.

    Background: the per-channel median of the border pixels of all frames, named after the nearest
    BACKGROUND_COLORS entry. Foreground: pixels that differ from it by more than 50 in some channel; the shape is
    the largest connected blob of each frame. Colour: the mean of the blob's high-contrast core pixels (unblurred),
    named after the nearest SHAPE_COLORS entry. Motion: a least-squares line through the blob centroids; its
    dominant axis and sign give left/right/up/down, or "still" when the fitted displacement is under `still_px`
    (default 1 px per 32 px of the short side). The mean Farneback flow inside the blob (on the contrast image)
    must agree in sign on that axis, or the direction's confidence is halved. Frames are first blurred with a
    Gaussian of `smooth_px` (default 1 px per 32 px) against the pixel noise of generated videos.

    `quality` (0..1) says whether a single compact shape on a plain background was found at all (border pixels
    matching the background, a blob in every frame, of plausible size, holding most of the foreground); every
    confidence is multiplied by it, so noise and empty frames give no confident detection.

    Returns {color, color_confidence, background, background_confidence, direction (left/right/up/down/still or
    None), direction_confidence, displacement_px (dx, dy over the clip), flow_px_per_frame (fx, fy), quality}.
    """
    video = np.asarray(video_uint8)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"video must be (T, H, W, 3) uint8, got {video.shape} {video.dtype}")
    t, h, w, _ = video.shape
    still_px = still_px if still_px is not None else min(h, w) / 32
    smooth_px = smooth_px if smooth_px is not None else min(h, w) / 32
    raw = video.astype(np.float32)
    frames = raw
    if smooth_px > 0:  # a light blur so per-pixel noise of a generated video does not break the shape into specks
        frames = np.stack([cv2.GaussianBlur(f, (0, 0), smooth_px) for f in raw])
    # Unblurred border pixels: blurring would make plain noise look like a flat background.
    border = np.concatenate([raw[:, 0].reshape(-1, 3), raw[:, -1].reshape(-1, 3),
                             raw[:, 1:-1, 0].reshape(-1, 3), raw[:, 1:-1, -1].reshape(-1, 3)])
    background = np.median(border, axis=0)
    border_match = float((np.abs(border - background).max(axis=1) < _BORDER_TOLERANCE).mean())
    background_name, background_confidence = _nearest_color(background, BACKGROUND_COLORS)
    contrast = np.abs(frames - background).max(axis=-1)  # (T, H, W): distance from the background, 0..255
    mask = contrast > _FOREGROUND_CONTRAST

    blobs: list[np.ndarray | None] = []
    centroids, areas, purities, pixels, pixel_contrast = [], [], [], [], []
    for i in range(t):
        found = _largest_blob(mask[i])
        blob = None
        if found is not None and found[0].sum() >= max(2, _MIN_AREA_FRACTION * h * w):
            blob, purity = found
            ys, xs = np.nonzero(blob)
            centroids.append((i, xs.mean(), ys.mean()))
            areas.append(blob.sum() / (h * w))
            purities.append(purity)
            pixels.append(raw[i][blob])  # unblurred: the mean over the core averages the noise out
            pixel_contrast.append(contrast[i][blob])
        blobs.append(blob)

    result: dict[str, Any] = {
        "background": background_name, "background_confidence": background_confidence * border_match,
        "color": None, "color_confidence": 0.0, "direction": None, "direction_confidence": 0.0,
        "displacement_px": (float("nan"), float("nan")), "flow_px_per_frame": (float("nan"), float("nan")),
        "quality": 0.0,
    }
    if not centroids:
        return result
    area = float(np.median(areas))
    plausible = _MIN_AREA_FRACTION <= area <= _MAX_AREA_FRACTION
    quality = border_match * (len(centroids) / t) * float(np.mean(purities)) * float(plausible)
    result["quality"] = quality

    all_pixels, all_contrast = np.concatenate(pixels), np.concatenate(pixel_contrast)
    # Edge pixels are mixed with the background (resizing, blur); the core keeps the shape's own colour.
    core = all_contrast >= 0.6 * np.percentile(all_contrast, 90)
    color, color_confidence = _nearest_color(all_pixels[core].mean(axis=0), SHAPE_COLORS)
    result.update(color=color, color_confidence=color_confidence * quality)

    if len(centroids) < 2:
        return result
    track = np.array(centroids, np.float64)  # (n, 3): frame, x, y
    velocity = np.array([np.polyfit(track[:, 0], track[:, k], 1)[0] for k in (1, 2)])  # px/frame, (vx, vy)
    displacement = velocity * (t - 1)
    axis = int(np.argmax(np.abs(velocity)))
    travel = abs(displacement[axis])
    flow = _mean_blob_flow(np.clip(contrast, 0, 255).astype(np.uint8), blobs)
    result.update(displacement_px=(float(displacement[0]), float(displacement[1])),
                  flow_px_per_frame=(float(flow[0]), float(flow[1])))
    if travel < still_px:
        result.update(direction="still", direction_confidence=float(quality * (1.0 - travel / still_px)))
        return result
    # Straight along one axis (dominance 0.5 is diagonal), far enough, and every step the same way.
    dominance = abs(velocity[axis]) / (np.abs(velocity).sum() + 1e-9)
    axis_score = float(np.clip((dominance - 0.5) / 0.3, 0.0, 1.0))
    travel_score = float(np.clip(travel / (2 * still_px), 0.0, 1.0))
    steps = np.diff(track[:, 1 + axis]) * np.sign(displacement[axis])
    steadiness = float(np.mean(steps > -0.5))  # integer-pixel rendering moves in steps of 0 or 1+ px
    flow_agreement = 1.0 if not np.isfinite(flow[axis]) or np.sign(flow[axis]) == np.sign(velocity[axis]) else 0.5
    result.update(direction=_direction_name(velocity, axis),
                  direction_confidence=quality * axis_score * travel_score * steadiness * flow_agreement)
    return result


def prompt_adherence(videos_uint8: np.ndarray, captions: list[str],
                     min_confidence: float = 0.5) -> dict[str, float | int]:
    """Share of videos whose detected colour / direction / both / background match their caption.

    Scored: captions that parse as a moving or static shot of the sample dump's grammar (a static caption asks for
    "still"); pan and unparsable captions are skipped and `num_scored` says how many counted. A detection below
    `min_confidence` counts as a miss. Chance is 1/6 for colour, 1/4 for direction, 1/24 for both. Accuracies are
    NaN when nothing was scorable."""
    videos = _check_videos(videos_uint8)
    if len(captions) != len(videos):
        raise ValueError(f"got {len(videos)} videos and {len(captions)} captions")
    hits = {"color": [], "direction": [], "both": [], "background": []}
    for video, caption in zip(videos, captions, strict=True):
        prompt = parse_shape_prompt(caption)
        if prompt is None or prompt["kind"] == "pan":
            continue
        detected = detect_shape_video(video)
        wanted_direction = prompt["direction"] if prompt["kind"] == "moving" else "still"
        color_ok = detected["color"] == prompt["color"] and detected["color_confidence"] >= min_confidence
        direction_ok = (detected["direction"] == wanted_direction
                        and detected["direction_confidence"] >= min_confidence)
        background_ok = (detected["background"] == prompt["background"]
                         and detected["background_confidence"] >= min_confidence)
        hits["color"].append(color_ok)
        hits["direction"].append(direction_ok)
        hits["both"].append(color_ok and direction_ok)
        hits["background"].append(background_ok)
    scored = len(hits["color"])
    result = {f"{k}_accuracy": float(np.mean(v)) if scored else float("nan") for k, v in hits.items()}
    result["num_scored"] = scored
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Cost


def timed_generation(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """(fn(*args, **kwargs), wall seconds); waits for queued CUDA work so GPU time is counted."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def model_evaluations_per_video(num_steps: int, cfg_scale: float) -> int:
    """Network evaluations per generated video for `training.sample.generate` (DDIM, classifier-free guidance).

    Convention: one evaluation is one video passing through the network once. With guidance (cfg_scale != 1) the
    conditional and unconditional halves run as one forward of 2B videos, which counts as 2 per video per step, so
    2 * num_steps; without it, num_steps. A student with guidance distilled into it is called with cfg_scale=1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return num_steps * (2 if cfg_scale != 1.0 else 1)
