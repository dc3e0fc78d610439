"""Serving mode: a CMHA model behind the standard Hugging Face attention interface
(docs/design.md, "Serving mode").

Training mode (the default after conversion) caches raw keys and their positions, and the CMHA
kernel rotates them inside the attention; only complexformer's attention function understands
that cache. Engines that drive a model through HF's attention interface (``generate`` with any
``attn_implementation``, transformers' continuous batching with its paged cache, the Transformers
backends of serving engines) call ``config._attn_implementation``'s function with q and k already
rotated and write the rotated keys to their own cache. Serving mode does exactly that, per
attention module:

    q~ = rotation of q with beta, k~ = rotation of k without, at the tokens' positions
    (complexformer.euler_rotate_qk), k~ per QUERY head: under GQA each query head has its own
    delta, so the rotated keys of one kv head differ per query head;
    v repeated to the H query heads to match;
    cache.update(k~, v) on whatever cache the caller passes; then the attention function.

The cache is therefore H heads wide (H / Hkv times the original's under GQA), and
``config.num_key_value_heads`` reads H while serving so that engines size their caches that wide.
The projections keep their Hkv width: the true value is in ``config.cmha_serving``, which
:func:`complexformer.hf.load_cmha` (``cmha_model_class``) and ``ComplexFormerModel`` read back
(:func:`restore_training_config`), so a model saved while serving reloads (and serves) as it was.

Serving mode computes the same function as training mode (float rounding apart): rotation and
attention are the same math, split at the cache.
"""
from __future__ import annotations

from .angles import unwrap_model
from .cmha_attention import ATTN_IMPLEMENTATION, CMHAState

SERVING_KEY = "cmha_serving"  # config entry while serving: {"num_key_value_heads": Hkv, "attn_implementation": ...}
MODES = ("training", "serving")


def set_cmha_mode(model, mode, *, attn_implementation="sdpa"):
    """Switch a converted model (or ComplexFormerForCausalLM, bare or wrapped by PEFT) between
    "training" mode (CMHA attention, raw-key cache; the default) and "serving" mode (q and k rotated
    before ``attn_implementation``'s attention function, rotated H-wide keys in the cache; see the
    module docstring). Returns the model.

    Args:
        mode: "training" or "serving".
        attn_implementation: the attention function serving mode calls: "sdpa", "eager",
            "paged|eager", a flash implementation, or any name registered with transformers'
            ``AttentionInterface``. Engines may switch it later with ``model.set_attn_implementation``.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    base = unwrap_model(model)
    modules = [m for m in base.modules() if isinstance(m, CMHAState)]
    if not modules:
        raise ValueError(f"set_cmha_mode: {type(base).__name__} has no CMHA attention module "
                         "(convert it with complexformer.hf.convert_to_cmha first)")
    config = base.config
    record = getattr(config, SERVING_KEY, None)
    if mode == "serving":
        attn_implementation = _check_implementation(attn_implementation)
        if record is None:
            record = {"num_key_value_heads": getattr(config, "num_key_value_heads", None)}
            if record["num_key_value_heads"] is not None:
                config.num_key_value_heads = modules[0].cmha_num_heads
        setattr(config, SERVING_KEY, dict(record, attn_implementation=attn_implementation))
        config._attn_implementation = attn_implementation
        for m in modules:
            _serve(m, config)
    elif restore_training_config(config) is not None:
        config._attn_implementation = ATTN_IMPLEMENTATION
        for m in modules:
            _unserve(m)
    return model


def cmha_mode(model):
    """"serving" or "training" (see :func:`set_cmha_mode`)."""
    return "serving" if getattr(unwrap_model(model).config, SERVING_KEY, None) else "training"


def restore_training_config(config):
    """``config`` of a model saved while serving, back to its training form (true kv heads, no
    serving entry), for building the model; returns the recorded attn_implementation, or None
    when the config was saved in training mode."""
    record = getattr(config, SERVING_KEY, None)
    if not record:
        return None
    if record.get("num_key_value_heads") is not None:
        config.num_key_value_heads = record["num_key_value_heads"]
    setattr(config, SERVING_KEY, None)
    return record.get("attn_implementation", "sdpa")


def _check_implementation(name):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not isinstance(name, str):
        raise TypeError(f"attn_implementation: expected a str, got {type(name).__name__}")
    if name == ATTN_IMPLEMENTATION:
        raise ValueError(f"attn_implementation: {name!r} is CMHA's own attention (training mode); serving mode "
                         "calls a standard one: 'sdpa', 'eager', 'paged|eager', ...")
    known = set(ALL_ATTENTION_FUNCTIONS) | {"eager"}
    if name.startswith("paged|") and name not in known:
        name = name.removeprefix("paged|")  # as transformers >= 5.22 does: "paged|sdpa" is "sdpa" with a paged cache
    if name not in known:
        raise ValueError(f"attn_implementation: {name!r} is not a registered attention implementation; "
                         f"known: {sorted(known - {ATTN_IMPLEMENTATION})}")
    return name


def _serve(module, config):
    if module._cmha_serving is None and hasattr(module, "num_key_value_groups"):
        module._cmha_kv_groups = module.num_key_value_groups
    module._cmha_serving = config
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = 1  # k~ and v arrive H wide: the attention function repeats nothing


def _unserve(module):
    if module._cmha_serving is None:
        return
    if hasattr(module, "_cmha_kv_groups"):
        module.num_key_value_groups = module.__dict__.pop("_cmha_kv_groups")
    module._cmha_serving = None
