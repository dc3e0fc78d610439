"""Convert a Hugging Face model of a supported RoPE family to CMHA, and save / load converted models.

    model = AutoModelForCausalLM.from_pretrained(...)
    convert_to_cmha(model)                  # same logits as before (delta = 1, beta = 0 is RoPE)
    ...train (delta, beta learnable)...
    model.save_pretrained(path)             # config.json records the conversion
    model = load_cmha(path)                 # the converted model again, same logits

How it stays exact: the rotation frequencies come from the model's own rotary embedding
(``inv_freq``, per layer type for Gemma 3, after any frequency-only rope scaling: linear, llama3,
yarn); yarn's attention factor (cos and sin both scaled by s) is applied as an s^2 factor on the
softmax scale. Llama / Mistral / Qwen2 attention modules are swapped for :class:`CMHAAttention`,
which keeps the original q_proj / k_proj / v_proj / o_proj modules (PEFT / LoRA ``target_modules``
still match). The other families (:data:`families.FAMILIES`) keep their HF attention modules,
adapted in place by ``families.py``. RoPE types whose frequencies change with the sequence length
(dynamic, longrope) cannot be reproduced by a fixed CMHA rotation and are refused.

Saved state: ``save_pretrained`` / :func:`load_cmha` carry delta / beta (float32 even in a bf16
model) and rebuild the frequencies from the config, any number of times. A PEFT adapter does not
hold them: :func:`save_cmha_angles` / :func:`load_cmha_angles` (``angles.py``) keep them beside it.

The model's ``attn_implementation`` becomes "complexformer_cmha" (on its own copy of the config): HF then builds, for plain causal
attention, the 2-D padding mask the fused CMHA kernel takes; sliding windows and packed sequences
keep HF's exact 4-D masks (rotation kernel + SDPA).
"""
from __future__ import annotations

import torch

from .angles import _warn_on_peft_save, cmha_parameters, load_cmha_angles, save_cmha_angles  # noqa: F401 (public here too)
from .cmha_attention import ATTN_IMPLEMENTATION, LEARNABLE, CMHAAttention, CMHAState
from .families import (FAMILIES, SUPPORTED_MODEL_TYPES, adapt, check_family, check_widths, supported_names,
                       view_model_config)
from .rope import rope_frequencies, rotary_embedding

CONFIG_KEY = "cmha_conversion"  # the config entry that records a conversion (saved in config.json)


def _attention_classes():
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return LlamaAttention, MistralAttention, Qwen2Attention


def _check_model(model):
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"convert_to_cmha: {type(model).__name__} (model_type={mt!r}) is not supported; supported: {supported_names()}"
        )
    check_family(config)
    if getattr(config, CONFIG_KEY, None) and any(isinstance(m, CMHAState) for m in model.modules()):
        raise ValueError(f"convert_to_cmha: {type(model).__name__} is already converted")
    H, Hkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if H % Hkv:
        raise ValueError(f"{type(config).__name__}.num_key_value_heads ({Hkv}) must divide num_attention_heads ({H})")
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise NotImplementedError(f"convert_to_cmha: attention_dropout={config.attention_dropout} is not supported "
                                  "by CMHA attention; set config.attention_dropout = 0.0")
    return config


