"""open_clip CLIP as an embedding model: L2-normalised image and text embeddings.

Weights come the ways users have them: an open_clip pretrained tag (`ViT-L-14` + `openai`), a Hugging Face hub id
pinned to a commit (`hf-hub:org/repo@<40-hex commit>`), a local checkpoint file (`pretrained=/path/to/ckpt.pt`, with
an optional sha256 that is then checked), or none at all: a tiny randomly initialised config (`tiny`, from
open_clip_configs/) that runs anywhere and whose scores mean nothing. Checkpoints load tensors-only
(open_clip's `weights_only=True`, or safetensors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from models.checksum import sha256_of
from models.image_batch import JpegPixels

log = logging.getLogger(__name__)

# Our own open_clip model configs, registered the way open_clip documents for custom configs.
CONFIG_DIR = Path(__file__).with_name("open_clip_configs")
open_clip.add_model_config(CONFIG_DIR)

PRESETS = {"tiny": "reelforge-tiny-clip"}  # short name -> open_clip model name; any open_clip name works too
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Untrained models are built under this seed, so every Ray worker holds the same weights and scores agree.
UNTRAINED_SEED = 0


class WeightsError(ValueError):
    """Weights a user named cannot be found, fetched or used; the message names them and the fix."""


HF_HUB_PREFIX = "hf-hub:"
_PINNED_HUB_ID = re.compile(r"^hf-hub:(?P<repo>[^@\s]+)@(?P<revision>[0-9a-f]{40})$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def weights_problem(model_name: str | None, pretrained: str | None, sha256: str | None = None) -> str | None:
    """Why these weights are not pinned, or None: a hub id must name a commit (a branch or tag can move to other
    weights), and a sha256 must be 64 hex digits. Configs call this to fail before any download."""
    for name in (model_name, pretrained):
        if name and name.startswith(HF_HUB_PREFIX) and not _PINNED_HUB_ID.match(name):
            repo = name.removeprefix(HF_HUB_PREFIX).split("@")[0]
            return (f"{name} is not pinned: name the commit of its weights, hf-hub:{repo}@<40-hex commit> (the "
                    "commit hash on the repository's 'Files and versions' page), or download the checkpoint and set "
                    "pretrained to its path")
    if sha256 and not _SHA256.match(sha256.strip()):
        return f"sha256 {sha256!r} is not 64 hex digits (`sha256sum FILE` prints it)"
    return None


def check_checkpoint(pretrained: str | None, sha256: str) -> None:
    """Raise WeightsError unless `pretrained` is a local file whose sha256 is `sha256`."""
    if not pretrained or not os.path.isfile(pretrained):
        raise WeightsError(f"a sha256 is given but pretrained={pretrained!r} is not a local checkpoint file; the "
                           "sha256 checks a file named by path (pin a hub id by its commit instead)")
    actual, expected = sha256_of(pretrained), sha256.strip().lower()
    if actual != expected:
        raise WeightsError(f"{pretrained}: sha256 mismatch: expected {expected}, got {actual} (a different or damaged "
                           "file; fetch it again or correct the sha256)")


def _hub_snapshot(hub_id: str, cache_dir: str | None) -> str:
    """The local folder of a pinned hub id's open_clip config and weights (downloaded once at that commit)."""
    from open_clip.pretrained import download_pretrained_from_hf

    pinned = _PINNED_HUB_ID.match(hub_id)
    repo, revision = pinned["repo"], pinned["revision"]
    try:
        config = download_pretrained_from_hf(repo, filename="open_clip_config.json", revision=revision,
                                             cache_dir=cache_dir)
        weights = download_pretrained_from_hf(repo, revision=revision, cache_dir=cache_dir)  # safetensors first
    except (FileNotFoundError, RuntimeError, OSError) as err:
        raise WeightsError(f"could not fetch {hub_id}: {err} (no network? download the repository at that commit "
                           "and set pretrained to its checkpoint file)") from err
    if Path(config).parent != Path(weights).parent:
        raise WeightsError(f"{hub_id}: its config and weights did not land in one snapshot folder")
    return str(Path(config).parent)


