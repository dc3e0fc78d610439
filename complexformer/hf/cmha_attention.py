"""The Hugging Face attention module behind CMHA: one class for converted Llama / Mistral / Qwen2
models (:func:`complexformer.hf.convert_to_cmha`) and for :class:`complexformer.models.ComplexFormerForCausalLM`.

It keeps HF's module contract (``forward(hidden_states, position_embeddings, attention_mask, cache,
position_ids=..., **kwargs) -> (out, None)``, projections named q_proj / k_proj / v_proj / o_proj so
PEFT ``target_modules`` match) and replaces "apply RoPE, then attend" by one CMHA call on the raw
q and k. ``position_embeddings`` (HF's cos/sin) are ignored: the rotation is rebuilt from
``position_ids`` and the frequencies taken from the model's rotary embedding at conversion.

Masks. The module accepts what HF's mask machinery produces:
- ``None``: plain causal (bottom-right aligned with a cache) -> the fused CMHA kernel;
- a 2-D ``(B, Lk)`` padding mask (bool or 0/1 ints, True = attend) -> the fused kernel with a
  key padding mask. The ``attn_implementation`` registered here (:data:`ATTN_IMPLEMENTATION`)
  makes HF hand over exactly these two for plain causal attention;
- a 4-D ``(B|1, 1|H, Lq, Lk)`` mask, boolean (True = attend) or additive float (HF's "eager"),
  for everything else HF expresses: sliding windows, packed sequences (position_ids restarting),
  custom masks. Served by ``cmha_attention(attn_mask=...)`` (rotation kernel + torch SDPA), exact but
  slower. A query row with no visible key outputs 0 (HF's eager path gives a uniform average there).
Every case, partial rotary, ``output_attentions`` and softcapping included, goes through the one
attention core shared with :class:`complexformer.CMHA` (:func:`complexformer.module.attend`), so
the empty-row and NaN-row rules are cmha_attention's everywhere.
A ``BlockMask`` (flex attention) is refused.

KV cache. The contract of every CMHA cache (docs/design.md, "KV cache"): raw (un-rotated) keys and
values plus each key's int64 position. Here the HF ``Cache`` layers hold the raw keys and the cache
carries one extra
``DynamicLayer`` after the model's layers (index ``num_layers``) whose "keys" are the int64
positions (B, 1, L, 1), written by layer 0 and read by every layer. Being an ordinary cache layer,
it follows the cache through beam-search reordering, batch selection, cropping and offloading.
Only dynamic caches are supported (DynamicCache, also with sliding-window layers); static and
quantized caches raise.
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.masking_utils import (
        AttentionMaskInterface, causal_mask_function, sdpa_mask,
    )
except ImportError as e:  # pragma: no cover - exercised only without (a recent enough) transformers
    raise ImportError(
        "complexformer's CMHA attention for Hugging Face models needs transformers >= 4.56 (Cache layers, "
        f"AttentionMaskInterface): pip install -U 'complexformer[hf]' ({e})"
    ) from e

try:
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - transformers without the output collector
    _active_collector = None

from ..checks import check_backend, check_key_padding_mask, check_positions, compute_dtype
from ..module import attend
from ..reference import default_freqs
from . import rotated_keys
from .serving_attention import serving_attention, serving_positions

ATTN_IMPLEMENTATION = "complexformer_cmha"
LEARNABLE = ("delta", "beta")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _cmha_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
               attention_mask=None, **kwargs):
    """HF mask hook for :data:`ATTN_IMPLEMENTATION`: None or the 2-D padding mask (which CMHA's fused
    kernel takes directly) whenever the mask is plain causal + padding, else HF's boolean 4-D mask.

    "Plain" is decided exactly: by the mask function itself, or, for other patterns (a sliding window
    that the sequence does not exceed, ...), by comparing HF's 4-D mask with the causal + padding
    one (one elementwise comparison per forward, skipped under torch.compile). The 2-D form also
    needs the index alignment the module assumes: queries bottom-right after the keys.
    """
    ints = not isinstance(q_offset, torch.Tensor) and not isinstance(kv_offset, torch.Tensor)
    aligned = ints and q_offset - kv_offset == kv_length - q_length and (
        attention_mask is None or attention_mask.shape[-1] == kv_offset + kv_length)
    if aligned and mask_function is causal_mask_function:
        return _padding_mask(attention_mask, kv_length)
    kwargs["allow_is_causal_skip"] = False
    full = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)
    if aligned and full is not None and not torch.compiler.is_compiling():
        plain = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, causal_mask_function,
                          attention_mask, **dict(kwargs, use_vmap=False))
        if torch.equal(full, plain.expand_as(full)):
            return _padding_mask(attention_mask, kv_length)
    return full


def _padding_mask(attention_mask, kv_length):
    """The 2-D padding mask of the last ``kv_length`` keys, or None when nothing is padded. Under
    torch.compile the mask is always kept: "nothing padded" is a data-dependent branch that would
    break ``fullgraph=True`` (the kernel gives the same result with an all-True mask)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if not torch.compiler.is_compiling() and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                  sliding_window=None, cmha_positions=None, **kwargs):
    """The attention function HF's own attention modules call under :data:`ATTN_IMPLEMENTATION`
    (modules adapted by ``families.py``): ``query`` (B, H, Lq, d) and ``key`` / ``value``
    (B, Hkv, Lk, d) arrive un-rotated (the module applied an identity rotary embedding), and
    ``cmha_positions`` = (query positions, cache or None, rotated keys in step or None) from the
    adapted forward. ``scaling`` is
    the module's own (``module.scaling``, which conversion multiplied by yarn's s^2); the sliding
    window is already in the mask HF built. Returns (out (B, Lq, H, d), probabilities or None)."""
    if not isinstance(module, CMHAState) or cmha_positions is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} is served by complexformer's CMHA attention, but "
            f"{type(module).__name__} was not converted (CMHA needs q and k before any rotary embedding). "
            "Convert the model with complexformer.hf.convert_to_cmha."
        )
    if dropout and module.training:
        raise NotImplementedError(f"{type(module).__name__}: attention dropout ({dropout}) is not supported by CMHA "
                                  "attention; set config.attention_dropout = 0.0")
    q_pos, cache, in_step = cmha_positions
    if module._cmha_serving is not None:  # serving mode (serving.py): rotate, cache, the model's attention function
        return serving_attention(module, query, key, value, attention_mask, q_pos, cache, scaling=scaling,
                                 dropout=dropout, softcap=softcap, sliding_window=sliding_window, **kwargs)
    k_pos = module._read_positions(cache, query.shape[0], key.shape[2]) if cache is not None else q_pos
    if softcap is not None or _attention_collector() is not None or kwargs.get("output_attentions"):
        # softcapping (Gemma 2) and attention probabilities: the written-out path, never a dropped cap
        out, probs = module._attend(query, key, value, q_pos, k_pos, attention_mask, softcap, return_probs=True,
                                    cache=cache, in_step=in_step)
    else:
        out, probs = module._attend(query, key, value, q_pos, k_pos, attention_mask, cache=cache, in_step=in_step), None
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _cmha_mask)


