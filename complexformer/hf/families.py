"""CMHA for the RoPE families of transformers through one adapter (docs/design.md, "HF families").

Each HF attention module keeps its own ``forward`` (projections, fused qkv, biases, q/k norms,
cache update, output projection) and gets a small subclass (:func:`adapted_class`) that

- passes the module an identity rotary embedding (cos = 1, sin = 0), under which every HF
  ``apply_rotary_pos_emb`` (half or interleaved layout, partial rotary, NoPE skip) returns q and k
  bit for bit, so the attention function and the cache receive the RAW q and k;
- hands the query positions and the cache to the attention function (``cmha_positions``), which
  is ``cmha_attention._hf_attention`` under ``attn_implementation="complexformer_cmha"``.

What cannot be read from the module, its rotary embedding or the attention call is in
:data:`FAMILIES`. Llama, Mistral and Qwen2 keep :class:`CMHAAttention` (their own forward, the
fastest path); every other family in the table goes through this adapter.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .cmha_attention import _LOW_PRECISION, ATTN_IMPLEMENTATION, CMHAState, _check_cache_type
from . import rotated_keys
from .rope import rope_frequencies, rope_type, rotary_embedding
from .serving_attention import serving_positions

# model_type -> what differs from the generic reading. layout: the rotary pair layout;
# nope_attr: the module attribute that is falsy on a layer without rotary embedding (omega = 0);
# refuse: config fields that must be None / False (the reason is in docs/design.md).
FAMILIES = {
    "mixtral": {}, "qwen2_moe": {}, "qwen3": {}, "qwen3_moe": {"refuse": ("sliding_window",)},
    "gemma": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {}, "olmo2": {}, "granite": {},
    "smollm3": {"nope_attr": "use_rope"},
    "glm": {"layout": "interleaved"}, "glm4": {"layout": "interleaved"}, "cohere": {"layout": "interleaved"},
    "starcoder2": {}, "gpt_neox": {}, "stablelm": {}, "phi": {},
}
LEGACY_MODEL_TYPES = ("llama", "mistral", "qwen2")  # served by CMHAAttention; the rest by adapt()
SUPPORTED_MODEL_TYPES = LEGACY_MODEL_TYPES + tuple(FAMILIES)


def supported_names():
    """The causal LM classes of the supported model types, for error messages."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

    return (", ".join(names.get(mt, mt) for mt in SUPPORTED_MODEL_TYPES)
            + " and their base models (LlamaModel, ...; README, 'Hugging Face models')")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_ADAPTED = {}


def _adapted_forward(self, *args, **kwargs):
    cache = next((kwargs[n] for n in _CACHE_KWARGS if kwargs.get(n) is not None), None)
    hidden = args[0] if args else kwargs["hidden_states"]
    pe = kwargs.get("position_embeddings")
    if pe is None:
        raise RuntimeError(f"{type(self).__name__}: expected position_embeddings=(cos, sin) by keyword from the "
                           "decoder layer (the CMHA adapter replaces them by the identity rotation)")
    B, L = hidden.shape[:2]
    cos, sin = pe
    kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
    if self._cmha_serving is not None:
        # serving mode: the attention function rotates q and k and writes the cache itself (serving.py),
        # so the HF forward must not write raw keys to it
        q_pos = serving_positions(self, kwargs.get("position_ids"), kwargs.get("cache_position"), cache, B, L,
                                  hidden.device)
        for n in _CACHE_KWARGS:
            if n in kwargs:
                kwargs[n] = None
        return self._cmha_base_class.forward(self, *args, cmha_positions=(q_pos, cache, None), **kwargs)
    past, in_step = 0, None
    if cache is not None:
        _check_cache_type(cache)
        self._check_cache_layer(cache)
        past = cache.get_seq_length(self.layer_idx)
    q_pos = self._query_positions(kwargs.get("position_ids"), kwargs.get("cache_position"), B, L, past,
                                  hidden.device)
    if cache is not None:
        self._record_positions(cache, q_pos, B, L)
        in_step = rotated_keys.before_update(cache, self.layer_idx)  # before the HF forward updates the cache
    return self._cmha_base_class.forward(self, *args, cmha_positions=(q_pos, cache, in_step), **kwargs)


class CMHAConfigView:
    """The config an adapted attention module reads: the model's config, except that the attention
    function it calls is always complexformer's (``_hf_attention``), whatever the model's
    ``attn_implementation``. In training mode that function applies CMHA to the raw q and k (with
    an "sdpa" or "eager" mask too); in serving mode it rotates q and k and then calls the model's
    implementation. Without the view, ``model.set_attn_implementation("sdpa")`` would send the
    identity-rotated q and k straight to SDPA: no rotation at all."""

    _attn_implementation = ATTN_IMPLEMENTATION

    def __init__(self, config):
        self.__dict__["_cmha_config"] = config

    def __getattr__(self, name):
        try:
            config = self.__dict__["_cmha_config"]
        except KeyError:  # during unpickling / deepcopy, before the state is restored
            raise AttributeError(name) from None
        return getattr(config, name)


def view_model_config(model):
    """Point every adapted module of ``model`` at ``model.config`` through a :class:`CMHAConfigView`
    (after the model got its own config)."""
    for m in model.modules():
        if isinstance(m, CMHAState) and hasattr(type(m), "_cmha_base_class"):
            m.config = CMHAConfigView(model.config)


