"""Latent end to end without Ray, with a tiny random reelforge causal VAE as the codec (its output means nothing; only
shapes, seeding and bookkeeping are checked): the latent cache holds the VAE's distribution, training draws x0 from it,
and an exported model carries its codec so a fresh process rebuilds the pair and decodes its samples through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from encode_here import encode_here
from test_dataset import SHORT, VERSION_1, _write_version

from models.causal_vae import CausalVAE, CausalVAEConfig
from models.codec import CodecConfig, build_codec
from models.schedules import NoiseSchedule, ScheduleConfig
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.vdit import VDiT, vdit_config
from pipelines.config import load_config
from training.export import load_model, save_model
from training.latent_dataset import CachedInputs, LatentLoader, LatentTable
from training.latent_encode import EncodeConfig

STAGE = "{name: v, steps: 1, num_frames: 5, fps: 8.0, size: 16}"  # 1 + 2k frames: the VAE below halves time


def _save_vae(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = CausalVAEConfig(latent_channels=4, block_channels=[8, 8, 8], time_compression=2, space_compression=4,
                             norm_groups=4)
    CausalVAE(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> CodecConfig:
    return CodecConfig(kind="reelforge-vae", model=str(_save_vae(tmp_path_factory.mktemp("vae"), 0)))


@pytest.mark.slow
def test_a_vae_cache_holds_its_distribution_and_training_samples_from_it(vae, tmp_path):
    _write_version(tmp_path / "curated", 1, VERSION_1)
    config = load_config(EncodeConfig, None, [f"curriculum=[{STAGE}]", "commit_clips=4"],
                         base={"data": f"{tmp_path / 'curated'}@v1", "output": str(tmp_path / "latents"),
                               "codec": {"kind": vae.kind, "model": vae.model}})
    encoded = encode_here(config)
    # every clip of version 1 but those too short for 5 frames and the undecodable one
    assert encoded.committed == len(VERSION_1) - len(SHORT & set(VERSION_1)) - 1
    table = LatentTable.open(str(tmp_path / "latents"))
    codec = build_codec(vae)
    assert table.codec == codec.id and codec.id != "pixels"
    with LatentLoader(table, config.curriculum[0], 1, 0, 0, 1, 2) as loader:
        batch = loader.batch(0)
    assert batch.mean.shape == (2, *codec.latent_shape(5, 16, 16)) == (2, 4, 3, 4, 4)
    assert batch.logvar is not None and np.isfinite(batch.logvar).all()
    inputs = CachedInputs(table.null_text(), 0.0, torch.device("cpu"))
    x0 = inputs(batch, None, torch.Generator().manual_seed(0))[0]
    again = inputs(batch, None, torch.Generator().manual_seed(0))[0]
    mean = torch.from_numpy(batch.mean.astype(np.float32))
    assert torch.equal(x0, again) and not torch.allclose(x0, mean)  # a draw, seeded, not the mean
    std = torch.exp(0.5 * torch.from_numpy(batch.logvar.astype(np.float32)))
    assert float(((x0 - mean) / std).std()) == pytest.approx(1.0, abs=0.25)


def _export(vae: CodecConfig, folder: Path) -> str:
    """A VDiT over the VAE's latents exported as training/loop.py's _export writes it."""
    codec = build_codec(vae)
    text = FrozenTextEncoder(TextEncoderConfig())
    model_config = vdit_config("VDiT-T/2", in_channels=codec.channels, context_dim=text.width)
    stage = {"name": "v", "steps": 1, "num_frames": 5, "fps": 8.0, "size": 16}
    extra = {"preset": "VDiT-T/2", "steps": 1, "codec": codec.id, "codec_config": codec.describe()["config"],
             "curriculum": [stage], "sampling": {"num_steps": 2, "cfg_scale": 1.0}}
    save_model(folder, VDiT(model_config).state_dict(), model_config, text, ScheduleConfig(), extra)
    return codec.id


FRESH = """
import json, sys
from training.export import load_model
from training.generate import generate_videos
loaded = load_model(sys.argv[1])
videos = generate_videos(loaded, loaded.codec, ["a red circle"], [3], 5, 16, 16, 2, 1.0)
print(json.dumps({"codec": loaded.codec.id, "shape": list(videos.shape), "dtype": str(videos.dtype)}))
"""


@pytest.mark.slow
def test_an_exported_latent_model_rebuilds_its_codec_in_a_fresh_process(vae, tmp_path):
    codec_id = _export(vae, tmp_path / "model")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "model")], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # 3 latent frames of 4 x 4 decode to 5 frames of 16 x 16: sampled in the VAE's space, decoded through it
    assert got == {"codec": codec_id, "shape": [1, 5, 16, 16, 3], "dtype": "uint8"}
    _save_vae(Path(vae.model), seed=1)  # other weights where the codec was: the pair no longer matches
    try:
        with pytest.raises(ValueError, match="the model was trained in codec .* but its codec_config now builds"):
            load_model(tmp_path / "model")
    finally:
        _save_vae(Path(vae.model), seed=0)


def test_an_export_from_before_codec_config_loads_as_pixels(tmp_path):
    text = FrozenTextEncoder(TextEncoderConfig())
    model_config = vdit_config("VDiT-T/2", context_dim=text.width)
    save_model(tmp_path, VDiT(model_config).state_dict(), model_config, text, ScheduleConfig(), {"codec": "pixels"})
    loaded = load_model(tmp_path)
    assert loaded.codec.id == "pixels" and isinstance(loaded.schedule, NoiseSchedule)
