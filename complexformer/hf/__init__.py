"""Hugging Face integration.

- :func:`label_token_counts` and :class:`PDLTrainer` (``pdl_trainer.py``): finetuning with the
  Power-Law Decay Loss, exact under gradient accumulation and DDP.
- :func:`apply_fused_pdl` (``fused_pdl.py``): patches a causal LM so that its loss runs through
  the fused LM head + loss and never builds the logits.

transformers is imported only when a name that needs it is first used, so that importing
``complexformer.hf`` for ``label_token_counts`` stays fast.
"""
from .pdl_trainer import _WindowNormalizer, label_token_counts  # noqa: F401

__all__ = ["PDLTrainer", "apply_fused_pdl", "label_token_counts"]


def __getattr__(name):
    # Built on first use: importing transformers takes seconds.
    if name == "apply_fused_pdl":
        from .fused_pdl import apply_fused_pdl

        return apply_fused_pdl
    if name == "PDLTrainer":
        from .pdl_trainer import _build_pdl_trainer

        cls = globals()["PDLTrainer"] = _build_pdl_trainer()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
