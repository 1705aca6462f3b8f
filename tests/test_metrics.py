"""Evaluation metrics against known answers: closed-form and scipy Fréchet distances, a scripted stand-in for the I3D
TorchScript file, tiny random CLIP, translating textures for motion, and sample-dump renders for prompt adherence."""

from __future__ import annotations

import hashlib
import time
import warnings

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from curation.config import MotionConfig
from curation.sample_dump import BACKGROUND_COLORS, DIRECTIONS, SHAPE_COLORS, _Sampler
from training.data import sample_indices
from training.metrics import (
    ClipFrameExtractor,
    I3DExtractor,
    clipsim,
    detect_shape_video,
    feature_statistics,
    flicker,
    frechet_distance,
    frechet_name,
    frechet_video_metric,
    model_evaluations_per_video,
    motion_distribution_distance,
    motion_scores,
    parse_shape_prompt,
    prompt_adherence,
    timed_generation,
)

METHODS = ("eigh", "sqrtm")


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _scipy_reference(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


@pytest.mark.parametrize("method", METHODS)
def test_frechet_diagonal_gaussians_closed_form(method):
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2), method=method) == pytest.approx(expected, rel=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method=method) == pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_commuting_covariances_closed_form(method):
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # shared eigenvectors: the covariances commute
    a, b = rng.uniform(0.05, 2.0, 8), rng.uniform(0.05, 2.0, 8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((m1 - m2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(m1, s1, m2, s2, method=method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_frechet_matches_scipy_sqrtm_on_random_spd(method, seed):
    rng = np.random.default_rng(seed)
    d = 24
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(m1, s1, m2, s2, method=method) == pytest.approx(_scipy_reference(m1, s1, m2, s2),
                                                                           rel=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_identical_is_zero_and_symmetric(method):
    rng = np.random.default_rng(5)
    s1, s2 = _random_spd(rng, 12), _random_spd(rng, 12)
    m1, m2 = rng.normal(size=12), rng.normal(size=12)
    assert frechet_distance(m1, s1, m1, s1, method=method) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(m1, s1, m2, s2, method=method) == pytest.approx(
        frechet_distance(m2, s2, m1, s1, method=method), rel=1e-9)
    assert frechet_distance(m1, s1, m2, s2, method=method) > 0


def test_frechet_singular_covariances_from_few_samples():
    # Fewer samples than dimensions (the evaluate step's regime with few prompts): rank-deficient covariances.
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(10, 32)), rng.normal(0.5, 1.0, size=(10, 32))
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    assert np.linalg.matrix_rank(s1) < 32
    exact = frechet_distance(m1, s1, m2, s2, method="eigh")
    with_eps = frechet_distance(m1, s1, m2, s2, method="sqrtm", eps=1e-6)
    assert np.isfinite(exact) and exact > 0
    assert with_eps == pytest.approx(exact, rel=1e-3)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_and_errors():
    x = np.random.default_rng(7).normal(size=(50, 5))
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))
    _, sigma_n = feature_statistics(x, ddof=0)  # StyleGAN-V's FeatureStats divides by N
    np.testing.assert_allclose(sigma_n, sigma * 49 / 50)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_statistics(x[0])
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, sigma, mu, sigma, method="svd")


# ---------------------------------------------------------------------------------------------------------------------
# Feature extractors


class _FakeI3D(torch.nn.Module):
    """The call signature of i3d_torchscript.pt; its 'features' expose what it was given."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        dtype_was_uint8 = float(x.dtype == torch.uint8)
        num_frames = float(x.shape[2])
        x = x.float()
        if rescale:
            x = x / 255.0 * 2.0 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        b = x.shape[0]
        first_frame_mean = x[:, :, 0].mean(dim=(1, 2, 3))  # (b,)
        last_frame_mean = x[:, :, -1].mean(dim=(1, 2, 3))
        info = torch.tensor([num_frames, float(x.shape[3]), float(rescale), float(resize), float(return_features),
                             dtype_was_uint8])
        return torch.cat([first_frame_mean[:, None], last_frame_mean[:, None], info.expand(b, 6)], dim=1)


@pytest.fixture(scope="module")
def fake_i3d_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated; the real file is TorchScript all the same
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_FakeI3D()).save(str(path))
    return path


def _frame_index_video(batch: int, frames: int, size: int = 8) -> np.ndarray:
    """Frame i of every video has the value 10 * i everywhere."""
    values = (10 * np.arange(frames, dtype=np.uint8))[None, :, None, None, None]
    return np.broadcast_to(values, (batch, frames, size, size, 3)).copy()


def test_i3d_extractor_follows_the_protocol(fake_i3d_path):
    extractor = I3DExtractor(fake_i3d_path, batch_size=2)
    features = extractor.features(_frame_index_video(3, 20))
    assert features.shape == (3, 8) and features.dtype == np.float64
    first, last, num_frames, height, rescale, resize, return_features, was_uint8 = features[0]
    assert num_frames == 16  # the first 16 frames: values 0 .. 150
    assert first == pytest.approx(-1.0) and last == pytest.approx(150 / 255 * 2 - 1, abs=1e-6)
    assert (height, rescale, resize, return_features, was_uint8) == (224, 1, 1, 1, 1)
    assert extractor.name == "i3d" and frechet_name(extractor) == "fvd_i3d"


def test_i3d_extractor_checksum(fake_i3d_path):
    digest = hashlib.sha256(fake_i3d_path.read_bytes()).hexdigest()
    assert I3DExtractor(fake_i3d_path, sha256=digest.upper()).name == "i3d"
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        I3DExtractor(fake_i3d_path, sha256=wrong)
    message = str(err.value)
    assert str(fake_i3d_path) in message and digest in message and wrong in message


def test_i3d_extractor_errors_and_nonstandard_length(fake_i3d_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        I3DExtractor(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="at least 16 frames"):
        I3DExtractor(fake_i3d_path).features(_frame_index_video(1, 8))
    with pytest.raises(ValueError, match="uint8"):
        I3DExtractor(fake_i3d_path).features(np.zeros((1, 16, 8, 8, 3), np.float32))
    short = I3DExtractor(fake_i3d_path, num_frames=8)
    assert short.features(_frame_index_video(1, 8))[0, 2] == 8
    assert frechet_name(short) == "fvd_i3d_8f"


@pytest.fixture(scope="module")
def clip_scorer():
    from models.clip_scorer import ClipScorer

    return ClipScorer("tiny", device="cpu")


def _color_video(colors: list[tuple[int, int, int]], size: int = 32) -> np.ndarray:
    return np.stack([np.full((size, size, 3), c, np.uint8) for c in colors])


def test_clip_frame_extractor_is_mean_of_evenly_sampled_frame_embeddings(clip_scorer):
    from PIL import Image

    rng = np.random.default_rng(8)
    videos = rng.integers(0, 256, (2, 8, 32, 32, 3), dtype=np.uint8)
    extractor = ClipFrameExtractor(clip_scorer, num_frames=4)
    features = extractor.features(videos)
    assert features.shape == (2, clip_scorer.embed_dim) and features.dtype == np.float64
    for video, row in zip(videos, features, strict=True):
        frames = [Image.fromarray(video[i]) for i in (0, 2, 5, 7)]  # round(linspace(0, 7, 4))
        expected = clip_scorer.embed_images(frames).double().mean(dim=0).numpy()
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)
    assert extractor.name == "clip_frame"
    assert frechet_name(extractor) == "frechet_clip_frame" and "fvd" not in frechet_name(extractor)


def test_frechet_video_metric_with_clip_frames(clip_scorer):
    rng = np.random.default_rng(9)
    flat = np.stack([_color_video([tuple(rng.integers(0, 256, 3))] * 2) for _ in range(6)])
    noise = rng.integers(0, 256, (6, 2, 32, 32, 3), dtype=np.uint8)
    extractor = ClipFrameExtractor(clip_scorer, num_frames=2)
    same = frechet_video_metric(extractor, flat, flat)
    different = frechet_video_metric(extractor, flat, noise)
    assert list(same) == ["frechet_clip_frame"]
    assert same["frechet_clip_frame"] == pytest.approx(0.0, abs=1e-8)
    assert different["frechet_clip_frame"] > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# CLIPSIM


def test_clipsim_is_mean_cosine_over_frames(clip_scorer):
    from PIL import Image

    videos = np.stack([_color_video([(230, 25, 25), (40, 80, 255), (250, 250, 250)]),
                       _color_video([(30, 210, 40)] * 3)])
    captions = ["a red circle moving left on a grey background", "a green square"]
    scores = clipsim(clip_scorer, videos, captions)
    text = clip_scorer.embed_texts(captions).double()
    for b in range(2):
        frames = clip_scorer.embed_images([Image.fromarray(f) for f in videos[b]]).double()
        assert scores[b] == pytest.approx(float((frames @ text[b]).mean()), abs=1e-6)
    assert np.all(np.abs(scores) <= 1.0)
    with pytest.raises(ValueError, match="captions"):
        clipsim(clip_scorer, videos, captions[:1])


# ---------------------------------------------------------------------------------------------------------------------
# Temporal quality


def test_flicker_known_answers():
    still = np.full((1, 5, 8, 8, 3), 77, np.uint8)
    blink = np.stack([np.full((8, 8, 3), 10 * (i % 2), np.uint8) for i in range(5)])[None]
    one_pixel = np.zeros((1, 2, 10, 10, 3), np.uint8)
    one_pixel[0, 1, 3, 3] = 255  # 3 of 300 values change by 255
    np.testing.assert_allclose(flicker(np.concatenate([still, blink])), [0.0, 10.0])
    assert flicker(one_pixel)[0] == pytest.approx(255 * 3 / 300)
    with pytest.raises(ValueError, match="2 frames"):
        flicker(still[:, :1])


def _translating_texture(size: int, px_per_frame: int, frames: int = 8) -> np.ndarray:
    rng = np.random.default_rng(10)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (3 * size, 3 * size, 3)).astype(np.float32), (0, 0), 2.0)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return np.stack([texture[size:2 * size, size - px_per_frame * i:2 * size - px_per_frame * i]
                     for i in range(frames)])


def test_motion_scores_of_a_translation_are_its_speed():
    # A whole-frame translation by 1 or 2 px per frame at 8 fps on a 32-px frame is 8 or 16 px/s, which the curation
    # scorer reports on its 256-px reference width: 64 or 128.
    videos = np.stack([_translating_texture(32, s) for s in (0, 1, 2)])
    scores = motion_scores(videos, fps=8.0)
    to_reference = MotionConfig().reference_width / 32
    assert scores[0] < 0.1 * to_reference
    assert scores[1] == pytest.approx(8.0 * to_reference, rel=0.05)
    assert scores[2] == pytest.approx(16.0 * to_reference, rel=0.05)
    assert np.isnan(motion_scores(videos[:1, :1], fps=8.0)[0])  # one frame: no flow pair


def test_motion_distribution_distance():
    real = np.array([1.0, 2.0, 3.0, 4.0])
    assert motion_distribution_distance(real, real) == {"motion_wasserstein": 0.0, "motion_median_difference": 0.0}
    shifted = motion_distribution_distance(real, real - 1.5)
    assert shifted["motion_wasserstein"] == pytest.approx(1.5)
    assert shifted["motion_median_difference"] == pytest.approx(-1.5)
    with_nan = motion_distribution_distance(real, np.array([np.nan, 1.0, 2.0, 3.0, 4.0]))
    assert with_nan["motion_wasserstein"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="finite"):
        motion_distribution_distance(real, np.array([np.nan]))


# ---------------------------------------------------------------------------------------------------------------------
# Prompt adherence


def test_parse_shape_prompt():
    assert parse_shape_prompt("a red circle moving left on a grey background") == {
        "kind": "moving", "color": "red", "shape": "circle", "direction": "left", "background": "grey"}
    assert parse_shape_prompt("A purple triangle moving up on a dark blue background.")["background"] == "dark blue"
    assert parse_shape_prompt("a white square standing still on a dark green background") == {
        "kind": "static", "color": "white", "shape": "square", "direction": None, "background": "dark green"}
    assert parse_shape_prompt("a blue circle on a tiled background, the camera panning right") == {
        "kind": "pan", "color": "blue", "shape": "circle", "direction": "right", "background": "tiled"}
    for caption in ("a red circle moving left on a grey background, then a blue square standing still on a black "
                    "background", "a cat", "a pink circle moving left on a grey background", ""):
        assert parse_shape_prompt(caption) is None


def test_parse_shape_prompt_reads_every_caption_the_dump_writes():
    sampler = _Sampler(np.random.default_rng(11), 192, 144, 24)
    for i in range(60):
        shot = sampler.shot(("moving", "static", "pan")[i % 3], 0, 71, 0, 71, None)
        parsed = parse_shape_prompt(shot.caption)
        assert parsed == {"kind": shot.kind, "color": shot.color, "shape": shot.shape, "direction": shot.direction,
                          "background": shot.background}


def _demo_video(seed: int, size: int, kind: str = "moving", noise: float = 0.0) -> tuple[np.ndarray, str]:
    """One shot of the sample dump as the demo model sees it: rendered by the dump at 192x144 24 fps, 8 frames at
    8 fps (training.data.sample_indices), short side resized to `size` (area) and centre-cropped like decode_clip."""
    sampler = _Sampler(np.random.default_rng(seed), 192, 144, 24)
    n = sampler.frames(3.0, 5.0)
    shot = sampler.shot(kind, 0, n - 1, 0, n - 1, None)
    width = round(192 * size / 144)
    frames = []
    for index in sample_indices(n, 24, 8, 8.0):
        frame = cv2.resize(shot.render(index, 192, 144, sampler.radius), (width, size), interpolation=cv2.INTER_AREA)
        left = (width - size) // 2
        frames.append(frame[:, left:left + size])
    video = np.stack(frames).astype(np.float32)
    if noise:
        video += np.random.default_rng(seed + 1).normal(0.0, noise, video.shape)
    return np.clip(np.rint(video), 0, 255).astype(np.uint8), shot.caption


def _wrong_caption(caption: str) -> str:
    """Another colour, the opposite direction and another background than the caption says."""
    p = parse_shape_prompt(caption)
    colors, backgrounds = list(SHAPE_COLORS), list(BACKGROUND_COLORS)
    color = colors[(colors.index(p["color"]) + 1) % len(colors)]
    background = backgrounds[(backgrounds.index(p["background"]) + 1) % len(backgrounds)]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[p["direction"]]
    return f"a {color} {p['shape']} moving {opposite} on a {background} background"


@pytest.mark.parametrize(("size", "count"), [(32, 24), (64, 10)])
def test_prompt_adherence_on_rendered_demo_videos(size, count):
    videos, captions = zip(*[_demo_video(seed, size) for seed in range(count)], strict=True)
    videos = np.stack(videos)
    assert {parse_shape_prompt(c)["direction"] for c in captions} == set(DIRECTIONS)
    truth = prompt_adherence(videos, list(captions))
    assert truth == {"color_accuracy": 1.0, "direction_accuracy": 1.0, "both_accuracy": 1.0,
                     "background_accuracy": 1.0, "num_scored": count}
    wrong = prompt_adherence(videos, [_wrong_caption(c) for c in captions])
    assert wrong["color_accuracy"] == wrong["direction_accuracy"] == wrong["background_accuracy"] == 0.0


def test_prompt_adherence_tolerates_pixel_noise_and_still_shots():
    noisy = [_demo_video(100 + seed, 32, noise=15.0) for seed in range(8)]
    still = [_demo_video(200 + seed, 32, kind="static") for seed in range(4)]
    videos, captions = zip(*(noisy + still), strict=True)
    result = prompt_adherence(np.stack(videos), list(captions))
    assert result["both_accuracy"] == 1.0 and result["background_accuracy"] == 1.0
    detected = detect_shape_video(still[0][0])
    assert detected["direction"] == "still" and detected["direction_confidence"] > 0.5


def test_shapes_rendered_by_the_dump_at_demo_resolution():
    # The dump's own sampler at 32x32 and 8 fps: faster, integer-pixel motion of a radius-4 shape.
    sampler = _Sampler(np.random.default_rng(12), 32, 32, 8)
    videos, captions = [], []
    for _ in range(12):
        shot = sampler.shot("moving", 0, 7, 0, 7, None)
        videos.append(np.stack([shot.render(i, 32, 32, sampler.radius) for i in range(8)]))
        captions.append(shot.caption)
    assert prompt_adherence(np.stack(videos), captions)["both_accuracy"] == 1.0


@pytest.mark.parametrize("size", [32, 64])
def test_noise_gives_no_confident_detection(size):
    rng = np.random.default_rng(13)
    noise = rng.integers(0, 256, (6, 8, size, size, 3), dtype=np.uint8)
    for video in noise:
        detected = detect_shape_video(video)
        assert max(detected["color_confidence"], detected["direction_confidence"],
                   detected["background_confidence"], detected["quality"]) < 0.5
    captions = ["a white circle moving left on a grey background"] * len(noise)
    result = prompt_adherence(noise, captions)
    assert result["color_accuracy"] == result["direction_accuracy"] == result["background_accuracy"] == 0.0
    blank = detect_shape_video(np.full((8, size, size, 3), 120, np.uint8))
    assert blank["color"] is None and blank["direction"] is None and blank["background"] == "grey"


def test_prompt_adherence_skips_what_it_cannot_score():
    video, caption = _demo_video(14, 32)
    videos = np.stack([video, video, video])
    captions = [caption, "a blue circle on a tiled background, the camera panning left", "a cat"]
    assert prompt_adherence(videos, captions)["num_scored"] == 1
    nothing = prompt_adherence(videos[:1], ["a cat"])
    assert nothing["num_scored"] == 0 and np.isnan(nothing["both_accuracy"])


# ---------------------------------------------------------------------------------------------------------------------
# Cost


def test_timed_generation():
    result, seconds = timed_generation(lambda x, y=0: (time.sleep(0.05), x + y)[1], 2, y=3)
    assert result == 5 and 0.05 <= seconds < 5.0


def test_model_evaluations_per_video_counts_what_generate_runs():
    from models.schedules import NoiseSchedule, ScheduleConfig
    from training.sample import generate

    rows = []

    def model(x, t, context, mask):  # records how many videos each forward processes
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    def text_encoder(prompts):
        return torch.zeros(len(prompts), 4, 8), torch.ones(len(prompts), 4, dtype=torch.bool)

    schedule = NoiseSchedule(ScheduleConfig())
    for steps, cfg_scale in [(5, 3.0), (4, 1.0)]:
        rows.clear()
        generate(model, text_encoder, schedule, ["a", "b", "c"], num_frames=2, size=4, num_steps=steps,
                 cfg_scale=cfg_scale, seed=0)
        assert sum(rows) / 3 == model_evaluations_per_video(steps, cfg_scale)
    assert model_evaluations_per_video(32, 3.0) == 64 and model_evaluations_per_video(4, 1.0) == 4
    with pytest.raises(ValueError, match="num_steps"):
        model_evaluations_per_video(0, 1.0)
