"""The LAION aesthetic predictor: a small MLP from an L2-normalised CLIP image embedding to a 1-10 score.

The architecture and state-dict keys are those of christophschuhmann/improved-aesthetic-predictor (`MLP` in
simple_inference.py): `layers` = Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
Dropout(0.1), Linear(64, 16), Linear(16, 1), with no activations, on OpenAI CLIP ViT-L/14 image embeddings. Its
released weights (`sac+logos+ava1-l14-linearMSE.pth`) load from a local path or a URL, always against a sha256.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from models.checksum import sha256_of

log = logging.getLogger(__name__)

LAION_EMBED_DIM = 768  # OpenAI CLIP ViT-L/14
UNTRAINED_SEED = 0  # as in models/clip_scorer.py: every worker builds the same untrained head


class ChecksumError(ValueError):
    """A weights file is not the file its sha256 names."""


class AestheticHead(nn.Module):
    def __init__(self, input_dim: int = LAION_EMBED_DIM):
        super().__init__()
        self.input_dim = input_dim
        self.untrained = True
        self.source = "random init"
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)  # (N, D) -> (N,)

    @property
    def name(self) -> str:
        return f"aesthetic:{self.source}" + (" (untrained)" if self.untrained else "")

    @classmethod
    def load(cls, weights: str | None, sha256: str | None, input_dim: int,
             cache_dir: str | None = None) -> AestheticHead:
        """The head for `input_dim`-dim embeddings: LAION's weights from a path or URL, or random init if None."""
        if not weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(UNTRAINED_SEED)
                head = cls(input_dim)
            log.warning("aesthetic head has random weights (untrained): aesthetic scores mean nothing; set "
                        "clip_scores.aesthetic_head and clip_scores.aesthetic_sha256 to LAION's "
                        "sac+logos+ava1-l14-linearMSE.pth (see configs/curate-production.yaml)")
            return head.eval()
        if not sha256:
            raise ChecksumError(f"aesthetic head {weights} needs its sha256 (clip_scores.aesthetic_sha256); "
                                "`sha256sum FILE` prints it")
        path = fetch(weights, sha256, cache_dir)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if "layers.0.weight" not in state:
            raise ValueError(f"{weights} is not an improved-aesthetic-predictor state dict (no layers.0.weight)")
        file_dim = int(state["layers.0.weight"].shape[1])
        if file_dim != input_dim:
            raise ValueError(f"aesthetic head {weights} takes {file_dim}-dim CLIP embeddings but the CLIP model "
                             f"gives {input_dim}-dim ones; LAION's head needs ViT-L-14 with the openai weights")
        head = cls(input_dim)
        head.load_state_dict(state)
        head.untrained, head.source = False, Path(urllib.parse.unquote(weights)).name
        return head.eval()


def fetch(weights: str, sha256: str, cache_dir: str | None = None) -> str:
    """A local path to `weights` (a path or an http(s) URL, downloaded once into the cache), checked against sha256."""
    sha256 = sha256.lower()
    if not weights.startswith(("http://", "https://")):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"aesthetic head weights {weights} do not exist")
        _check(weights, sha256, weights)
        return weights
    cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reelforge")
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(weights).path)).name
    target = cache / f"{sha256[:12]}-{name}"  # content-addressed: a changed file never hides behind an old name
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.part-{os.getpid()}")
        try:
            torch.hub.download_url_to_file(weights, str(partial), progress=False)
        except OSError as err:  # URLError, HTTPError, disk full
            raise OSError(f"could not download aesthetic head {weights}: {err}; download it yourself and set "
                          "clip_scores.aesthetic_head to the file") from err
        try:
            _check(str(partial), sha256, weights)
        except ChecksumError:
            partial.unlink()
            raise
        os.replace(partial, target)  # concurrent workers may both download; each rename installs the same bytes
        return str(target)
    _check(str(target), sha256, weights)
    return str(target)


def _check(path: str, expected: str, shown_as: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(f"{shown_as}: sha256 mismatch: expected {expected}, got {actual}")
