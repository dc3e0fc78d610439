"""Convert a Hugging Face Llama / Mistral / Qwen2 model to CMHA, and save / load converted models.

    model = AutoModelForCausalLM.from_pretrained(...)
    convert_to_cmha(model)                  # same logits as before (delta = 1, beta = 0 is RoPE)
    ...train (delta, beta learnable)...
    model.save_pretrained(path)             # config.json records the conversion
    model = load_cmha(path)                 # the converted model again, same logits

How it stays exact: each attention module is swapped for :class:`CMHAAttention`, which keeps the
original q_proj / k_proj / v_proj / o_proj modules (so PEFT / LoRA ``target_modules`` still match)
and takes its rotation frequencies from the model's own rotary embedding (``inv_freq``, after any
frequency-only ``rope_scaling``: linear, llama3, yarn). yarn's attention factor (cos and sin both
scaled by s) is applied as an s^2 factor on the softmax scale. RoPE types whose frequencies change
with the sequence length (dynamic, longrope) or that rotate only part of a head cannot be
reproduced by a fixed CMHA rotation and are refused.

The model's ``attn_implementation`` becomes "complexformer_cmha": HF then builds, for plain causal
attention, the 2-D padding mask the fused CMHA kernel takes; sliding windows (Mistral, Qwen2) and
packed sequences keep HF's exact 4-D masks (rotation kernel + SDPA).
"""
from __future__ import annotations

import torch

from .cmha_attention import ATTN_IMPLEMENTATION, LEARNABLE, CMHAAttention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_NAMES = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and their base models (LlamaModel, ...)"
EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
CONFIG_KEY = "cmha_conversion"  # the config entry that records a conversion (saved in config.json)


def _attention_classes():
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return LlamaAttention, MistralAttention, Qwen2Attention


def _rotary(model):
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        raise ValueError(f"convert_to_cmha: expected one rotary embedding module in {type(model).__name__}, "
                         f"found {len(found)}")
    return found[0]


def _rope_type(rotary, config):
    rt = getattr(rotary, "rope_type", None)
    if rt is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rt = params.get("rope_type", params.get("type", "default"))
    return rt


def _frequencies(rotary, config, head_dim):
    """(freqs (head_dim/2,) float32 on the CPU, attention_scaling) of the model's rotary embedding."""
    rt = _rope_type(rotary, config)
    if isinstance(rt, dict):  # per-layer-type rope (not in the supported families)
        raise NotImplementedError(f"convert_to_cmha: per-layer rope types {rt} are not supported")
    if rt not in EXACT_ROPE_TYPES:
        raise NotImplementedError(
            f"convert_to_cmha: rope type {rt!r} cannot be reproduced exactly by CMHA's fixed rotation "
            f"(its frequencies depend on the sequence length, or it rotates part of a head); supported: "
            f"{', '.join(EXACT_ROPE_TYPES)}"
        )
    inv = rotary.inv_freq
    if inv.device.type == "meta":
        # Built under from_pretrained's meta-device init: recompute the values on the CPU with the
        # rotary embedding's own init function.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rt == "default":  # computed by the module's own static method (takes no device)
            with torch.device("cpu"):
                inv, _ = rotary.compute_default_rope_parameters(config)
        else:
            inv, _ = ROPE_INIT_FUNCTIONS[rt](config, torch.device("cpu"))
    s = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    inv = inv.detach().to("cpu", torch.float32)
    if tuple(inv.shape) != (head_dim // 2,):
        raise NotImplementedError(
            f"convert_to_cmha: the rotary embedding has {inv.numel()} frequencies but head_dim/2 = {head_dim // 2} "
            "(partial rotary embeddings are not supported)"
        )
    return inv, s


def _check_model(model):
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"convert_to_cmha: {type(model).__name__} (model_type={mt!r}) is not supported; supported: {SUPPORTED_NAMES}"
        )
    if getattr(config, CONFIG_KEY, None) and any(isinstance(m, CMHAAttention) for m in model.modules()):
        raise ValueError(f"convert_to_cmha: {type(model).__name__} is already converted")
    H, Hkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if H % Hkv:
        raise ValueError(f"{type(config).__name__}.num_key_value_heads ({Hkv}) must divide num_attention_heads ({H})")
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise NotImplementedError(f"convert_to_cmha: attention_dropout={config.attention_dropout} is not supported "
                                  "by CMHA attention; set config.attention_dropout = 0.0")
    return config


