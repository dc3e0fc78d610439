"""Hugging Face integration: the layer between the framework-free ops of ``complexformer`` and
the applications (``complexformer.lab``).

- :func:`label_token_counts` (``label_counts.py``): the PDL class counts of a causal LM's label
  stream, over a dataset or a DataLoader, all-reduced under torch.distributed.
- :class:`PDLTrainer` (``pdl_trainer.py``): finetuning with the Power-Law Decay Loss, exact under
  gradient accumulation and DDP.
- :func:`apply_fused_pdl` (``fused_pdl.py``): patches a causal LM so that its loss runs through
  the fused LM head + loss and never builds the logits.
- :func:`convert_to_cmha`, :func:`load_cmha`, :func:`cmha_parameters` (``cmha.py``): CMHA inside
  HF models of 21 RoPE families (README table); :func:`save_cmha_angles` / :func:`load_cmha_angles`
  keep learned angles beside a PEFT adapter; :class:`CMHAAttention` (``cmha_attention.py``) is the
  attention module of converted Llama / Mistral / Qwen2 and of :class:`ComplexFormerForCausalLM`;
  the other families keep their HF attention modules, adapted in ``families.py``;
  :func:`set_cmha_mode` (``serving.py``) switches a converted model to serving mode (rotated keys
  in a standard cache, any ``attn_implementation``, continuous batching).
- :class:`ComplexFormerConfig` / :class:`ComplexFormerForCausalLM` (``configuration_complexformer.py``,
  ``modeling_complexformer.py``): a causal LM on CMHA, also importable as ``complexformer.models``.

transformers is imported only when a name that needs it is first used, so that importing
``complexformer.hf`` for ``label_token_counts`` stays fast.
"""
import importlib

from .label_counts import label_token_counts

# ComplexFormerConfig's choices; here, without transformers, for the lab's argument parsers
ATTENTIONS = ("cmha", "rope", "none")
LOSSES = ("ce", "pdl")

# name -> (module, needs transformers)
_LAZY = {
    "apply_fused_pdl": ("fused_pdl", False),
    "PDLTrainer": ("pdl_trainer", True), "_WindowNormalizer": ("pdl_trainer", True),
    "convert_to_cmha": ("cmha", True), "load_cmha": ("cmha", True), "cmha_parameters": ("angles", True),
    "cmha_model_class": ("cmha", True), "save_cmha_angles": ("angles", True), "load_cmha_angles": ("angles", True),
    "set_cmha_mode": ("serving", True), "cmha_mode": ("serving", True),
    "CMHAAttention": ("cmha_attention", True), "ATTN_IMPLEMENTATION": ("cmha_attention", True),
    "ComplexFormerConfig": ("configuration_complexformer", True),
    "ComplexFormerForCausalLM": ("modeling_complexformer", True),
    "ComplexFormerModel": ("modeling_complexformer", True),
}
__all__ = ["label_token_counts", *(n for n in _LAZY if not n.startswith("_"))]


def _need_transformers(name):
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"complexformer.hf.{name} needs transformers: pip install 'complexformer[hf]'") from e


def __getattr__(name):
    # imported on first use: importing transformers takes seconds
    if name in _LAZY:
        module, needs_transformers = _LAZY[name]
        if needs_transformers:
            _need_transformers(name)
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
