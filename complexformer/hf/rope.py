"""The rotation frequencies of a Hugging Face model, read from its own rotary embedding: what
makes a converted model exact (docs/design.md, "HF families", "Hugging Face state")."""
from __future__ import annotations

import torch

EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rotary_embedding(model):
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        raise ValueError(f"convert_to_cmha: expected one rotary embedding module in {type(model).__name__}, "
                         f"found {len(found)}")
    return found[0]


def rope_type(rotary, config):
    rt = getattr(rotary, "rope_type", None)
    if rt is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rt = params.get("rope_type", params.get("type", "default"))
    return rt


def rope_frequencies(rotary, config, layer_type=None):
    """(freqs (rotary pairs,) float32 on the CPU, attention_scaling) of the model's rotary embedding,
    for ``layer_type`` when the rope is per layer type (Gemma 3: ``{layer_type}_inv_freq``)."""
    rt = rope_type(rotary, config)
    prefix = ""
    if isinstance(rt, dict):
        if layer_type not in rt:
            raise NotImplementedError(f"convert_to_cmha: per-layer rope types {rt} without layer_type {layer_type!r}")
        rt, prefix = rt[layer_type], f"{layer_type}_"
    if rt not in EXACT_ROPE_TYPES:
        raise NotImplementedError(
            f"convert_to_cmha: {type(config).__name__}.rope_parameters['rope_type'] = {rt!r} cannot be reproduced "
            "exactly by CMHA's fixed rotation (its frequencies depend on the sequence length); supported: "
            f"{', '.join(EXACT_ROPE_TYPES)}"
        )
    inv = getattr(rotary, f"{prefix}inv_freq")
    s = float(getattr(rotary, f"{prefix}attention_scaling", 1.0) or 1.0)
    if inv.device.type == "meta":
        # Built under from_pretrained's meta-device init: recompute the values on the CPU with the
        # rotary embedding's own init function. The explicit CPU device context matters: the init
        # functions create tensors without a device (torch.arange(...).to(device)), which would
        # otherwise land on the meta device of the surrounding context.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = rotary.compute_default_rope_parameters if rt == "default" else ROPE_INIT_FUNCTIONS[rt]
        with torch.device("cpu"):
            inv, s = init(config, device=torch.device("cpu"), **({"layer_type": layer_type} if layer_type else {}))
        s = float(s or 1.0)
    return inv.detach().to("cpu", torch.float32), s