def _attention_collector():
    """transformers' output collector when the caller asked for the attention probabilities
    (``output_attentions=True``), else None."""
    if _active_collector is None:  # other transformers versions pass output_attentions to the module instead
        return None
    if torch.compiler.is_compiling() and not getattr(_active_collector, "compiling", False):
        return None  # nothing was set under compile (ComplexFormer's own forward); a ContextVar read would break the graph
    collected = _active_collector.get()
    return collected if collected is not None and "attentions" in collected else None


def _check_cache_type(cache):
    if cache is not None and not isinstance(cache, Cache):
        serving = (" A paged cache (continuous batching) needs serving mode: "
                   "complexformer.hf.set_cmha_mode(model, 'serving').") if hasattr(cache, "update") else ""
        raise TypeError(f"cache: CMHA attention (training mode) expected a transformers Cache (e.g. DynamicCache), "
                        f"got {type(cache).__name__}.{serving}")


class _TorchInit:
    normal_ = staticmethod(nn.init.normal_)
    constant_ = staticmethod(nn.init.constant_)


def _hf_init():
    """transformers' init functions, which skip tensors loaded from a checkpoint (transformers >= 5),
    else torch's."""
    try:
        from transformers import initialization
    except ImportError:
        return _TorchInit
    return initialization if hasattr(initialization, "constant_") else _TorchInit


