"""Captioners: one caption per image, behind a small protocol so a video-language model can join CoCa later."""

from __future__ import annotations

import re
from typing import Protocol

import torch
from PIL import Image

from models import coca_cache
from models.clip_scorer import load_open_clip
from models.image_batch import JpegPixels


class Captioner(Protocol):
    name: str  # recorded as the clip's caption_source; ends in " (untrained)" for random weights
    untrained: bool

    def caption(self, images: list[Image.Image]) -> list[str]: ...

    def caption_jpegs(self, jpegs: list[bytes]) -> list[str]: ...


DONE_CHECK_EVERY = 4  # greedy steps between checks that every caption of the batch has ended


class UncachedSteps:
    """CoCa's own forward on the whole prefix at every step: the reference for the cached decoder."""

    def __init__(self, model: torch.nn.Module, latent: torch.Tensor, embs: torch.Tensor):
        self.model, self.latent, self.embs = model, latent, embs
        self.tokens: list[torch.Tensor] = []  # the prefix so far, one (B,) tensor a position

    def step(self, following: torch.Tensor) -> torch.Tensor:
        self.tokens.append(following)
        out = self.model(None, torch.stack(self.tokens, dim=1), image_latent=self.latent, image_embs=self.embs,
                         output_labels=False)
        return out["logits"][:, -1]  # (B, vocab)


class CocaCaptioner:
    """open_clip CoCa with a greedy decoding loop of our own.

    open_clip 3.3's `CoCa.generate` needs transformers (and its BeamSearchScorer, which transformers 4.56 removed);
    this loop needs only CoCa's modules: the image is encoded once, then each step takes the most likely token
    (temperature 0) until end-of-text or `max_tokens`. With `kv_cache` (the default) each step feeds only the newest
    token through a key/value cache (models/coca_cache.py); without it, CoCa's forward reruns the whole prefix each
    step (the reference the cache is tested against). Images come as PIL pictures (open_clip's own transform, on the
    CPU) or as JPEG bytes (decoded and transformed as one batch on the model's device, models/image_batch.py).
    """

    PRESETS = {"tiny": "reelforge-tiny-coca"}

    def __init__(self, model_name: str = "coca_ViT-L-14",
                 pretrained: str | None = "mscoco_finetuned_laion2B-s13B-b90k", max_tokens: int = 30,
                 min_tokens: int = 4, device: str = "auto", precision: str = "fp32", cache_dir: str | None = None,
                 sha256: str | None = None, kv_cache: bool = True):
        # `pretrained` may be a checkpoint file (checked against `sha256` when given) or a pinned hf-hub: id
        self.loaded = load_open_clip(model_name, pretrained, self.PRESETS, device, precision, cache_dir, sha256)
        self.model = self.loaded.model
        if not hasattr(self.model, "text_decoder"):
            raise ValueError(f"captions.model_name={model_name!r} is not a CoCa model (it has no text decoder)")
        tokenizer = self.loaded.tokenizer
        if not hasattr(tokenizer, "sot_token_id") or not hasattr(tokenizer, "decode"):
            raise ValueError(f"{model_name}: CocaCaptioner needs open_clip's SimpleTokenizer (start/end-of-text ids)")
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        # The prefix (start token + generated ones) must fit the decoder's context.
        self.max_tokens = max(1, min(max_tokens, self.model.context_length - 1))
        self.min_tokens = min(min_tokens, self.max_tokens)  # as open_clip's generate (min_seq_len=5 with the SOT)
        problem = coca_cache.supports(self.model) if kv_cache else None
        if problem:
            raise ValueError(f"captions.kv_cache: {model_name} cannot be decoded with the cache ({problem}); set "
                             "captions.kv_cache: false")
        self.kv_cache = kv_cache
        self.name = f"coca:{self.loaded.label}"
        self.untrained = self.loaded.untrained
        self._jpeg_pixels: JpegPixels | None = None  # made on first use of JPEG input

    @torch.no_grad()
    def generate(self, images: list[Image.Image]) -> torch.Tensor:
        """Token ids (B, 1 + steps): the start token, then greedy tokens; a finished row repeats end-of-text."""
        pixels = torch.stack([self.loaded.preprocess(image.convert("RGB")) for image in images])  # (B, 3, H, W)
        return self.generate_pixels(pixels.to(self.loaded.device))

    @torch.no_grad()
    def generate_jpegs(self, jpegs: list[bytes]) -> torch.Tensor:
        """As generate(), from JPEG bytes decoded and preprocessed as one batch on the model's device."""
        if self._jpeg_pixels is None:
            self._jpeg_pixels = JpegPixels(self.loaded.device, self.model)
        return self.generate_pixels(self._jpeg_pixels(jpegs))

    @torch.no_grad()
    def generate_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """As generate(), from preprocessed pixels (B, 3, H, W) on the model's device."""
        with self.loaded.autocast():
            latent, embs = self.model._encode_image(pixels)  # (B, D), (B, Q, W): computed once for every step
            if self.kv_cache:
                return self._greedy(embs, coca_cache.CachedCocaDecoder(self.model, embs, self.max_tokens).step)
            return self._greedy(embs, UncachedSteps(self.model, latent, embs).step)

    def _greedy(self, embs: torch.Tensor, step) -> torch.Tensor:
        """Greedy tokens; `step` takes the (B,) token at the next position and returns (B, vocab) logits."""
        batch = embs.shape[0]
        following = torch.full((batch,), self.sot, dtype=torch.long, device=embs.device)  # (B,)
        tokens = [following]
        done = torch.zeros(batch, dtype=torch.bool, device=embs.device)
        for i in range(self.max_tokens):
            logits = step(following).float()  # (B, vocab)
            logits[:, self.sot] = -torch.inf
            if i < self.min_tokens:
                logits[:, self.eot] = -torch.inf
            following = torch.where(done, self.eot, logits.argmax(dim=-1))  # (B,)
            tokens.append(following)
            done |= following == self.eot
            # Asking whether every row is done waits for the GPU; every few steps lets the CPU queue steps ahead (a
            # finished row only repeats end-of-text meanwhile, which the captions cut off).
            if (i + 1) % DONE_CHECK_EVERY == 0 and i + 1 < self.max_tokens and done.all():
                break
        return torch.stack(tokens, dim=1).cpu()  # (B, 1 + steps)

    def caption(self, images: list[Image.Image]) -> list[str]:
        return self._texts(self.generate(images)) if images else []

    def caption_jpegs(self, jpegs: list[bytes]) -> list[str]:
        return self._texts(self.generate_jpegs(jpegs)) if jpegs else []

    def _texts(self, tokens: torch.Tensor) -> list[str]:
        captions = []
        for row in tokens.tolist():
            ids = row[1:]
            ids = ids[: ids.index(self.eot)] if self.eot in ids else ids
            text = self.loaded.tokenizer.decode(ids)
            captions.append(re.sub(r"\s+([.,!?;:])", r"\1", text).strip())
        return captions


CAPTIONERS: dict[str, type] = {"coca": CocaCaptioner}


def build_captioner(kind: str, **settings) -> Captioner:
    """A captioner from the registry by name, e.g. build_captioner("coca", model_name="tiny")."""
    if kind not in CAPTIONERS:
        raise ValueError(f"unknown captioner {kind!r}; known: {', '.join(sorted(CAPTIONERS))}")
    return CAPTIONERS[kind](**settings)
