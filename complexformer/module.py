"""The CMHA nn.Module: q/k/v/o projections, per-head Euler parameters, and a raw K/V cache.

CMHA = project x to q, k, v; Euler-rotate q and k per head (delta, beta, positional freqs); ordinary
softmax attention; output projection. The rotation and attention are one op,
:func:`complexformer.cmha_attention`, reached through :func:`attend`, the attention core this
module shares with the Hugging Face one (complexformer.hf); this file only handles shapes,
parameters and the cache.

Why the cache stores the raw (un-rotated) K and V and the keys' positions (the contract of every
CMHA cache, docs/design.md, "KV cache"): the rotated key depends on the *query* head's delta, so
a rotated cache would be H wide instead of Hkv wide under GQA, and it would go stale whenever
delta changes. The attention kernels rotate key tiles on the fly from the raw keys and their
positions, so the cache only ever concatenates along the sequence.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .attention import attention_probs, cmha_attention
from .checks import (check_backend, check_bool, check_int, check_key_padding_mask, check_layout, check_position_range,
                     check_positions, check_real, compute_dtype)
from .reference import default_freqs


def attend(q, k, v, delta, beta, freqs, *, positions=None, causal=True, key_padding_mask=None, attn_mask=None,
           cu_seqlens=None, scale=None, layout="half", backend="auto", softcap=None, return_probs=False):
    """The attention core of every CMHA module: :class:`CMHA` here and the Hugging Face module
    (``complexformer.hf``). q (B, H, Lq, d) and k / v (B, Hkv, Lk, .) are raw (un-rotated), as the
    caches hold them (docs/design.md, "KV cache"); ``positions`` = (query, key) positions. freqs
    with fewer than d/2 columns means partial rotary (only the first 2 * freqs.shape[-1] features
    rotate). Masks and arguments as :func:`cmha_attention`, which serves every case; the fused
    kernel serves neither a dense ``attn_mask`` nor partial rotary, so ``backend="fused"`` becomes
    "auto" there. ``return_probs`` (``output_attentions``) or ``softcap`` take the written-out
    reference math (:func:`complexformer.attention.attention_probs`) and return (out, probs)."""
    rotary_dim = None if 2 * freqs.shape[-1] == q.shape[-1] else 2 * freqs.shape[-1]
    kw = dict(positions=positions, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
              cu_seqlens=cu_seqlens, scale=scale, layout=layout, rotary_dim=rotary_dim)
    if softcap is not None or return_probs:
        return attention_probs(q, k, v, delta, beta, freqs, softcap=softcap, **kw)
    if backend == "fused" and (attn_mask is not None or rotary_dim is not None):
        backend = "auto"
    return cmha_attention(q, k, v, delta, beta, freqs, backend=backend, **kw)


class CMHACache(NamedTuple):
    """The key/value cache of one CMHA layer (``present`` / ``past_key_value``).

    key, value: (B, Hkv, L, d) / (B, Hkv, L, dv), projected but NOT rotated.
    positions: None when the cached keys sit at 0..L-1 (the default), else an int64 (B, L) tensor
        of their absolute positions (from ``position_ids``, e.g. a left-padded batch).
    A plain ``(key, value)`` tuple is accepted as ``past_key_value`` too (positions 0..L-1).
    """

    key: torch.Tensor
    value: torch.Tensor
    positions: Optional[torch.Tensor] = None

    @property
    def seq_len(self):
        return self.key.shape[2]


class CMHA(nn.Module):
    r"""Complex Multi-Head Attention (ComplexFormer).

    Score of query m against key n in head i (docs/design.md, "CMHA"), with r, theta the modulus and
    angle of the (re_j, im_j) pairs of q and k:

        s_mn = scale * sum_j r^q_mj r^k_nj cos(delta_ij (theta^q_mj - theta^k_nj) + beta_ij + omega_ij (p_m - p_n))

    computed exactly as an O(L d) rotation of q and k followed by flash-style attention.

    Args:
        embed_dim: model width E (input and output features).
        num_heads: query heads H; head_dim d = E / H must be even.
        num_kv_heads: key/value heads Hkv (grouped-query attention); must divide H. Default H.
        bias: add biases to the four projections (the authors use none).
        causal: key n visible to query m only if n <= m (bottom-right aligned with a cache).
        rope_base: base of the default frequencies omega_j = rope_base^(-2j/d).
        learnable_freqs: make omega an (H, h) parameter, one row per head, initialised to the
            default; otherwise a fixed (h,) float32 buffer (kept float32 under ``.to(bfloat16)``:
            omega * position needs the precision; it is derived from ``rope_base`` and is not saved
            in the state dict).
        scale: softmax scale, default 1/sqrt(d) (the authors' code uses 1.0).
        layout: "half" (re_j = x[j], im_j = x[j + d/2], the authors' layout) or "interleaved".
        backend: attention backend passed to ``cmha_attention`` ("auto", "fused", "sdpa", "reference").
        device, dtype: factory kwargs for the parameters.

    Init (the authors'): delta ~ N(0, std = 1/sqrt(h)) with h = d/2 (the second argument of the
    paper's N(0, 1/sqrt(h)) read as the standard deviation, as in torch.normal(mean, std)),
    beta = 0, projections xavier-uniform, biases zero.

    forward(x, *, key_padding_mask=None, position_ids=None, past_key_value=None, use_cache=False)
        x: (B, L, E).
        key_padding_mask: (B, past_len + L) bool (or 0/1 integers, e.g. a Hugging Face attention
            mask), True = attend. Covers the cached keys too.
        position_ids: (B, L) or (L,) integer absolute positions of the new tokens, used for the
            rotation only (masks are by index). Default: past_len + arange(L), or, when the cache
            holds explicit positions, each row continues from its last cached position + 1.
        past_key_value: a :class:`CMHACache` (or (key, value) tuple) from an earlier call.
        use_cache: also return the updated cache.
        cu_seqlens: packed variable-length batch: x is (1, T, E) holding S sequences back to back,
            cu_seqlens int32 (S+1,) their boundaries; positions restart at 0 in every sequence and
            no token attends across sequences (not with a cache).
        Returns out (B, L, E), or (out, present) when ``use_cache``.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, bias=False, causal=True,
                 rope_base=10000.0, learnable_freqs=False, scale=None, layout="half", backend="auto",
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        embed_dim, num_heads, num_kv_heads = (
            check_int(name, val, lo=1, what="a positive int")
            for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)))
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim = embed_dim / num_heads = {head_dim} must be even "
                             "(CMHA pairs the features of a head into d/2 complex numbers)")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        check_layout(layout)
        check_backend(backend)
        causal = check_bool("causal", causal)
        if not check_real("rope_base", rope_base, "a positive number") > 0:
            raise ValueError(f"rope_base: expected a positive number, got {rope_base!r}")
        if scale is not None:
            scale = check_real("scale", scale, "None or a finite number")
            if not math.isfinite(scale):
                raise ValueError(f"scale: expected None or a finite number, got {scale!r}")

        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.causal, self.rope_base, self.learnable_freqs = causal, float(rope_base), bool(learnable_freqs)
        self.scale, self.layout, self.backend = scale, layout, backend
        h = head_dim // 2
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **fk)
        self.delta = nn.Parameter(torch.empty(num_heads, h, **fk))
        self.beta = nn.Parameter(torch.empty(num_heads, h, **fk))
        if learnable_freqs:
            self.freqs = nn.Parameter(torch.empty(num_heads, h, **fk))
        else:
            self.register_buffer("freqs", self._default_freqs(device), persistent=False)
        self.reset_parameters()

    def _default_freqs(self, device, dtype=torch.float32):
        return default_freqs(self.head_dim, self.rope_base, dtype=dtype, device=device)

    @torch.no_grad()
    def reset_parameters(self):
        """The authors' init (see the class docstring); freqs back to rope_base^(-2j/d)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.delta, mean=0.0, std=1.0 / math.sqrt(self.head_dim // 2))
        nn.init.zeros_(self.beta)
        if self.learnable_freqs:
            self.freqs.copy_(self._default_freqs(self.freqs.device).expand_as(self.freqs))
        else:
            self.freqs = self._default_freqs(self.freqs.device, compute_dtype(self.freqs.dtype))

    def _apply(self, fn, *args, **kwargs):
        # Module.to(bfloat16) would round the fixed frequencies to 8 bits, and omega * position
        # then drifts by whole radians at long positions. Recompute them instead: float32, or
        # float64 after .double() (exact for float64 checks).
        super()._apply(fn, *args, **kwargs)
        if not self.learnable_freqs:
            self.freqs = self._default_freqs(self.freqs.device, compute_dtype(self.freqs.dtype))
        return self

    def extra_repr(self):
        s = (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
             f"head_dim={self.head_dim}, causal={self.causal}, rope_base={self.rope_base:g}, "
             f"learnable_freqs={self.learnable_freqs}")
        if self.scale is not None:
            s += f", scale={self.scale:g}"
        return s + f", layout={self.layout!r}, backend={self.backend!r}"

    # ----------------------------------------------------------------------------------------
    def forward(self, x, *, key_padding_mask=None, position_ids=None, past_key_value=None, use_cache=False,
                cu_seqlens=None):
        if cu_seqlens is not None and (past_key_value is not None or use_cache):
            raise ValueError("cu_seqlens: packed sequences cannot be combined with past_key_value/use_cache")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (batch, seq_len, embed_dim={self.embed_dim}), got {shape}")
        B, L, _ = x.shape
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # (B, L, H*d) -> (B, H, L, d) as a strided view: the kernels take any strides with a unit
        # last-dim stride, so no copy is made here.
        q = self.q_proj(x).view(B, L, H, d).transpose(1, 2)
        k = self.k_proj(x).view(B, L, Hkv, d).transpose(1, 2)
        v = self.v_proj(x).view(B, L, Hkv, d).transpose(1, 2)

        past_len, past_pos = 0, None
        if past_key_value is not None:
            pk, pv, past_pos = self._check_cache(past_key_value, B, k)
            past_len = pk.shape[2]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        Lk = past_len + L

        positions, k_pos = None, None
        if position_ids is not None or past_pos is not None:
            if position_ids is not None:
                q_pos = check_positions("position_ids", position_ids, B, L, x.device, other="x")
            else:  # continue every row from its last cached position
                q_pos = past_pos[:, -1:] + 1 + torch.arange(L, device=x.device)
                check_position_range("past_key_value.positions (continued by the new tokens)", q_pos)
            if past_len:
                if past_pos is None:
                    past_pos = torch.arange(past_len, device=x.device)[None]
                Bp = max(past_pos.shape[0], q_pos.shape[0])
                k_pos = torch.cat([past_pos.expand(Bp, past_len), q_pos.expand(Bp, L)], 1)
            else:
                k_pos = q_pos
            positions = (q_pos, k_pos)

        kpm = None
        if key_padding_mask is not None:
            kpm = check_key_padding_mask("key_padding_mask", key_padding_mask, B, Lk, x.device, other="x", ints=True,
                                         dims="(batch, past_len + seq_len)")

        # the new queries sit bottom-right, after the cached keys: cmha_attention's default q_offset
        out = attend(q, k, v, self.delta, self.beta, self.freqs, positions=positions, causal=self.causal,
                     scale=self.scale, key_padding_mask=kpm, cu_seqlens=cu_seqlens, layout=self.layout,
                     backend=self.backend)
        out = self.o_proj(out.transpose(1, 2).reshape(B, L, H * d))
        if use_cache:
            return out, CMHACache(k, v, k_pos)
        return out

    # ----------------------------------------------------------------------------------------
    def _check_cache(self, cache, B, k):
        if not isinstance(cache, (tuple, list)) or len(cache) not in (2, 3):
            raise TypeError("past_key_value: expected a CMHACache or a (key, value) tuple, "
                            f"got {type(cache).__name__}")
        pk, pv = cache[0], cache[1]
        pos = cache[2] if len(cache) == 3 else None
        want = (B, self.num_kv_heads, None, self.head_dim)
        for name, t in (("past_key_value.key", pk), ("past_key_value.value", pv)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or any(
                    w is not None and s != w for s, w in zip(t.shape, want)):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape (B={B}, num_kv_heads={self.num_kv_heads}, "
                                 f"past_len, head_dim={self.head_dim}), got {shape}")
            if t.device != k.device or t.dtype != k.dtype:
                raise ValueError(f"{name}: {t.dtype} on {t.device}, but the new keys are {k.dtype} on {k.device}")
        if pv.shape[2] != pk.shape[2]:
            raise ValueError(f"past_key_value: key has {pk.shape[2]} positions but value has {pv.shape[2]}")
        if pos is not None:
            if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
                shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
                raise ValueError(f"past_key_value.positions: expected shape (B={B} or 1, past_len={pk.shape[2]}), "
                                 f"got {shape}")
            pos = check_positions("past_key_value.positions", pos, B, pk.shape[2], k.device, other="the new keys")
        return pk, pv, pos
