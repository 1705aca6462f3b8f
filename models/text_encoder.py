"""A frozen open_clip text tower that turns prompts into per-token features (and a mask) for cross-attention."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class TextEncoderConfig:
    model_name: str = "tiny"  # an open_clip model name (e.g. "ViT-B-32"), or "tiny": a small random tower for CPU runs
    # open_clip tag ("laion2b_s34b_b79k"), "hf-hub:org/name@<40-hex commit>", a checkpoint file, or None
    pretrained: str | None = None
    pretrained_sha256: str | None = None  # of a checkpoint file named by `pretrained`; checked before it loads
    context_length: int = 32  # tokens kept (CLIP's 77 truncated for speed); at most the model's context


def text_encoder_id(config: TextEncoderConfig) -> str:
    """What decides the features a prompt gets: architecture, weights (tag, hub id or file sha256; random weights
    are seeded, so "random" names them) and the tokens kept. Recorded with everything encoded by it."""
    weights = config.pretrained_sha256 or config.pretrained or "random"
    return f"open_clip:{config.model_name}:{weights}:ctx{config.context_length}"


class FrozenTextEncoder(nn.Module):
    """Per-token features after ln_final of a frozen open_clip text tower; the vision tower is dropped."""

    def __init__(self, config: TextEncoderConfig):
        # imported here: configs (and the training engine) import this module on machines that have only torch
        import open_clip

        from models.clip_scorer import HF_HUB_PREFIX, PRESETS, load_open_clip

        super().__init__()
        self.config = config
        hub = config.pretrained is not None and config.pretrained.startswith(HF_HUB_PREFIX)
        # a hub id names the architecture and its weights at once (open_clip's hf-hub: schema)
        model_name, pretrained = (config.pretrained, None) if hub else (config.model_name, config.pretrained)
        arch = PRESETS.get(model_name, model_name)
        if not hub and arch not in open_clip.list_models():
            raise ValueError(
                f"unknown text encoder model {model_name!r}: use one of {sorted(PRESETS)} or an open_clip model name "
                "such as 'ViT-B-32' (see open_clip.list_models())"
            )
        # the CLIP scorer's loader resolves tags and files, sets QuickGELU for OpenAI weights, seeds random weights
        # (so every worker and every later evaluation encodes prompts alike) and explains missing weights
        loaded = load_open_clip(model_name, pretrained, PRESETS, device="cpu", sha256=config.pretrained_sha256)
        clip = loaded.model
        # CLIP inlines its text tower's modules; CustomTextCLIP (and CoCa) keep a TextTransformer in .text
        tower = clip.text if hasattr(clip, "text") else clip
        if not hasattr(tower, "token_embedding"):
            raise ValueError(
                f"text encoder {config.model_name!r} uses a Hugging Face text tower; only open_clip's own is supported"
            )
        if getattr(tower, "cls_emb", None) is not None:
            raise ValueError(f"text encoder {config.model_name!r} appends a class token (CoCa); not supported")
        max_length = tower.positional_embedding.shape[0]
        if not 1 <= config.context_length <= max_length:
            raise ValueError(
                f"context_length={config.context_length} must be between 1 and {max_length} "
                f"(the context of {config.model_name!r})"
            )

        # keep only the text parts; `clip` (with the vision tower and projections) is freed on return
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        causal = tower.attn_mask  # None for bidirectional towers
        # truncating a causal tower is exact: position i never sees the tokens after it
        causal = None if causal is None else causal[: config.context_length, : config.context_length].clone()
        self.register_buffer("attn_mask", causal, persistent=False)
        self.width: int = tower.transformer.width

        self.tokenizer = open_clip.get_tokenizer(arch, context_length=config.context_length)
        if getattr(self.tokenizer, "eot_token_id", None) is None:
            raise ValueError(f"text encoder {config.model_name!r}: its tokenizer has no end-of-text token")

        self.untrained = loaded.untrained
        if self.untrained:
            logger.warning(
                "text encoder %r has random weights (pretrained=None): prompts are encoded by an untrained text "
                "tower, fine for tests and CPU demos only",
                config.model_name,
            )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # frozen: stays in eval mode even when a parent module is switched to training
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and mask (B, L), True from the start token up to and including the end-of-text token."""
        tokens = self.tokenizer(list(prompts))  # (B, L), zero-padded; a truncated prompt ends with EOT
        eot = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1)  # (B,) first EOT
        mask = torch.arange(tokens.shape[1])[None] <= eot[:, None]  # (B, L)
        return tokens, mask

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, width) after ln_final and mask (B, L) bool; the empty prompt gives SOT, EOT."""
        device = self.token_embedding.weight.device
        tokens, mask = self.tokenize(prompts)
        tokens, mask = tokens.to(device), mask.to(device)
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype)  # (B, L, width)
        x = x + self.positional_embedding[: tokens.shape[1]].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)  # (B, L, width)
        return self.ln_final(x), mask
