"""The causal video VAE (models/causal_vae.py) and the pieces of its training that need no cluster: shapes at every
compression, causality in time, the first frame encoded alone, exact save/load, the loss, PSNR/SSIM, the held-out
split and the config's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.causal_vae import CausalVAE, CausalVAEConfig
from training.vae.quality import psnr, side_by_side, ssim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(time: int = 4, space: int = 4, latent: int = 4) -> CausalVAE:
    stages = [8, 16, 16] if space == 4 else [8, 16, 16, 16]
    torch.manual_seed(0)
    return CausalVAE(CausalVAEConfig(latent_channels=latent, block_channels=stages, time_compression=time,
                                     space_compression=space, norm_groups=4)).eval()


@pytest.mark.parametrize("time,space", [(1, 4), (2, 4), (4, 4), (4, 8)])
@pytest.mark.parametrize("frames", [1, 9])
def test_shapes(time, space, frames):
    model = _tiny(time, space)
    x = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode(x)
        out = model.decode(mean)
    latent_frames = 1 + (frames - 1) // time
    assert mean.shape == logvar.shape == (2, 4, latent_frames, 16 // space, 24 // space)
    assert model.latent_shape(tuple(x.shape)) == tuple(mean.shape)
    assert out.shape == x.shape
    assert (model.latent_channels, model.time_compression, model.space_compression) == (4, time, space)


@pytest.mark.parametrize("time", [1, 4])
def test_changing_frame_k_leaves_earlier_latents_alone(time):
    model = _tiny(time)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    k = 5  # in latent frame ceil(k / time)
    changed = x.clone()
    changed[:, :, k] = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        (a, _), (b, _) = model.encode(x), model.encode(changed)
        decoded_a, decoded_b = model.decode(a), model.decode(b)
    first_affected = -(-k // time)
    assert torch.equal(a[:, :, :first_affected], b[:, :, :first_affected])
    assert not torch.allclose(a[:, :, first_affected], b[:, :, first_affected])  # the change does reach it
    # the decoder is causal too: frames decoded from the unchanged latent frames are unchanged
    unchanged_frames = 1 + (first_affected - 1) * time
    assert torch.equal(decoded_a[:, :, :unchanged_frames], decoded_b[:, :, :unchanged_frames])


def test_first_frame_is_encoded_alone_so_an_image_is_a_one_frame_video():
    model = _tiny(4)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        video_mean, _ = model.encode(x)
        image_mean, _ = model.encode(x[:, :, :1])
    assert image_mean.shape[2] == 1
    torch.testing.assert_close(image_mean, video_mean[:, :, :1], rtol=0, atol=1e-5)


def test_bad_shapes_are_one_line_errors():
    model = _tiny(4)
    with pytest.raises(ValueError, match=r"8 frames cannot be encoded at time compression 4; use 1 \+ 4k"):
        model.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the space compression 4"):
        model.encode(torch.zeros(1, 3, 5, 18, 16))
    with pytest.raises(ValueError, match="space_compression: 8 needs 3 downsamplings"):
        CausalVAE(CausalVAEConfig(block_channels=[8, 16, 16], space_compression=8, time_compression=1,
                                  norm_groups=4))


def test_save_and_load_round_trip_is_exact(tmp_path):
    from models.checksum import sha256_of

    model = _tiny(4)
    model.config.scaling_factor = 0.7
    weights = model.save_pretrained(tmp_path / "vae")
    loaded = CausalVAE.from_pretrained(tmp_path / "vae", sha256=sha256_of(weights))
    assert loaded.config == model.config and loaded.scaling_factor == 0.7
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)[0]), loaded.eval().decode(loaded.encode(x)[0]))
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "CausalVAE"
    with pytest.raises(ValueError, match="sha256 is .* expected 00"):
        CausalVAE.from_pretrained(tmp_path / "vae", sha256="00" * 32)
    with pytest.raises(FileNotFoundError, match="not a CausalVAE folder"):
        CausalVAE.from_pretrained(tmp_path)


def test_vae_loss_terms():
    from training.vae.config import VAELossConfig
    from training.vae.loss import vae_loss

    x = torch.zeros(1, 3, 1, 4, 4)
    out = torch.full_like(x, 0.5)
    zero, one = torch.zeros(1, 2, 1, 1, 1), torch.ones(1, 2, 1, 1, 1)
    assert vae_loss(x, out, zero, zero, VAELossConfig("l1", kl_weight=1.0)).item() == pytest.approx(0.5)
    assert vae_loss(x, out, zero, zero, VAELossConfig("l2", kl_weight=1.0)).item() == pytest.approx(0.25)
    # KL of N(1, 1) to N(0, 1) is 0.5 per latent value: 2 values over 48 pixel values
    assert vae_loss(x, x, one, zero, VAELossConfig("l1", kl_weight=1.0)).item() == pytest.approx(1.0 / 48)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 2, 24, 24, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = np.clip(a[1].astype(int) + rng.choice([-4, 4], a[1].shape), 0, 255)
    mse = ((a[1].astype(float) - b[1]) / 255) ** 2
    scores = psnr(a, b)
    assert scores[0] > 90 and scores[1] == pytest.approx(10 * np.log10(1 / mse.mean()))
    s = ssim(a, b)
    assert s[0] == pytest.approx(1.0) and 0.9 < s[1] < 1.0
    flat = np.full_like(a, 128)
    assert ssim(a, flat).max() < 0.1  # structure lost
    with pytest.raises(ValueError, match="two .* videos of one shape"):
        psnr(a, b[:, :1])
    grid = side_by_side(a, b)
    assert grid.shape == (2, 2 * 24 + 2, 2 * 24 + 2, 3)
    assert np.array_equal(grid[:, :24, :24], a[0]) and np.array_equal(grid[:, 26:, 26:], b[1])


def test_heldout_rows_are_chosen_by_clip_id():
    from training.vae.heldout import heldout_rows

    ids = [f"clip-{i}" for i in range(20)]
    held = heldout_rows(ids, 4)
    assert len(held) == 4 and held == sorted(held)
    # the same clips whatever the row order
    assert {ids[r] for r in held} == {ids[::-1][r] for r in heldout_rows(ids[::-1], 4)}


def test_config_errors_name_the_key():
    from pipelines.config import load_config
    from training.config import ConfigError
    from training.vae.config import VAETrainConfig

    load_config(VAETrainConfig, "configs/train-vae.yaml").validate()
    cases = {"model.preset=VDiT-S/2": "model: not used by train-vae",
             "curriculum=[{num_frames: 8, size: 32}]": r"num_frames 8 is not 1 \+ 4k .* use num_frames 5 or 9",
             "curriculum=[{num_frames: 9, size: 30}]": "size 30 is not divisible by the space compression 4",
             "vae.overrides={colour: 1}": "vae.overrides.colour: not a CausalVAEConfig field",
             "vae.preset=nope": "vae.preset: unknown preset",
             "loss.reconstruction=l3": "loss.reconstruction: expected one of",
             "eval.heldout_clips=0": "eval.heldout_clips: expected a value above 0"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(VAETrainConfig, None, [override]).validate()