class CMHAState:
    """The CMHA half of an attention module: the learnable angles (delta / beta, kept in float32),
    the frequencies, the key positions carried in the cache, and the call into the attention core
    shared with CMHA (:func:`complexformer.module.attend`). Shared by :class:`CMHAAttention` (own
    forward) and the adapted HF attention modules of ``families.py`` (the HF forward, with this
    attention). Attributes set by the owner:
    ``cmha_num_heads``, ``learnable``, ``delta_init``, ``backend``, ``scaling``, ``layer_idx``,
    ``num_layers``, ``cmha_layout`` ("half" | "interleaved"), ``_freqs_master`` (float64, one
    entry per rotary pair: fewer than head_dim/2 for partial rotary), ``_derived`` ({})."""

    cmha_layout = "half"
    _cmha_serving = None  # the model's config while in serving mode (serving.py), else None
    # the angle parameters: kept in float32 under a low-precision cast (_apply), returned by
    # cmha_parameters and carried by save_cmha_angles
    _float32_params = LEARNABLE
    _fixed_values = {"delta": 1.0, "beta": 0.0}  # an angle that is not learnable: RoPE's value

    def _apply(self, fn, *args, **kwargs):
        # delta / beta never go below float32: in bfloat16 1 + 1e-3 rounds back to 1, so a model
        # cast with .to(torch.bfloat16) / .half() could no longer learn them (the kernels compute
        # in float32 anyway). Every other tensor is cast as asked.
        kept = {n: p.data for n, p in self._parameters.items() if n in self._float32_params and p is not None}
        super()._apply(fn, *args, **kwargs)
        for n, old in kept.items():
            p = self._parameters.get(n)
            if p is not None and p.dtype in _LOW_PRECISION:
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def _fixed(self, name, device, dtype):
        key = (name, device, dtype)
        t = self._derived.get(key)
        if t is None:
            h = self._freqs_master.numel()
            if name == "freqs":
                t = self._freqs_master.to(device=device, dtype=dtype)
            else:
                t = torch.full((self.cmha_num_heads, h), self._fixed_values[name], device=device, dtype=dtype)
            self._derived[key] = t
        return t

    def angles(self, device, dtype):
        """(delta, beta, freqs) for the attention call: learnable ones as parameters, fixed ones
        (and freqs) as constants in ``dtype`` (float32, or float64 for float64 inputs)."""
        delta = self.delta if "delta" in self.learnable else self._fixed("delta", device, dtype)
        beta = self.beta if "beta" in self.learnable else self._fixed("beta", device, dtype)
        return delta, beta, self._fixed("freqs", device, dtype)

    @property
    def freqs(self):
        """The rotation frequencies omega (rotary pairs,), float64 on the CPU (read-only copy)."""
        return self._freqs_master.clone()

    @torch.no_grad()
    def reset_cmha_parameters(self, init=_TorchInit):
        """Learnable delta: 1 ("rope") or N(0, 1/sqrt(h)) ("normal"); learnable beta: 0."""
        if "delta" in self.learnable:
            if self.delta_init == "normal":
                init.normal_(self.delta, 0.0, self._freqs_master.numel() ** -0.5)
            else:
                init.constant_(self.delta, 1.0)
        if "beta" in self.learnable:
            init.constant_(self.beta, 0.0)

    def init_weights_hf(self):
        """:meth:`reset_cmha_parameters` for a model's ``_init_weights`` under HF loading: tensors
        already loaded from a checkpoint (flagged ``_is_hf_initialized``) are left alone."""
        self.reset_cmha_parameters(_hf_init())

    @staticmethod
    def _query_positions(position_ids, cache_position, B, L, past, device):
        p = position_ids if position_ids is not None else cache_position
        if p is None:
            return (past + torch.arange(L, device=device))[None]
        return check_positions("position_ids", p, B, L, device, other="hidden_states")

    def _check_cache_layer(self, cache):
        if self.layer_idx < len(cache.layers):
            layer = cache.layers[self.layer_idx]
            quantized = type(layer).__name__.endswith("QuantizedLayer") or hasattr(layer, "_quantize")
            if not isinstance(layer, DynamicLayer) or quantized:
                raise NotImplementedError(
                    f"cache: CMHA attention needs a dynamic cache of raw keys (DynamicCache); layer {self.layer_idx} "
                    f"of {type(cache).__name__} is a {type(layer).__name__}. Use generate(cache_implementation="
                    "'dynamic') or pass a DynamicCache."
                )

    def _cached_positions(self, cache, q_pos, B, L, Lk):
        """Absolute positions (B, Lk) of the keys this layer attends to (cached + new)."""
        self._record_positions(cache, q_pos, B, L)
        return self._read_positions(cache, B, Lk)

    def _record_positions(self, cache, q_pos, B, L):
        """Layer 0 appends the new queries' positions to the cache's extra position layer."""
        slot, layers = self.num_layers, cache.layers
        if self.layer_idx == 0:
            filler = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
            while len(layers) < slot:
                layers.append(filler())
            if len(layers) == slot:
                layers.append(DynamicLayer())
            p = q_pos.expand(B, L)[:, None, :, None]
            layers[slot].update(p, p.new_empty(B, 1, L, 0))

    def _read_positions(self, cache, B, Lk):
        """The positions (B, Lk) of the last ``Lk`` keys recorded in the cache."""
        slot, layers = self.num_layers, cache.layers
        pos = layers[slot].keys if len(layers) > slot and layers[slot].is_initialized else None
        if pos is None or pos.dim() != 4 or pos.shape[2] < Lk or pos.shape[0] != B:
            have = "none" if pos is None else f"{pos.shape[2]} for batch {pos.shape[0]}"
            raise RuntimeError(
                f"cache: layer {self.layer_idx} holds {Lk} keys (batch {B}) but the cache records key positions for "
                f"{have}. A cache filled by another model, or edited outside transformers' Cache methods, cannot "
                "be used with CMHA attention."
            )
        return pos[:, 0, -Lk:, 0]

    def _attend(self, q, k, v, q_pos, k_pos, mask, softcap=None, return_probs=False, cache=None, in_step=None):
        """The attention of raw q, k, v through the shared core (:func:`complexformer.module.attend`):
        None / a 2-D padding mask is causal attention (fused kernel for whole-head rotary), a 4-D
        mask is the whole pattern. out, or (out, probabilities) with ``return_probs`` / ``softcap``.
        ``cache`` (k, v are its keys and values after this step's update) and ``in_step``
        (:func:`rotated_keys.before_update`) let a decoding step use the cached rotated keys."""
        mask = self._check_mask(q, k, mask)
        kpm = attn = None
        if mask is not None and mask.dim() == 2:  # HF's 2-D mask: nonzero = attend (values not checked: no host sync)
            kpm = check_key_padding_mask("attention_mask", mask.to(q.device), q.shape[0], k.shape[2], q.device,
                                         ints=True, check_values=False)
        elif mask is not None:
            attn = mask
        if cache is not None:  # a decoding step: the keys rotated when they entered the cache (rotated_keys.py)
            done = rotated_keys.attend(self, q, k, v, q_pos, k_pos, cache, in_step, causal=attn is None, kpm=kpm,
                                       attn_mask=attn, softcap=softcap, return_probs=return_probs or softcap is not None)
            if done is not None:
                return done
        delta, beta, freqs = self.angles(q.device, compute_dtype(q.dtype))
        return attend(q, k, v, delta, beta, freqs, positions=(q_pos, k_pos), causal=attn is None, key_padding_mask=kpm,
                      attn_mask=attn, scale=self.scaling, layout=self.cmha_layout, backend=self.backend,
                      softcap=softcap, return_probs=return_probs)

    @staticmethod
    def _check_mask(q, k, mask):
        """``mask`` if it is None or 2-D; a valid 4-D mask with HF's additive convention (the dtype's
        minimum on hidden keys) turned into -inf, as cmha_attention's attn_mask wants (else an error)."""
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError(
                "attention_mask: expected None, a 2-D (batch, keys) padding mask or a 4-D (batch, 1, queries, keys) "
                f"mask, got {type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else tuple(mask.shape)} "
                "(flex-attention BlockMasks are not supported by CMHA attention)"
            )
        if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (Lq, Lk):
            raise ValueError(f"attention_mask: expected a 4-D shape (B={B} or 1, 1 or H={H}, Lq={Lq}, Lk={Lk}), "
                             f"got {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            return mask
        if not mask.is_floating_point():
            raise TypeError(f"attention_mask: a 4-D mask must be bool or floating point, got {mask.dtype}")
        return mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))