@dataclass
class OpenClipModel:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable
    label: str  # where the weights came from: "ViT-L-14/openai", "tiny (untrained)"
    untrained: bool
    device: torch.device
    dtype: torch.dtype  # compute dtype of forward passes run under autocast(); the weights stay fp32

    def autocast(self) -> contextlib.AbstractContextManager:
        # Autocast rather than casting the weights: open_clip's fp16 conversion leaves some parameters (CoCa's
        # attentional pooler queries) in fp32, and mixed dtypes then fail inside its attention layers.
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_device(device: str) -> torch.device:
    """"auto": the GPU Ray gave this worker if any (Ray hides the others), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_open_clip(model_name: str, pretrained: str | None, presets: dict[str, str], device: str = "auto",
                   precision: str = "fp32", cache_dir: str | None = None, sha256: str | None = None) -> OpenClipModel:
    """Build an open_clip model (CLIP or CoCa, whichever its config describes) with its eval transform and tokenizer.

    `model_name` is a key of `presets`, an open_clip model name, or `hf-hub:org/repo@<commit>` / `local-dir:/path`
    (these carry their own weights; `pretrained` is then ignored). `pretrained` is an open_clip tag, a checkpoint
    file (checked against `sha256` when one is given), or `hf-hub:org/repo@<commit>` (which then replaces
    `model_name`).
    """
    if precision not in PRECISIONS:
        raise WeightsError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    problem = weights_problem(model_name, pretrained, sha256)
    if problem:
        raise WeightsError(problem)
    if pretrained and pretrained.startswith(HF_HUB_PREFIX):  # a hub id names the architecture and its weights
        model_name, pretrained = pretrained, None
    arch = presets.get(model_name, model_name)
    if arch.startswith(HF_HUB_PREFIX):
        # open_clip's own hf-hub: loader always takes the repository's newest commit; load the pinned one from disk
        arch = "local-dir:" + _hub_snapshot(arch, cache_dir)
    has_schema = arch.startswith(("hf-hub:", "local-dir:"))
    pretrained = None if has_schema else (pretrained or None)
    if sha256:
        check_checkpoint(pretrained, sha256)
    quick_gelu = False
    if pretrained and not os.path.isfile(pretrained):
        if arch not in open_clip.list_models():
            raise WeightsError(f"open_clip has no model config named {model_name!r}; "
                               f"use one of {sorted(presets)} or an open_clip model name")
        # An open_clip tag downloads from open_clip's own table: its OpenAI and mlfoundations URLs carry a sha256 that
        # open_clip checks, but its hf_hub entries take the repository's newest commit (open_clip 3.3 takes no
        # revision there). For a pinned load, download the file once and name it with its sha256.
        tag = open_clip.get_pretrained_cfg(arch, pretrained)
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(arch) or ["none"]
            raise WeightsError(f"{model_name}: pretrained={pretrained!r} is neither a file nor an open_clip tag "
                               f"for it (tags: {', '.join(tags)})")
        # The OpenAI weights were trained with QuickGELU; loading them into a GELU model gives wrong embeddings.
        quick_gelu = bool(tag.get("quick_gelu", False))
    untrained = not has_schema and not pretrained
    torch_device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=torch_device, force_quick_gelu=quick_gelu, cache_dir=cache_dir,
                weights_only=True)  # torch.load of .bin/.pt checkpoints unpickles tensors only
        except (RuntimeError, OSError) as err:
            raise WeightsError(f"could not load open_clip {model_name} with pretrained={pretrained!r}: {err} "
                               "(no network? download the checkpoint and set pretrained to its path)") from err
        if untrained:
            _init_untrained(model)
    tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    label = model_name + (f"/{pretrained}" if pretrained else "") + (" (untrained)" if untrained else "")
    if untrained:
        log.warning("open_clip %s has random weights (untrained): its outputs mean nothing; name real weights "
                    "(see configs/curate-production.yaml) for scores and captions you can use", model_name)
    return OpenClipModel(model.eval(), preprocess, tokenizer, label, untrained, torch_device, PRECISIONS[precision])


def _init_untrained(model: torch.nn.Module) -> None:
    # open_clip leaves CoCa's decoder projection as torch.empty (MultimodalTransformer.init_parameters is never
    # called): uninitialised memory would make an untrained CoCa differ from run to run.
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and getattr(decoder, "text_projection", None) is not None:
        torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)


class ClipScorer:
    """CLIP image and text embeddings, L2-normalised, as float32 tensors on the CPU."""

    def __init__(self, model_name: str = "tiny", pretrained: str | None = None, device: str = "auto",
                 precision: str = "fp32", cache_dir: str | None = None, sha256: str | None = None):
        self.loaded = load_open_clip(model_name, pretrained, PRESETS, device, precision, cache_dir, sha256)
        self.model = self.loaded.model
        self.embed_dim = int(self.embed_images([Image.new("RGB", (32, 32))]).shape[1])
        self._jpeg_pixels: JpegPixels | None = None  # made on first use of JPEG input

    @property
    def untrained(self) -> bool:
        return self.loaded.untrained

    @property
    def name(self) -> str:
        return f"open_clip:{self.loaded.label}"

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.loaded.preprocess(image.convert("RGB")) for image in images])  # (N, 3, H, W)
        return self.embed_pixels(pixels.to(self.loaded.device))

    @torch.no_grad()
    def embed_jpegs(self, jpegs: list[bytes]) -> torch.Tensor:
        """As embed_images, from JPEG bytes decoded and preprocessed as one batch on the model's device
        (models/image_batch.py) instead of open_clip's per-image transform on the CPU."""
        if self._jpeg_pixels is None:
            self._jpeg_pixels = JpegPixels(self.loaded.device, self.model)
        return self.embed_pixels(self._jpeg_pixels(jpegs))

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (N, 3, H, W) on the model's device -> L2-normalised embeddings (N, D) on the CPU."""
        with self.loaded.autocast():
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1).cpu()  # (N, D)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.loaded.tokenizer(texts).to(self.loaded.device)  # (N, context_length)
        with self.loaded.autocast():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu()  # (N, D)