def convert_to_cmha(model, *, learnable=LEARNABLE, backend="auto"):
    """Swap every attention module of a Llama / Mistral / Qwen2 model for CMHA, in place.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or their base
            ``...Model`` (any head on these decoders works the same way).
        learnable: which CMHA angles become trainable parameters, a subset of ("delta", "beta"). They
            start at delta = 1, beta = 0, where CMHA equals the model's RoPE: the converted model's
            outputs equal the original's. The others stay fixed (non-persistent buffers).
        backend: the CMHA backend ("auto", "fused", "sdpa", "reference") for causal / padded attention.

    The new parameters are named ``...self_attn.delta`` / ``...self_attn.beta``;
    :func:`cmha_parameters` returns them for their own optimizer group. Returns the model.
    """
    config = _check_model(model)
    learnable = tuple(learnable)
    attn_classes = _attention_classes()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, attn_classes)]
    if not targets:
        raise ValueError(f"convert_to_cmha: no Llama/Mistral/Qwen2 attention module found in {type(model).__name__}")
    rotary = _rotary(model)
    num_layers = config.num_hidden_layers
    for name, attn in targets:
        head_dim = attn.head_dim
        freqs, s = _frequencies(rotary, config, head_dim)
        ref = next(attn.parameters())
        new = CMHAAttention(
            hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim, layer_idx=attn.layer_idx, num_layers=num_layers, freqs=freqs,
            scaling=attn.scaling * s * s, learnable=learnable, delta_init="rope",
            projections=(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj), backend=backend,
            device=ref.device, dtype=ref.dtype,
        )
        new.train(attn.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    setattr(config, CONFIG_KEY, {"learnable": list(learnable), "backend": backend})
    config._attn_implementation = ATTN_IMPLEMENTATION
    return model


def cmha_parameters(model):
    """The learnable CMHA angles (delta, beta) of every CMHA attention module in ``model``.

    For separate learning rates, e.g. with ``Trainer(optimizers=(opt, None))``::

        angles = cmha_parameters(model)
        ids = {id(p) for p in angles}
        opt = torch.optim.AdamW([{"params": angles, "lr": 1e-2, "weight_decay": 0.0},
                                 {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}],
                                lr=1e-4)
    """
    out = []
    for m in model.modules():
        if isinstance(m, CMHAAttention):
            out.extend(p for n, p in m.named_parameters(recurse=False) if n in LEARNABLE)
    return out


_CLASS_CACHE = {}


def cmha_model_class(cls):
    """A subclass of the HF model class ``cls`` whose instances are converted on construction, so
    ``from_pretrained`` of a saved converted model builds the CMHA modules before loading the
    weights (delta / beta load like any parameter, with no unexpected or missing keys)."""
    if cls in _CLASS_CACHE:
        return _CLASS_CACHE[cls]

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        info = getattr(config, CONFIG_KEY, None) or {}
        # the conversion runs on an already-converted config: clear the marker for the check
        setattr(config, CONFIG_KEY, None)
        convert_to_cmha(self, learnable=tuple(info.get("learnable", LEARNABLE)), backend=info.get("backend", "auto"))

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, CMHAAttention):
            module.init_weights_hf()
        else:
            cls._init_weights(self, module)

    sub = type(f"CMHA{cls.__name__}", (cls,), {"__init__": __init__, "_init_weights": _init_weights,
                                                 "__module__": __name__})
    _CLASS_CACHE[cls] = sub
    return sub


def load_cmha(path, *, model_class=None, **kwargs):
    """Load a model saved after :func:`convert_to_cmha` (``save_pretrained``): the same converted
    model, learned delta / beta included. ``model_class`` defaults to the class in the saved config's
    ``architectures``; ``kwargs`` go to ``from_pretrained`` (dtype, device_map, ...)."""
    import transformers
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    if not getattr(config, CONFIG_KEY, None):
        raise ValueError(f"load_cmha: {path} holds no converted model (its config has no {CONFIG_KEY!r}); "
                         "load it with from_pretrained and call convert_to_cmha")
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"load_cmha: cannot tell the model class from architectures={names!r}; pass model_class=")
    if kwargs.get("attn_implementation", ATTN_IMPLEMENTATION) != ATTN_IMPLEMENTATION:
        raise ValueError(f"load_cmha: attn_implementation must be {ATTN_IMPLEMENTATION!r} (or left out)")
    kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
    return cmha_model_class(model_class).from_pretrained(path, config=config, **kwargs)


__all__ = ["convert_to_cmha", "cmha_parameters", "cmha_model_class", "load_cmha", "CMHAAttention",
           "ATTN_IMPLEMENTATION"]