def adapted_class(cls):
    """The CMHA subclass ``CMHA<cls>`` of an HF attention class (cached, and a name of this module
    once created, so deepcopy and pickling within a process find it). ``isinstance(m, cls)`` still
    holds: transformers' output capture (``output_attentions``), PEFT target names and device maps
    see the same module."""
    if cls in _ADAPTED:
        return _ADAPTED[cls]
    name = f"CMHA{cls.__name__}"
    sub = type(name, (CMHAState, cls), {"forward": _adapted_forward, "_cmha_base_class": cls,
                                        "__module__": __name__, "__qualname__": name})
    setattr(sys.modules[__name__], name, sub)
    _ADAPTED[cls] = sub
    return sub


def attention_modules(model):
    """(name, module) of the HF self-attention modules of ``model`` (one per decoder layer)."""
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def check_widths(config, name, attn, H, Hkv, d):
    """head_dim * heads must equal the projection widths HF reshapes q / k / v (and the output
    projection's input) into; the error names the config fields and the module."""
    cname = type(config).__name__
    q, kv, qkv = "num_attention_heads", "num_key_value_heads", "num_attention_heads + 2 * num_key_value_heads"
    if hasattr(attn, "q_proj"):
        checks = [("q_proj", "out_features", H, q), ("k_proj", "out_features", Hkv, kv),
                  ("v_proj", "out_features", Hkv, kv)]
    elif hasattr(attn, "qkv_proj"):
        checks = [("qkv_proj", "out_features", H + 2 * Hkv, qkv)]
    elif hasattr(attn, "query_key_value"):
        checks = [("query_key_value", "out_features", 3 * H, "3 * num_attention_heads")]
    else:
        raise NotImplementedError(f"convert_to_cmha: {name} ({type(attn).__name__}) has no q_proj, qkv_proj or "
                                  "query_key_value projection")
    if hasattr(attn, "o_proj"):
        checks.append(("o_proj", "in_features", H, q))
    for proj, dim, heads, field in checks:
        width = getattr(getattr(attn, proj), dim, None)
        if width is not None and width != heads * d:
            raise ValueError(
                f"convert_to_cmha: inconsistent config: {cname}.head_dim ({d}) * {field} ({heads}) = {heads * d}, "
                f"but {name}.{proj}.{dim} is {width} (check {cname}.head_dim, num_attention_heads, "
                "num_key_value_heads)")


def check_family(config):
    """The table entry of ``config.model_type``; raises naming the class and the supported families
    (or the refused config field)."""
    spec = FAMILIES.get(config.model_type)
    if spec is None:
        return None
    for field in spec.get("refuse", ()):
        if getattr(config, field, None) not in (None, False):
            raise NotImplementedError(
                f"convert_to_cmha: {type(config).__name__}.{field}={getattr(config, field)!r} is not supported: "
                "transformers applies it only in some attention implementations, so no conversion can match "
                f"the model; set it to None (supported: {supported_names()})")
    return spec


def adapt(model, config, spec, *, learnable, backend):
    """Adapt every attention module of ``model`` (a family in :data:`FAMILIES`) in place."""
    targets = [(n, m) for n, m in attention_modules(model) if not isinstance(m, CMHAState)]
    if not targets:
        raise ValueError(f"convert_to_cmha: no attention module found in {type(model).__name__}")
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    rotary = rotary_embedding(model)
    per_layer = isinstance(rope_type(rotary, config), dict)
    plan, by_layer_type = [], {}
    for name, attn in targets:  # check everything before changing anything
        d = getattr(attn, "head_dim", None) or getattr(attn, "head_size")
        if d % 2:
            raise ValueError(f"convert_to_cmha: {name}.head_dim ({d}) must be even: CMHA pairs the features of a head")
        if getattr(attn, "is_causal", True) is False:
            raise NotImplementedError(f"convert_to_cmha: {name} ({type(attn).__name__}) is bidirectional "
                                      "(use_bidirectional_attention); CMHA attention is causal")
        check_widths(config, name, attn, H, Hkv, d)
        layer_type = config.layer_types[attn.layer_idx] if per_layer else None
        if layer_type not in by_layer_type:  # one computation per rope (Gemma 3: local, global)
            by_layer_type[layer_type] = rope_frequencies(rotary, config, layer_type)
        freqs, s = by_layer_type[layer_type]
        if 2 * freqs.numel() > d:
            raise ValueError(f"convert_to_cmha: {name}: the rotary embedding has {freqs.numel()} frequencies for "
                             f"head_dim {d}")
        if spec.get("nope_attr") and not getattr(attn, spec["nope_attr"]):
            freqs = torch.zeros_like(freqs)  # a NoPE layer: omega = 0, the identity rotation at delta = 1, beta = 0
        plan.append((attn, freqs, s))
    for attn, freqs, s in plan:
        ref = next(attn.parameters())
        pdt = torch.float32 if ref.dtype in _LOW_PRECISION else ref.dtype  # see CMHAState._apply
        attn.__class__ = adapted_class(type(attn))
        attn.cmha_num_heads, attn.num_layers = H, config.num_hidden_layers
        attn.learnable, attn.delta_init, attn.backend = tuple(learnable), "rope", backend
        attn.cmha_layout = spec.get("layout", "half")
        attn._freqs_master, attn._derived = freqs.to(torch.float64), {}
        attn.scaling = attn.scaling * s * s  # yarn: cos and sin both scaled by s
        for n in learnable:
            attn.register_parameter(n, nn.Parameter(torch.empty(H, freqs.numel(), device=ref.device, dtype=pdt)))
        attn.reset_cmha_parameters()