class CMHAAttention(CMHAState, nn.Module):
    """CMHA self-attention with HF's module interface (see the module docstring).

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim: shapes (head_dim even, num_kv_heads | num_heads).
        layer_idx: this layer's index in the cache; num_layers: the model's layer count (the cache
            slot after the last layer holds the key positions).
        freqs: (head_dim/2,) rotation frequencies (used in float32, float64 for float64 inputs; not
            saved: rebuilt from the config).
        scaling: softmax scale (default head_dim^-0.5).
        learnable: which of "delta", "beta" are trainable parameters; the others are fixed
            constants (delta = 1, beta = 0: RoPE), neither parameters nor state.
        delta_init: "rope" (delta = 1: exactly RoPE at the start, used by conversion) or "normal"
            (the authors' N(0, 1/sqrt(head_dim/2))); only for a learnable delta.
        bias: (q, k, v, o) biases when the projections are built here.
        projections: existing (q_proj, k_proj, v_proj, o_proj) modules to keep (conversion).
        backend: CMHA backend ("auto", "fused", "sdpa", "reference"); "fused" becomes "auto" for
            what the fused kernel does not serve (4-D masks, partial rotary).
    """

    def __init__(self, *, hidden_size, num_heads, num_kv_heads, head_dim, layer_idx, num_layers, freqs,
                 scaling=None, learnable=LEARNABLE, delta_init="rope", bias=(False, False, False, False),
                 projections=None, backend="auto", device=None, dtype=None):
        super().__init__()
        for name, val in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must divide num_attention_heads ({num_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even: CMHA pairs the features of a head")
        learnable = tuple(learnable)
        bad = [x for x in learnable if x not in LEARNABLE]
        if bad:
            raise ValueError(f"learnable: expected a subset of {LEARNABLE}, got {learnable!r}")
        if delta_init not in ("rope", "normal"):
            raise ValueError(f"delta_init: expected 'rope' or 'normal', got {delta_init!r}")
        check_backend(backend)
        h = head_dim // 2
        freqs = torch.as_tensor(freqs, device="cpu").detach() if not isinstance(freqs, torch.Tensor) else freqs.detach()
        if freqs.device.type == "meta":
            raise ValueError("freqs: pass real values (a CPU tensor), not a meta tensor")
        if tuple(freqs.shape) != (h,):
            raise ValueError(f"freqs: expected shape ({h},) for head_dim {head_dim}, got {tuple(freqs.shape)}")
        self.hidden_size, self.num_heads, self.num_key_value_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.layer_idx, self.num_layers = head_dim, layer_idx, num_layers
        self.num_key_value_groups = num_heads // num_kv_heads
        self.cmha_num_heads = num_heads
        self.scaling = head_dim ** -0.5 if scaling is None else float(scaling)
        self.learnable, self.delta_init, self.backend = learnable, delta_init, backend
        self.is_causal = True
        fk = {"device": device, "dtype": dtype}
        if projections is None:
            qb, kb, vb, ob = bias
            projections = (nn.Linear(hidden_size, num_heads * head_dim, bias=qb, **fk),
                           nn.Linear(hidden_size, num_kv_heads * head_dim, bias=kb, **fk),
                           nn.Linear(hidden_size, num_kv_heads * head_dim, bias=vb, **fk),
                           nn.Linear(num_heads * head_dim, hidden_size, bias=ob, **fk))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = projections
        pdev = device if device is not None else next(self.q_proj.parameters()).device
        pdt = dtype if dtype is not None else next(self.q_proj.parameters()).dtype
        pdt = torch.float32 if pdt in _LOW_PRECISION else pdt  # see _apply
        for name in learnable:
            setattr(self, name, nn.Parameter(torch.empty(num_heads, h, device=pdev, dtype=pdt)))
        # Fixed angles (delta = 1, beta = 0) and the frequencies are derived data, not state: plain
        # attributes materialised per (device, dtype) on first use. Not buffers, so that
        # .to(bfloat16) never rounds omega (omega * position would drift by radians at long
        # positions), meta-device loading cannot leave them uninitialised, and FSDP / DDP see only
        # real parameters. freqs are kept in float64 on the CPU and used in float32 (float64 for
        # float64 inputs).
        self._freqs_master = freqs.to(torch.float64).cpu()
        self._derived = {}
        self.reset_cmha_parameters()

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"layer_idx={self.layer_idx}, learnable={self.learnable}, backend={self.backend!r}")

    # ------------------------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, position_ids=None,
                past_key_values=None, past_key_value=None, **kwargs):
        # transformers >= 5.24 names the cache `cache`; earlier releases `past_key_values` / `past_key_value`.
        if cache is None:
            cache = past_key_values if past_key_values is not None else past_key_value
        B, L, _ = hidden_states.shape
        H, Hkv, d = self.num_heads, self.num_key_value_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, L, H, d).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, L, Hkv, d).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, L, Hkv, d).transpose(1, 2)
        collector = _attention_collector()
        if self._cmha_serving is not None:  # serving mode (serving.py): the model's attention function
            q_pos = serving_positions(self, position_ids, kwargs.get("cache_position"), cache, B, L, q.device)
            out, probs = serving_attention(self, q, k, v, attention_mask, q_pos, cache, scaling=self.scaling, **kwargs)
        else:
            out, probs = self._training_attention(q, k, v, attention_mask, cache, position_ids, collector, **kwargs)
            out = out.transpose(1, 2)
        out = self.o_proj(out.reshape(B, L, H * d))
        if collector is not None:  # transformers >= 5 records attentions through this collector
            collector["attentions"].append(probs)
            probs = None
        return out, probs

    def _training_attention(self, q, k, v, attention_mask, cache, position_ids, collector, **kwargs):
        """CMHA attention of raw q, k, v with the raw-key cache: (out (B, H, Lq, d), probabilities or None)."""
        B, _, L, _ = q.shape
        _check_cache_type(cache)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        q_pos = self._query_positions(position_ids, kwargs.get("cache_position"), B, L, past, q.device)
        in_step = None
        if cache is not None:
            self._check_cache_layer(cache)
            in_step = rotated_keys.before_update(cache, self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
            k_pos = self._cached_positions(cache, q_pos, B, L, k.shape[2])
        else:
            k_pos = q_pos
        if collector is not None or kwargs.get("output_attentions"):
            # output_attentions=True: the probabilities exist only on the reference path
            return self._attend(q, k, v, q_pos, k_pos, attention_mask, return_probs=True, cache=cache, in_step=in_step)
        return self._attend(q, k, v, q_pos, k_pos, attention_mask, cache=cache, in_step=in_step), None


def rope_freqs(head_dim, rope_theta):
    """RoPE's inverse frequencies rope_theta^(-2j/d) (float32), as HF's default rotary embedding."""
    return default_freqs(head_dim, rope_theta, device="cpu")
