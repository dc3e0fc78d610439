"""A small decoder-only language model built on CMHA, for examples and tests.

Pre-norm blocks (RMSNorm -> CMHA -> residual, RMSNorm -> SwiGLU MLP -> residual), tied input
embedding and LM head. No positional embedding: positions enter through the CMHA rotation only.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .module import CMHA


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, **fk):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False, **fk)
        self.up = nn.Linear(dim, hidden, bias=False, **fk)
        self.down = nn.Linear(hidden, dim, bias=False, **fk)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CMHABlock(nn.Module):
    def __init__(self, dim, num_heads, num_kv_heads=None, mlp_ratio=4.0, **kw):
        super().__init__()
        fk = {k: kw[k] for k in ("device", "dtype") if k in kw}
        self.attn_norm = nn.RMSNorm(dim, **fk)
        self.attn = CMHA(dim, num_heads, num_kv_heads=num_kv_heads, **kw)
        self.mlp_norm = nn.RMSNorm(dim, **fk)
        self.mlp = SwiGLU(dim, int(mlp_ratio * dim), **fk)

    def forward(self, x, *, key_padding_mask=None, position_ids=None, past_key_value=None, use_cache=False):
        a = self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask, position_ids=position_ids,
                      past_key_value=past_key_value, use_cache=use_cache)
        a, present = a if use_cache else (a, None)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, present


class CMHADecoder(nn.Module):
    """Decoder-only LM: ``forward(ids) -> logits (B, L, vocab)``; with ``use_cache=True`` also the
    per-layer caches (a list of CMHACache) for :meth:`generate`-style decoding.

    Extra keyword arguments (causal is always True) go to every CMHA layer: rope_base,
    learnable_freqs, layout, backend, scale, device, dtype.
    """

    def __init__(self, vocab_size, dim=256, depth=4, num_heads=4, num_kv_heads=None, mlp_ratio=4.0, **kw):
        super().__init__()
        fk = {k: kw[k] for k in ("device", "dtype") if k in kw}
        self.embed = nn.Embedding(vocab_size, dim, **fk)
        self.blocks = nn.ModuleList(CMHABlock(dim, num_heads, num_kv_heads, mlp_ratio, **kw) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, **fk)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False, **fk)
        self.lm_head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)

    def hidden_states(self, ids, *, key_padding_mask=None, position_ids=None, past_key_values=None,
                      use_cache=False):
        x = self.embed(ids)
        presents = []
        for i, blk in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            x, present = blk(x, key_padding_mask=key_padding_mask, position_ids=position_ids,
                             past_key_value=past, use_cache=use_cache)
            presents.append(present)
        x = self.norm(x)
        return (x, presents) if use_cache else x

    def forward(self, ids, **kw):
        out = self.hidden_states(ids, **kw)
        if kw.get("use_cache"):
            return self.lm_head(out[0]), out[1]
        return self.lm_head(out)

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, *, use_cache=True):
        """Greedy decoding. With the cache, each step feeds one token and attends to the cached
        raw keys/values; without it, every step re-runs the whole prefix (for checking)."""
        if not use_cache:
            for _ in range(max_new_tokens):
                ids = torch.cat([ids, self(ids)[:, -1:].argmax(-1)], 1)
            return ids
        out = [ids]
        logits, cache = self(ids, use_cache=True)
        for i in range(max_new_tokens):
            out.append(logits[:, -1:].argmax(-1))
            if i + 1 < max_new_tokens:
                logits, cache = self(out[-1], past_key_values=cache, use_cache=True)
        return torch.cat(out, 1)
