"""The attention of serving mode (``serving.py``, docs/design.md "Serving mode"): rotate q and k
at the new tokens' positions (k per query head), write k~ and v to the caller's cache, and call the
model's ``attn_implementation`` function, as the original model does after RoPE."""
from __future__ import annotations

import functools
import inspect
import sys

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..checks import LAYOUTS, compute_dtype
from ..rotate import rotate_partial, rotate_qk


@functools.lru_cache(maxsize=None)
def _update_takes_kwargs(cache_type):
    """Whether ``cache_type.update`` takes the attention kwargs (``kwargs=``): transformers' paged cache
    and the Cache classes of transformers >= 5 do; earlier Caches take ``cache_kwargs``."""
    params = inspect.signature(cache_type.update).parameters
    return "kwargs" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _eager(module):
    """The eager attention function of the module's family (Gemma 2's applies its softcap), else Llama's."""
    base = getattr(type(module), "_cmha_base_class", None)
    fn = getattr(sys.modules[base.__module__], "eager_attention_forward", None) if base is not None else None
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def serving_positions(module, position_ids, cache_position, cache, B, L, device):
    """Query positions (B|1, L) in serving mode: ``position_ids`` / ``cache_position``, else the
    tokens after the cache's (past + arange(L))."""
    past = 0
    if position_ids is None and cache_position is None and cache is not None:
        past = cache.get_seq_length(module.layer_idx)
    return module._query_positions(position_ids, cache_position, B, L, past, device)


def serving_attention(module, query, key, value, attention_mask, q_pos, cache, *, scaling, dropout=0.0, **kwargs):
    """Serving mode's attention (module docstring): query (B, H, L, d), key / value (B, Hkv, L, d)
    raw, of the new tokens only. Returns the attention function's (out (B, L, H, dv), weights)."""
    if cache is not None and not hasattr(cache, "update"):
        raise TypeError(f"cache: expected a transformers cache with an update method, got {type(cache).__name__}")
    delta, beta, freqs = module.angles(query.device, compute_dtype(query.dtype))
    # the rotation op itself (euler_rotate_qk without its checks): q and k come from the module's own
    # projections and q_pos was checked by serving_positions; freqs may cover fewer pairs (partial rotary)
    layout = LAYOUTS[module.cmha_layout]
    qr, kr = rotate_partial(lambda q, k: rotate_qk(q, k, delta, beta, freqs, q_pos, q_pos, layout), query, key,
                            2 * freqs.shape[-1])
    groups = qr.shape[1] // value.shape[1]
    vr = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if cache is not None:
        extra = {"kwargs": kwargs} if _update_takes_kwargs(type(cache)) else {}
        kr, vr = cache.update(kr, vr, module.layer_idx, **extra)
    impl = module._cmha_serving._attn_implementation  # "eager" is not in the registry: the family's own
    fn = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else _eager(module)
    return fn(module, qr, kr, vr, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