def convert_to_cmha(model, *, learnable=LEARNABLE, backend="auto"):
    """Make every attention module of a supported HF model CMHA, in place.

    Args:
        model: the causal LM or base model of a family in :data:`SUPPORTED_MODEL_TYPES` (README
            table). Llama / Mistral / Qwen2 attention modules are swapped for
            :class:`CMHAAttention`; the other families keep their HF attention modules, adapted by
            ``families.py`` (docs/design.md, "HF families").
        learnable: which CMHA angles become trainable parameters, a subset of ("delta", "beta"). They
            start at delta = 1, beta = 0, where CMHA equals the model's RoPE: the converted model's
            outputs equal the original's. The others stay fixed (non-persistent buffers).
        backend: the CMHA backend ("auto", "fused", "sdpa", "reference") for causal / padded attention.

    The new parameters are named ``...self_attn.delta`` / ``...self_attn.beta``;
    :func:`cmha_parameters` returns them for their own optimizer group. Returns the model.
    """
    config = _check_model(model)
    learnable = tuple(learnable)
    if config.model_type in FAMILIES:
        adapt(model, config, FAMILIES[config.model_type], learnable=learnable, backend=backend)
        return _mark_converted(model, config, learnable, backend)
    attn_classes = _attention_classes()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, attn_classes)]
    if not targets:
        raise ValueError(f"convert_to_cmha: no Llama/Mistral/Qwen2 attention module found in {type(model).__name__}")
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    for name, attn in targets:
        check_widths(config, name, attn, H, Hkv, attn.head_dim)
    freqs, s = rope_frequencies(rotary_embedding(model), config)  # one rotary embedding: the same for every layer
    num_layers = config.num_hidden_layers
    for name, attn in targets:
        head_dim = attn.head_dim
        if tuple(freqs.shape) != (head_dim // 2,):
            raise NotImplementedError(
                f"convert_to_cmha: the rotary embedding has {freqs.numel()} frequencies but head_dim/2 = "
                f"{head_dim // 2} (partial rotary is not supported for {config.model_type})")
        ref = next(attn.parameters())
        new = CMHAAttention(
            hidden_size=config.hidden_size, num_heads=H, num_kv_heads=Hkv,
            head_dim=head_dim, layer_idx=attn.layer_idx, num_layers=num_layers, freqs=freqs,
            scaling=attn.scaling * s * s, learnable=learnable, delta_init="rope",
            projections=(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj), backend=backend,
            device=ref.device, dtype=ref.dtype,
        )
        new.train(attn.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return _mark_converted(model, config, learnable, backend)


def _mark_converted(model, config, learnable, backend):
    # The model gets its own config: another model built from the same config object keeps its
    # attention implementation (and no conversion marker).
    _own_config(model, config)
    view_model_config(model)
    setattr(model.config, CONFIG_KEY, {"learnable": list(learnable), "backend": backend})
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    _warn_on_peft_save()
    return model


def _own_config(model, config):
    """Give ``model`` (and its submodules that share ``config``) a copy of ``config``."""
    import copy

    own = copy.deepcopy(config)
    for m in model.modules():
        if getattr(m, "config", None) is config:
            m.config = own


_CLASS_CACHE = {}


def cmha_model_class(cls):
    """A subclass of the HF model class ``cls`` whose instances are converted on construction, so
    ``from_pretrained`` of a saved converted model builds the CMHA modules before loading the
    weights (delta / beta load like any parameter, with no unexpected or missing keys)."""
    cls = getattr(cls, "_cmha_base_class", cls)
    if cls in _CLASS_CACHE:
        return _CLASS_CACHE[cls]

    def __init__(self, config, *args, **kwargs):
        from .serving import restore_training_config, set_cmha_mode

        serving = restore_training_config(config)  # saved while serving: build with the true kv heads
        cls.__init__(self, config, *args, **kwargs)
        info = getattr(config, CONFIG_KEY, None) or {}
        convert_to_cmha(self, learnable=tuple(info.get("learnable", LEARNABLE)), backend=info.get("backend", "auto"))
        if serving:
            set_cmha_mode(self, "serving", attn_implementation=serving)

    @torch.no_grad()
    def _init_weights(self, module):
        if not isinstance(module, CMHAAttention):
            cls._init_weights(self, module)
        if isinstance(module, CMHAState):
            module.init_weights_hf()

    # The subclass keeps the HF class's name: save_pretrained records it as the config's
    # ``architectures``, which load_cmha (and every other tool) reads back.
    # transformers applies its checkpoint key renamings (GPT-NeoX: embed_out -> lm_head) only to
    # its own classes: this subclass lives in complexformer but loads the same checkpoints.
    is_custom_code = classmethod(lambda sub_cls: cls.is_custom_code())
    sub = type(cls.__name__, (cls,), {"__init__": __init__, "_init_weights": _init_weights,
                                      "is_custom_code": is_custom_code,
                                      "__module__": __name__, "__qualname__": cls.__qualname__,
                                      "_cmha_base_class": cls})
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
        name = names[0] if names else ""
        # checkpoints saved by earlier versions record the subclass's name "CMHA<class>"
        model_class = getattr(transformers, name, None) or (
            getattr(transformers, name[4:], None) if name.startswith("CMHA") else None)
        if model_class is None:
            raise ValueError(f"load_cmha: cannot tell the model class from architectures={names!r}; pass model_class=")
    if kwargs.get("attn_implementation", ATTN_IMPLEMENTATION) != ATTN_IMPLEMENTATION:
        raise ValueError(f"load_cmha: attn_implementation must be {ATTN_IMPLEMENTATION!r} (or left out)")
    kwargs["attn_implementation"] = ATTN_IMPLEMENTATION
    return cmha_model_class(model_class).from_pretrained(path, config=config, **kwargs)


__all__ = ["convert_to_cmha", "cmha_parameters", "cmha_model_class", "load_cmha", "save_cmha_angles",
           "load_cmha_angles", "CMHAAttention", "ATTN_IMPLEMENTATION"]
