"""Hugging Face integration.

- :func:`label_token_counts` and :class:`PDLTrainer` (``pdl_trainer.py``): finetuning with the
  Power-Law Decay Loss, exact under gradient accumulation and DDP.
- :func:`apply_fused_pdl` (``fused_pdl.py``): patches a causal LM so that its loss runs through
  the fused LM head + loss and never builds the logits.
- :func:`convert_to_cmha`, :func:`load_cmha`, :func:`cmha_parameters` (``cmha.py``): CMHA inside
  HF models of 21 RoPE families (README table); :func:`save_cmha_angles` / :func:`load_cmha_angles`
  keep learned angles beside a PEFT adapter; :class:`CMHAAttention` (``cmha_attention.py``) is the
  attention module of converted Llama / Mistral / Qwen2 and of
  ``complexformer.models.ComplexFormerForCausalLM``; the other families keep their HF attention
  modules, adapted in ``families.py``.

transformers is imported only when a name that needs it is first used, so that importing
``complexformer.hf`` for ``label_token_counts`` stays fast.
"""
import importlib

from .pdl_trainer import _WindowNormalizer, label_token_counts  # noqa: F401

# name -> (module, needs transformers)
_LAZY = {
    "apply_fused_pdl": ("fused_pdl", False),
    "convert_to_cmha": ("cmha", True), "load_cmha": ("cmha", True), "cmha_parameters": ("cmha", True),
    "cmha_model_class": ("cmha", True), "save_cmha_angles": ("cmha", True), "load_cmha_angles": ("cmha", True),
    "CMHAAttention": ("cmha_attention", True), "ATTN_IMPLEMENTATION": ("cmha_attention", True),
}
__all__ = ["PDLTrainer", "label_token_counts", *_LAZY]


def _need_transformers(name):
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"complexformer.hf.{name} needs transformers: pip install 'complexformer[hf]'") from e


def __getattr__(name):
    # Built / imported on first use: importing transformers takes seconds.
    if name == "PDLTrainer":
        _need_transformers(name)
        from .pdl_trainer import _build_pdl_trainer

        cls = globals()["PDLTrainer"] = _build_pdl_trainer()
        return cls
    if name in _LAZY:
        module, needs_transformers = _LAZY[name]
        if needs_transformers:
            _need_transformers(name)
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
