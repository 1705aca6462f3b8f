"""Incremental decoding of open_clip's CoCa with a key/value cache: one new token per step instead of the prefix.

CoCa's forward on a prefix of T tokens runs its text tower (a causal transformer) and its multimodal decoder
(causal self-attention, then cross-attention to the image tokens) over all T positions, and recomputes the
cross-attention keys and values of the image tokens in every layer: greedy decoding of N tokens costs O(N^2)
positions. Both towers are causal, so a position's output never changes once computed. Here each step feeds only
the newest token: every self-attention layer appends its key and value to a cache and attends over it, and the
image tokens' cross-attention keys and values are projected once per caption. Same weights, same arithmetic per
position, so the same greedy tokens (tests/test_model_stages.py checks it against the uncached loop).

What is reproduced of open_clip 3.3's CoCa: the text tower's token and positional embeddings, its causal mask and its
pad mask (the CLS embedding that CoCa appends is last in the sequence, so no token attends to it and it is skipped;
its pad mask is the legacy one shifted by a position unless `correct_cls_mask`), pre-norm residual blocks with
nn.MultiheadAttention, LayerScale, the MLP, the decoder's ln_1_kv on the image tokens, ln_final and the vocabulary
projection. A CoCa built of other blocks (block_type "custom", grad checkpointing) is refused by `supports()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock


def supports(model: torch.nn.Module) -> str | None:
    """Why this model cannot be decoded with the cache, or None when it can."""
    text, decoder = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if text is None or decoder is None or not hasattr(text, "token_embedding"):
        return "not an open_clip CoCa with a TextTransformer text tower"
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    if not all(type(b) is ResidualAttentionBlock and b.attn.batch_first and b.attn._qkv_same_embed_dim
               and b.attn.in_proj_bias is not None for b in blocks):
        return "its blocks are not open_clip's batch-first ResidualAttentionBlock with biases"
    if getattr(text, "attn_mask", None) is None:
        return "its text tower is not causal"
    if text.transformer.grad_checkpointing or decoder.grad_checkpointing:
        return "grad checkpointing is on"
    return None


@dataclass
class _Cache:
    """Keys and values of one self-attention layer: (B, heads, max_len, head_dim) each, the first `length` filled."""

    keys: torch.Tensor
    values: torch.Tensor


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, W) -> (B, heads, T, W / heads)."""
    b, t, w = x.shape
    return x.view(b, t, heads, w // heads).transpose(1, 2)


def _attend(block: ResidualAttentionBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention of queries (B, H, t, d) over keys and values (B, H, S, d), then the output projection."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, t, d)
    b, h, t, d = out.shape
    return block.attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def _self_attention_step(block: ResidualAttentionBlock, x: torch.Tensor, cache: _Cache, position: int,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """One residual block on the newest position x (B, 1, W), its key and value appended to the cache."""
    heads = block.attn.num_heads
    q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    cache.keys[:, :, position : position + 1] = _heads(k, heads)
    cache.values[:, :, position : position + 1] = _heads(v, heads)
    keys, values = cache.keys[:, :, : position + 1], cache.values[:, :, : position + 1]
    x = x + block.ls_1(_attend(block, _heads(q, heads), keys, values, mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _cross_attention_step(block: ResidualAttentionBlock, x: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor) -> torch.Tensor:
    heads = block.attn.num_heads
    width = x.shape[-1]
    q = F.linear(block.ln_1(x), block.attn.in_proj_weight[:width], block.attn.in_proj_bias[:width])
    x = x + block.ls_1(_attend(block, _heads(q, heads), keys, values, None))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _image_keys_values(block: ResidualAttentionBlock, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention keys and values of the image tokens (B, Q, W), once per caption."""
    heads, width = block.attn.num_heads, image_embs.shape[-1]
    kv = block.ln_1_kv(image_embs)
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    k = F.linear(kv, weight[width : 2 * width], bias[width : 2 * width])
    v = F.linear(kv, weight[2 * width :], bias[2 * width :])
    return _heads(k, heads), _heads(v, heads)


class CachedCocaDecoder:
    """Feeds a CoCa one token at a time and returns the next-token logits, keeping every layer's keys and values.

    Usage: `decoder = CachedCocaDecoder(model, image_embs, max_len)`, then `logits = decoder.step(tokens)` with the
    (B,) token at each position 0, 1, 2, ... in turn (the first is the start-of-text token).
    """

    def __init__(self, model: torch.nn.Module, image_embs: torch.Tensor, max_len: int):
        problem = supports(model)
        if problem:
            raise ValueError(f"CoCa KV cache: {problem}")
        self.text, self.decoder = model.text, model.text_decoder
        if max_len > self.text.attn_mask.shape[0] or max_len > self.decoder.attn_mask.shape[0]:
            raise ValueError(f"CoCa KV cache: {max_len} positions exceed the model's context")
        self.position = 0
        self.max_len = max_len
        batch = image_embs.shape[0]
        self.text_caches = [self._empty(block, batch, image_embs) for block in self.text.transformer.resblocks]
        self.decoder_caches = [self._empty(block, batch, image_embs) for block in self.decoder.resblocks]
        self.image_kv = [_image_keys_values(block, image_embs) for block in self.decoder.cross_attn]
        # The text tower's key mask: with CoCa's appended CLS, open_clip masks pad tokens, by its legacy rule one
        # position late (key k is dropped when token k - 1 is the pad), or at the pad itself with correct_cls_mask.
        self.pad_id = self.text.pad_id if self.text.cls_emb is not None or self.text.use_pad_mask else None
        self.legacy_shift = self.text.cls_emb is not None and not self.text.correct_cls_mask
        self.key_ok = torch.ones((batch, max_len), dtype=torch.bool, device=image_embs.device)

    def _empty(self, block: ResidualAttentionBlock, batch: int, like: torch.Tensor) -> _Cache:
        heads, width = block.attn.num_heads, block.attn.embed_dim
        shape = (batch, heads, self.max_len, width // heads)
        dtype = torch.get_autocast_dtype(like.device.type) if torch.is_autocast_enabled(like.device.type) \
            else like.dtype
        return _Cache(torch.zeros(shape, dtype=dtype, device=like.device),
                      torch.zeros(shape, dtype=dtype, device=like.device))

    def _text_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Boolean (B, 1, 1, position + 1) of the keys the newest text position may attend to, or None for all."""
        if self.pad_id is None:
            return None
        p = self.position
        if self.legacy_shift:
            if p + 1 < self.max_len:
                self.key_ok[:, p + 1] = tokens != self.pad_id
        else:
            self.key_ok[:, p] = tokens != self.pad_id
        return self.key_ok[:, None, None, : p + 1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at the next position -> logits (B, vocab) for the position after it."""
        p = self.position
        if p >= self.max_len:
            raise ValueError(f"CoCa KV cache: all {self.max_len} positions are used")
        text = self.text
        x = text.token_embedding(tokens[:, None]).to(text.transformer.get_cast_dtype())  # (B, 1, W)
        x = x + text.positional_embedding[p : p + 1].to(x.dtype)
        mask = self._text_mask(tokens)
        for block, cache in zip(text.transformer.resblocks, self.text_caches, strict=True):
            x = _self_attention_step(block, x, cache, p, mask)
        for block, cache, cross, (keys, values) in zip(self.decoder.resblocks, self.decoder_caches,
                                                        self.decoder.cross_attn, self.image_kv, strict=True):
            x = _self_attention_step(block, x, cache, p, None)
            x = _cross_attention_step(cross, x, keys, values)
        out = self.decoder.ln_final(x)
        if self.decoder.text_projection is not None:
            out = out @ self.decoder.text_projection
        self.position += 1
        return out[:, 0]
