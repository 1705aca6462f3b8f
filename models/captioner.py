"""Captioners: one caption per image, behind a small protocol so a video-language model can join CoCa later."""

from __future__ import annotations

import re
from typing import Protocol

import torch
from PIL import Image

from models.clip_scorer import load_open_clip


class Captioner(Protocol):
    name: str  # recorded as the clip's caption_source; ends in " (untrained)" for random weights
    untrained: bool

    def caption(self, images: list[Image.Image]) -> list[str]: ...


class CocaCaptioner:
    """open_clip CoCa with a greedy decoding loop of our own.

    open_clip 3.3's `CoCa.generate` needs transformers (and its BeamSearchScorer, which transformers 4.56 removed);
    this loop needs only CoCa's forward: the image is encoded once, then the text decoder runs on the growing prefix,
    taking the most likely token each step (temperature 0) until end-of-text or `max_tokens`.
    """

    PRESETS = {"tiny": "reelforge-tiny-coca"}

    def __init__(self, model_name: str = "coca_ViT-L-14",
                 pretrained: str | None = "mscoco_finetuned_laion2B-s13B-b90k", max_tokens: int = 30,
                 min_tokens: int = 4, device: str = "auto", precision: str = "fp32", cache_dir: str | None = None,
                 sha256: str | None = None):
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
        self.name = f"coca:{self.loaded.label}"
        self.untrained = self.loaded.untrained

    @torch.no_grad()
    def generate(self, images: list[Image.Image]) -> torch.Tensor:
        """Token ids (B, 1 + steps): the start token, then greedy tokens; a finished row repeats end-of-text."""
        pixels = torch.stack([self.loaded.preprocess(image.convert("RGB")) for image in images])  # (B, 3, H, W)
        pixels = pixels.to(self.loaded.device)
        with self.loaded.autocast():
            latent, embs = self.model._encode_image(pixels)  # (B, D), (B, Q, W): computed once for every step
        tokens = torch.full((len(images), 1), self.sot, dtype=torch.long, device=pixels.device)  # (B, 1)
        done = torch.zeros(len(images), dtype=torch.bool, device=pixels.device)
        for step in range(self.max_tokens):
            with self.loaded.autocast():
                out = self.model(None, tokens, image_latent=latent, image_embs=embs, output_labels=False)
            logits = out["logits"][:, -1].float()  # (B, vocab)
            logits[:, self.sot] = -torch.inf
            if step < self.min_tokens:
                logits[:, self.eot] = -torch.inf
            following = torch.where(done, self.eot, logits.argmax(dim=-1))  # (B,)
            tokens = torch.cat([tokens, following[:, None]], dim=1)  # (B, step + 2)
            done |= following == self.eot
            if done.all():
                break
        return tokens.cpu()

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        captions = []
        for row in self.generate(images).tolist():
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
