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
hold them: :func:`save_cmha_angles` / :func:`load_cmha_angles` keep them beside it.

The model's ``attn_implementation`` becomes "complexformer_cmha" (on its own copy of the config): HF then builds, for plain causal
attention, the 2-D padding mask the fused CMHA kernel takes; sliding windows and packed sequences
keep HF's exact 4-D masks (rotation kernel + SDPA).
"""
from __future__ import annotations

import torch

from .cmha_attention import ATTN_IMPLEMENTATION, LEARNABLE, CMHAAttention, CMHAState
from .families import FAMILIES, adapt, check_family, check_widths, view_model_config

LEGACY_MODEL_TYPES = ("llama", "mistral", "qwen2")  # served by CMHAAttention; the rest by families.adapt
SUPPORTED_MODEL_TYPES = LEGACY_MODEL_TYPES + tuple(FAMILIES)


def _supported_names():
    """The causal LM classes of the supported model types, for error messages."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

    return (", ".join(names.get(mt, mt) for mt in SUPPORTED_MODEL_TYPES)
            + " and their base models (LlamaModel, ...; README, 'Hugging Face models')")
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


def _frequencies(rotary, config, layer_type=None):
    """(freqs (rotary pairs,) float32 on the CPU, attention_scaling) of the model's rotary embedding,
    for ``layer_type`` when the rope is per layer type (Gemma 3: ``{layer_type}_inv_freq``)."""
    rt = _rope_type(rotary, config)
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


def _check_model(model):
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"convert_to_cmha: {type(model).__name__} (model_type={mt!r}) is not supported; supported: {_supported_names()}"
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
    freqs, s = _frequencies(_rotary(model), config)  # one rotary embedding: the same for every layer
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


def cmha_parameters(model):
    """The learnable CMHA angles (delta, beta; omega of ``learnable_freqs`` models) of every CMHA
    attention module in ``model``.

    For separate learning rates, e.g. with ``Trainer(optimizers=(opt, None))``::

        angles = cmha_parameters(model)
        ids = {id(p) for p in angles}
        opt = torch.optim.AdamW([{"params": angles, "lr": 1e-2, "weight_decay": 0.0},
                                 {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids]}],
                                lr=1e-4)
    """
    return [p for *_, p in _angle_items(model)]


ANGLES_FILE = "cmha_angles.safetensors"


def _unwrap(model):
    """The transformers model inside PEFT (``PeftModel.get_base_model()``) / DDP wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def _angle_items(model):
    """(qualified name, module, "delta" | "beta", parameter) of every learnable CMHA angle, named in
    the transformers model (PEFT's ``base_model.model.`` prefix stripped, so a file fits the bare
    model and its adapters alike)."""
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, CMHAState):
            for n, p in m.named_parameters(recurse=False):
                if n in m._float32_params:  # the angles: delta, beta (and omega with learnable_freqs)
                    yield (f"{name}.{n}" if name else n), m, n, p


def _named_angles(model):
    """{name: parameter} of the learnable delta / beta (see :func:`_angle_items`)."""
    return {key: p for key, _, _, p in _angle_items(model)}


def save_cmha_angles(model, directory):
    """Save the learned CMHA angles (delta / beta, and omega with learnable_freqs) of ``model`` (a converted model or
    ComplexFormerForCausalLM, bare or wrapped by PEFT) to ``directory/cmha_angles.safetensors``.

    PEFT's ``save_pretrained`` saves only the adapter: call this beside it when the angles are
    trained under PEFT, and :func:`load_cmha_angles` after ``PeftModel.from_pretrained``. The file
    is written atomically. Returns its path.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    angles = _named_angles(model)
    if not angles:
        raise ValueError(f"save_cmha_angles: {type(model).__name__} has no learnable CMHA angles")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ANGLES_FILE)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cmha_angles.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in angles.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


@torch.no_grad()
def load_cmha_angles(model, directory):
    """Load the angles :func:`save_cmha_angles` wrote to ``directory`` into ``model`` (in place).
    Every learnable angle of the model must be in the file and every entry must match one, with
    the same shape; otherwise nothing is loaded and a ValueError names the keys. Returns the model."""
    import os

    from safetensors.torch import load_file

    path = os.path.join(directory, ANGLES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_cmha_angles: no {ANGLES_FILE} in {directory} (written by save_cmha_angles)")
    saved, angles = load_file(path), _named_angles(model)
    missing, unexpected = sorted(set(angles) - set(saved)), sorted(set(saved) - set(angles))
    bad = [k for k in angles if k in saved and saved[k].shape != angles[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"load_cmha_angles: {path} does not fit {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatch {bad}")
    for k, p in angles.items():
        p.copy_(saved[k].to(device=p.device, dtype=p.dtype))
    return model


def _angles_at_risk(model):
    """True when ``model`` holds CMHA angles that a PEFT adapter save would lose: trainable ones,
    or ones moved from their RoPE start (delta = 1, beta = 0) in a converted model."""
    return any(p.requires_grad or _moved(m, n, p) for _, m, n, p in _angle_items(model))


def _moved(m, n, p):
    """Whether angle ``n`` left its known start: omega its frequencies; delta / beta RoPE's 1 / 0
    when they started there (delta_init "rope"; a random start is unknown)."""
    if n == "omega":
        return bool((p != m._freqs_master.to(device=p.device, dtype=p.dtype)).any())
    return m.delta_init == "rope" and bool((p != (1.0 if n == "delta" else 0.0)).any())


def _warn_on_peft_save():
    """Make ``peft.PeftModel.save_pretrained`` warn when it drops learned CMHA angles (it saves the
    adapter only) and no cmha_angles file is beside it. Installed once; changes nothing else."""
    try:
        from peft import PeftModel
    except ImportError:
        return
    original = PeftModel.save_pretrained
    if getattr(original, "_cmha_checked", False):
        return

    import functools
    import os
    import warnings

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        result = original(self, save_directory, *args, **kwargs)
        if not os.path.isfile(os.path.join(save_directory, ANGLES_FILE)) and _angles_at_risk(self):
            warnings.warn(
                f"PeftModel.save_pretrained saved the adapter only: the learned CMHA angles (delta / beta) of "
                f"{type(_unwrap(self)).__name__} are not in {save_directory}. Save them with "
                "complexformer.hf.save_cmha_angles(model, directory) and restore them with load_cmha_angles "
                "(PDLTrainer does this in its checkpoints).", UserWarning, stacklevel=2)
        return result

    save_pretrained._cmha_checked = True
    PeftModel.save_pretrained = save_pretrained


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
