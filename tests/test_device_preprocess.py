"""Keyframes preprocessed as one batch (models/image_batch.py) against open_clip's own PIL transform, and CoCa's
KV-cached decoding (models/coca_cache.py) against its uncached forward. CPU only, tiny random models."""

import io

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from models import image_batch
from models.captioner import CocaCaptioner, UncachedSteps
from models.clip_scorer import ClipScorer
from models.coca_cache import CachedCocaDecoder
from models.image_batch import JpegDecoder, JpegError, PreprocessError, TensorPreprocess

CFG = PreprocessCfg(size=224)
CLIP_224 = TensorPreprocess(224, tuple(CFG.mean), tuple(CFG.std))


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth picture with detail (upscaled noise plus fine noise), like a video frame, as a JPEG."""
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                                   Image.BICUBIC))
    rgb = (smooth.astype(np.int16) + rng.integers(-30, 30, smooth.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


# Working sizes of 16:9 and 9:16 video, a square, 4:3, and one below 224 px (upscaled).
SIZES = [(454, 256), (256, 454), (300, 300), (640, 480), (200, 120)]


def _open_clip(jpegs: list[bytes]) -> torch.Tensor:
    transform = image_transform_v2(CFG, is_train=False)
    return torch.stack([transform(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])


def _pixel_error(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|difference| in 8-bit levels of the picture before normalisation."""
    return ((got - expected) * torch.tensor(CFG.std).view(1, 3, 1, 1)).abs() * 255


def test_batched_preprocess_matches_open_clips_transform_on_the_cpu():
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)] + [_jpeg(454, 256, 9)]  # two of one size
    got = CLIP_224(JpegDecoder(torch.device("cpu"))(jpegs))
    assert got.shape == (len(jpegs), 3, 224, 224) and got.dtype == torch.float32
    error = _pixel_error(got, _open_clip(jpegs))
    # The CPU path resizes uint8 with torch's port of PIL's filter: within a level but for rare pixels.
    assert float(error.mean()) < 0.05 and float(error.max()) < 2.5


def test_the_float_resize_of_the_gpu_path_stays_within_the_stated_tolerance(monkeypatch):
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    monkeypatch.setattr(image_batch, "_resize", image_batch.resize_float)  # what runs on a GPU, here on the CPU
    error = _pixel_error(CLIP_224(JpegDecoder(torch.device("cpu"))(jpegs)), _open_clip(jpegs))
    # Module docstring: on average within 0.5 of a level, at most 8 levels at any pixel.
    assert float(error.mean()) < 0.5 and float(error.max()) < 8.5
    assert float(error.mean()) > 0  # the float path really ran (it is not bit-identical to PIL)


def test_output_size_follows_torchvision_resize_and_the_crop_is_centred():
    assert CLIP_224.output_size(256, 454) == (224, 397)  # int(224 * 454 / 256) = 397
    assert CLIP_224.output_size(454, 256) == (397, 224)
    stripes = torch.zeros((3, 224, 400), dtype=torch.uint8)
    stripes[:, :, 88:312] = 255  # white in the middle 224 columns, black at the sides
    out = CLIP_224([stripes])[0] * torch.tensor(CFG.std).view(3, 1, 1) + torch.tensor(CFG.mean).view(3, 1, 1)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)  # no resize needed, and only white is kept


def test_the_preprocess_is_read_from_the_model_and_unsupported_ones_are_refused():
    scorer = ClipScorer("tiny", device="cpu")
    transform = TensorPreprocess.of_model(scorer.model)
    assert transform.size == 64 and transform.mean == pytest.approx(CFG.mean)
    scorer.model.visual.preprocess_cfg = dict(scorer.model.visual.preprocess_cfg, resize_mode="longest")
    with pytest.raises(PreprocessError, match="resize_mode longest.*preprocess: pil"):
        TensorPreprocess.of_model(scorer.model)


def test_jpeg_embeddings_agree_with_the_pil_path():
    scorer = ClipScorer("tiny", device="cpu")
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    batched = scorer.embed_jpegs(jpegs)
    reference = scorer.embed_images([Image.open(io.BytesIO(j)) for j in jpegs])
    assert batched.shape == reference.shape and (batched * reference).sum(dim=1).min() > 0.999


def test_a_keyframe_that_is_not_a_jpeg_is_an_error_naming_it():
    decode = JpegDecoder(torch.device("cpu"))
    good = _jpeg(64, 48, 0)
    with pytest.raises(JpegError, match=r"keyframe 1 of 2 is not a JPEG \(it starts b'not '\)"):
        decode([good, b"not a jpeg at all"])
    with pytest.raises(JpegError, match="a keyframe of 2 is not a decodable JPEG: "):
        decode([good, good[:200]])  # cut short


# --- CoCa with a KV cache ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coca():
    return CocaCaptioner("tiny", None, max_tokens=20, min_tokens=2, device="cpu")


