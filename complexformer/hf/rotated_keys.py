"""Training mode's decoding path (docs/design.md, "KV cache"): keys rotated once, when they enter
the cache, instead of at every step.

Training mode caches raw keys (Hkv heads) and their positions; CMHA rotates the keys per *query*
head with that head's delta, so a decoding step through the fused kernel re-rotates every cached
key for every query head (one sincos per head, key and pair). Here each layer of a plain
``DynamicLayer`` keeps, beside the raw keys, their rotations (B, H, capacity, d) in a buffer that
grows geometrically: a step rotates only its new keys, appends them in place, and attends with
the core of :func:`complexformer.attention.attention_rotated_keys` (on the CPU one call of the
fused kernel, which scores the keys straight from the buffer).

The rotated keys are a pure function of the raw keys, their positions and the angles, so they are
only ever used while provably in step with them:
- the layer's keys tensor is the very object (and version) seen after the previous step's update
  (every Cache method that edits a layer, beam reordering, cropping, batch selection, offloading,
  replaces that tensor, and an in-place write bumps its version), and holds exactly the new keys
  more;
- the angles, dtype and device are those the buffer was built with: the angles compared exactly,
  by value (an optimizer step and a write through ``param.data`` alike change them).
Otherwise the buffer is rebuilt from all the raw keys (one full rotation). Under
torch.inference_mode the cache's tensors have no version counter and are followed by identity
alone (every Cache method replaces the tensor it edits). Not seen: an in-place write into the
cache's tensors through ``.data`` or under torch.inference_mode (edit caches with the Cache
methods). Used only without grad (generation), outside torch.compile, for calls that add at most
:data:`MAX_QUERIES` tokens to a non-empty cache; every other call takes the usual path. Memory: up
to 1.5 x H / Hkv times the raw keys' bytes, on top of the cache.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicLayer

from ..attention import decoding_attention, decoding_plan
from ..checks import compute_dtype, tensor_version

MAX_QUERIES = 16  # decoding, speculative and short chunks; longer calls use the fused kernel
_ATTR = "_cmha_rotated_keys"


class RotatedKeys:
    """One cache layer's rotated keys: ``buf[:, :, :n]`` rotates the first n raw keys."""

    __slots__ = ("keys", "version", "angles", "values", "buf", "n")

    def __init__(self):
        self.keys, self.version, self.angles, self.values, self.buf, self.n = None, -1, None, (), None, 0

    def same_angles(self, angles, tensors):
        """Whether the buffer was rotated with these angles: the same (dtype, device) and the same
        values, compared exactly (a version counter would miss a write through ``param.data``)."""
        return self.angles == angles and all(torch.equal(a, b) for a, b in zip(self.values, tensors, strict=True))

    def in_step(self, layer):
        """Whether ``layer``'s keys are still those recorded after the last update, or a prefix view
        of them (``Cache.crop``: the same storage, strides and version counter); a prefix of m keys
        keeps m rotated keys."""
        keys, rec = layer.keys, self.keys() if self.keys is not None else None
        if rec is None or tensor_version(keys) != self.version:
            return False
        if keys is rec:
            return True
        prefix = (keys.data_ptr() == rec.data_ptr() and keys.stride() == rec.stride() and keys.dim() == 4
                  and keys.shape[:2] == rec.shape[:2] and keys.shape[3] == rec.shape[3] and keys.shape[2] <= self.n)
        if prefix:
            self.n = keys.shape[2]
        return prefix

    def buffer(self, like, n_keys):
        """The (B, H, n_keys, d) view of the buffer, ``like`` (B, H, ., d) giving shape, dtype and
        device; its first ``self.n`` keys are kept when it grows (1.5x, at least 64 keys)."""
        B, H, _, d = like.shape
        buf = self.buf
        if buf is None or buf.shape[0] != B or buf.shape[1] != H or buf.dtype != like.dtype or buf.device != like.device:
            buf, self.n = None, 0
        if buf is None or buf.shape[2] < n_keys:
            new = like.new_empty(B, H, max(n_keys + n_keys // 2, 64), d)
            if self.n:
                new[:, :, :self.n] = buf[:, :, :self.n]
            self.buf = buf = new
        return buf[:, :, :n_keys]

    def record(self, layer, angles, tensors, rebuilt):
        self.keys, self.version, self.angles = weakref.ref(layer.keys), tensor_version(layer.keys), angles
        if rebuilt:  # a copy of the angles the buffer's keys were rotated with (H x d/2 each)
            self.values = tuple(t.detach().clone() for t in tensors)


def _plain_layer(cache, layer_idx):
    """The cache's layer ``layer_idx`` when it is a plain DynamicLayer that can carry rotated keys."""
    if getattr(cache, "offloading", False) or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    return layer if type(layer) is DynamicLayer else None


def before_update(cache, layer_idx):
    """Called before the cache update of a step: the layer's :class:`RotatedKeys` if they are still in
    step with its keys (module docstring), else None."""
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    layer = _plain_layer(cache, layer_idx)
    rk = layer.__dict__.get(_ATTR) if layer is not None and layer.is_initialized else None
    return rk if rk is not None and rk.in_step(layer) else None


def attend(module, q, k, v, q_pos, k_pos, cache, in_step, *, causal, kpm, attn_mask, softcap=None,
           return_probs=False):
    """The attention of a decoding step through the layer's rotated keys (module docstring), or None
    when this call does not qualify. q (B, H, Lq, d) raw; k, v (B, Hkv, Lk, .) every key after the
    update; ``in_step``: :func:`before_update`'s answer for this step."""
    Lq, Lk = q.shape[2], k.shape[2]
    if cache is None or Lq > MAX_QUERIES or Lk == Lq or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None  # not a decoding step (a first call has nothing cached: no buffer for one forward)
    layer = _plain_layer(cache, module.layer_idx)
    if layer is None or layer.keys is not k:  # the attention must see exactly the layer's keys
        return None
    tensors = delta, beta, freqs = module.angles(q.device, compute_dtype(q.dtype))
    angles = (q.dtype, q.device)
    rk = in_step if in_step is not None and Lk == in_step.n + Lq and in_step.same_angles(angles, tensors) else None
    rebuilt = rk is None
    if rebuilt:  # out of step: rotate every key again
        rk = layer.__dict__.get(_ATTR) or RotatedKeys()
        layer.__dict__[_ATTR] = rk
        rk.n = 0
    k_rotated = rk.buffer(q, Lk)
    # the module checked every argument (positions when they entered, masks in _attend): no second round
    p = decoding_plan(q, k, v, q_pos, k_pos, causal=causal, scale=module.scaling, key_padding_mask=kpm,
                      attn_mask=attn_mask, layout=module.cmha_layout, rotary_dim=2 * freqs.shape[-1], softcap=softcap)
    out = decoding_attention(p, q, k, v, *(t.to(p.pdtype) for t in tensors), k_rotated, rk.n, return_probs)
    rk.n = Lk
    rk.record(layer, angles, tensors, rebuilt)
    return out
