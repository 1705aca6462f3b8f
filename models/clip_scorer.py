"""open_clip CLIP as an embedding model: L2-normalised image and text embeddings.

Weights come the ways users have them: an open_clip pretrained tag (`ViT-L-14` + `openai`), a Hugging Face hub id
(`hf-hub:org/repo`), a local checkpoint file (`pretrained=/path/to/ckpt.pt`), or none at all: a tiny randomly
initialised config (`tiny`, from open_clip_configs/) that runs anywhere and whose scores mean nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

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
                   precision: str = "fp32", cache_dir: str | None = None) -> OpenClipModel:
    """Build an open_clip model (CLIP or CoCa, whichever its config describes) with its eval transform and tokenizer.

    `model_name` is a key of `presets`, an open_clip model name, or `hf-hub:org/repo` / `local-dir:/path` (these
    carry their own weights; `pretrained` is then ignored). `pretrained` is an open_clip tag, a checkpoint file, or
    `hf-hub:org/repo` (which then replaces `model_name`).
    """
    if precision not in PRECISIONS:
        raise WeightsError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    if pretrained and pretrained.startswith("hf-hub:"):  # a hub id names the architecture and its weights at once
        model_name, pretrained = pretrained, None
    arch = presets.get(model_name, model_name)
    has_schema = arch.startswith(("hf-hub:", "local-dir:"))
    pretrained = None if has_schema else (pretrained or None)
    quick_gelu = False
    if pretrained and not os.path.isfile(pretrained):
        if arch not in open_clip.list_models():
            raise WeightsError(f"open_clip has no model config named {model_name!r}; "
                               f"use one of {sorted(presets)} or an open_clip model name")
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
                arch, pretrained=pretrained, device=torch_device, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
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
                 precision: str = "fp32", cache_dir: str | None = None):
        self.loaded = load_open_clip(model_name, pretrained, PRESETS, device, precision, cache_dir)
        self.model = self.loaded.model
        self.embed_dim = int(self.embed_images([Image.new("RGB", (32, 32))]).shape[1])

    @property
    def untrained(self) -> bool:
        return self.loaded.untrained

    @property
    def name(self) -> str:
        return f"open_clip:{self.loaded.label}"

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.loaded.preprocess(image.convert("RGB")) for image in images])  # (N, 3, H, W)
        with self.loaded.autocast():
            features = self.model.encode_image(pixels.to(self.loaded.device))
        return F.normalize(features.float(), dim=-1).cpu()  # (N, D)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.loaded.tokenizer(texts).to(self.loaded.device)  # (N, context_length)
        with self.loaded.autocast():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu()  # (N, D)