def _image_embs(coca, seed: int, n: int) -> torch.Tensor:
    pixels = torch.randn((n, 3, 64, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return coca.model._encode_image(pixels)


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_cached_logits_equal_the_full_forward_at_every_position_with_pad_tokens(coca, correct_cls_mask):
    """Teacher-forced: a token sequence with pad ids (0, "!", which open_clip's text tower masks) in it."""
    coca.model.text.correct_cls_mask = correct_cls_mask
    try:
        latent, embs = _image_embs(coca, 0, 3)
        tokens = torch.randint(1, 49000, (3, 12), generator=torch.Generator().manual_seed(1))
        tokens[:, 0] = coca.sot
        tokens[0, 3] = tokens[0, 4] = tokens[1, 7] = tokens[2, 11] = coca.model.text.pad_id
        decoder = CachedCocaDecoder(coca.model, embs, max_len=12)
        cached = torch.stack([decoder.step(tokens[:, p]) for p in range(12)], dim=1)  # (3, 12, vocab)
        with torch.no_grad():
            full = coca.model(None, tokens, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
        assert torch.allclose(cached, full, atol=1e-4, rtol=1e-4)
        # ...and the mask matters: without the pad rule, positions after a pad would differ
        decoder = CachedCocaDecoder(coca.model, embs, max_len=12)
        decoder.pad_id = None
        unmasked = torch.stack([decoder.step(tokens[:, p]) for p in range(12)], dim=1)
        assert not torch.allclose(unmasked[0, 5:], full[0, 5:], atol=1e-3)
    finally:
        coca.model.text.correct_cls_mask = False


def test_cached_greedy_decoding_gives_exactly_the_uncached_tokens(coca):
    pixels = torch.randn((6, 3, 64, 64), generator=torch.Generator().manual_seed(2))
    coca.kv_cache = True
    cached = coca.generate_pixels(pixels)
    coca.kv_cache = False
    try:
        uncached = coca.generate_pixels(pixels)
    finally:
        coca.kv_cache = True
    assert cached.shape == uncached.shape and cached.shape[1] > 3
    assert torch.equal(cached, uncached)
    assert len({tuple(row) for row in cached.tolist()}) > 1  # the images give different captions


def test_uncached_steps_are_coca_forward_on_the_prefix(coca):
    latent, embs = _image_embs(coca, 3, 2)
    steps = UncachedSteps(coca.model, latent, embs)
    first = steps.step(torch.full((2,), coca.sot))
    second = steps.step(torch.tensor([400, 500]))
    with torch.no_grad():
        full = coca.model(None, torch.tensor([[coca.sot, 400], [coca.sot, 500]]), image_latent=latent,
                          image_embs=embs, output_labels=False)["logits"]
    assert torch.allclose(first, full[:, 0], atol=1e-5) and torch.allclose(second, full[:, 1], atol=1e-5)


def test_the_cache_refuses_more_positions_than_the_context(coca):
    _, embs = _image_embs(coca, 4, 1)
    with pytest.raises(ValueError, match="exceed the model's context"):
        CachedCocaDecoder(coca.model, embs, max_len=1000)


def test_captions_from_jpegs_match_captions_from_pil_pictures(coca):
    jpegs = [_jpeg(454, 256, seed) for seed in range(3)]
    assert coca.caption_jpegs(jpegs) == coca.caption([Image.open(io.BytesIO(j)) for j in jpegs])


def test_the_cache_names_what_it_cannot_decode(coca):
    from models.coca_cache import supports

    assert supports(coca.model) is None
    coca.model.text_decoder.set_grad_checkpointing(True)
    try:
        assert supports(coca.model) == "grad checkpointing is on"
        with pytest.raises(ValueError, match="grad checkpointing is on"):
            CachedCocaDecoder(coca.model, _image_embs(coca, 5, 1)[1], max_len=4)
    finally:
        coca.model.text_decoder.set_grad_checkpointing(False)
    assert "not an open_clip CoCa" in supports(ClipScorer("tiny", device="cpu").model)


# --- the stages' switch between the two paths ----------------------------------------------------------------------


def _staged(jpegs: list[bytes]):
    import pyarrow as pa

    from curation import schema

    clip = {name: None for name in schema.STAGED.field("clips").type.value_type.names}
    clip.update(clip_id="v-0", video_id="v", start_s=0.0, end_s=2.0, keyframes=jpegs, kept=True)
    video = {name: None for name in schema.STAGED.names}
    video.update(video_id="v", uri="/nonexistent/v.mp4", status="ok", clips=[clip])
    return pa.Table.from_pylist([video], schema=schema.STAGED)


def test_clip_score_stage_paths_agree_and_a_wrong_setting_is_refused():
    from curation.clip_scores import ClipScoreStage
    from curation.config import ClipScoreConfig

    staged = _staged([_jpeg(454, 256, seed) for seed in range(3)])
    embeddings = {}
    for preprocess in ("tensor", "pil"):
        stage = ClipScoreStage(ClipScoreConfig(preprocess=preprocess, device="cpu"))
        stage.setup()
        embeddings[preprocess] = torch.tensor(stage(staged).to_pylist()[0]["clips"][0]["clip_embedding"])
    assert float(embeddings["tensor"] @ embeddings["pil"]) > 0.999
    with pytest.raises(ValueError, match="clip_scores.preprocess='gpu' is not one of tensor, pil"):
        ClipScoreStage(ClipScoreConfig(preprocess="gpu")).setup()


def test_caption_stage_follows_kv_cache_and_preprocess_settings():
    from curation.captions import CaptionStage
    from curation.config import CaptionConfig

    stage = CaptionStage(CaptionConfig(kv_cache=False, preprocess="pil", max_tokens=5, sidecar=False, device="cpu"))
    stage.setup()
    assert stage.captioner.kv_cache is False
    caption = stage(_staged([_jpeg(454, 256, seed) for seed in range(3)])).to_pylist()[0]["clips"][0]["caption"]
    assert caption
    with pytest.raises(ValueError, match="captions.preprocess='cuda' is not one of tensor, pil"):
        CaptionStage(CaptionConfig(preprocess="cuda")).setup()
