"""``ComplexFormerConfig``: the configuration of :class:`complexformer.hf.ComplexFormerForCausalLM`
(``modeling_complexformer.py``), as transformers splits a model into configuration_* and modeling_*.

``attention`` is the one field a comparison changes:
- "cmha": learnable delta and beta per head (parameters named ``...self_attn.delta`` / ``.beta``;
  :meth:`ComplexFormerForCausalLM.cmha_parameters` returns them for their own optimizer group);
- "rope": the same attention with delta = 1, beta = 0 fixed (buffers, not parameters): RoPE. Its
  parameter count is "cmha"'s minus the 2 * layers * heads * head_dim/2 of delta and beta;
- "none": no positional information at all (delta = 1, beta = 0, freqs = 0: plain causal attention).

Ablations, each one field (``complexformer.hf.ablation_attention``):
- ``learnable_freqs=True``: per-head frequencies omega (heads, head_dim/2) as parameters, initialised
  to the fixed ones ("rope": an AdaRoPE-like baseline; "cmha": CMHA with learnable frequencies);
- ``fixed_delta=0.0``: "cmha" with delta a constant 0 instead of a parameter: the rotation is
  beta + omega p, the token's own phase dropped;
- ``rotary_fraction=0.25``: only the first quarter of the pairs (the highest frequencies) rotate,
  the rest get frequency 0 (partial RoPE for "rope").
"""
from __future__ import annotations

import math

try:
    from transformers import PretrainedConfig
except ImportError as e:  # pragma: no cover
    raise ImportError(f"ComplexFormerConfig needs transformers >= 4.56: pip install -U 'complexformer[hf]' ({e})") from e

from . import ATTENTIONS, LOSSES
from .cmha_attention import ATTN_IMPLEMENTATION


class ComplexFormerConfig(PretrainedConfig):
    """Configuration of :class:`ComplexFormerForCausalLM`.

    Args (beyond PretrainedConfig's):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads: the usual sizes.
        num_key_value_heads: GQA kv heads (default num_attention_heads); must divide it.
        head_dim: default hidden_size // num_attention_heads (even).
        intermediate_size: SwiGLU width, default 8/3 * hidden_size rounded up to a multiple of 64.
        max_position_embeddings: documentation only (CMHA has no position table).
        rope_theta: base of the rotation frequencies rope_theta^(-2j/d).
        rms_norm_eps: RMSNorm epsilon.
        attention: one of ATTENTIONS, "cmha" | "rope" | "none" (see the module docstring).
        delta_init: "normal" (the authors' N(0, 1/sqrt(head_dim/2))) or "rope" (delta = 1: start as RoPE);
            only for attention="cmha".
        attention_bias: biases on q/k/v/o projections.
        loss: "ce" | "pdl"; pdl_alpha: the PDL exponent :meth:`ComplexFormerForCausalLM.set_pdl_counts`
            uses (``set_pdl_weights`` takes ready weights instead).
        tie_word_embeddings: LM head shares the embedding matrix.
        attn_backend: CMHA backend ("auto", "fused", "sdpa", "reference").
        learnable_freqs, fixed_delta, rotary_fraction: the ablations (see the module docstring).
        initializer_range: std of the normal init of linear and embedding weights.
    """

    model_type = "complexformer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=None, head_dim=None, intermediate_size=None, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-6, attention="cmha", delta_init="normal",
                 attention_bias=False, loss="ce", pdl_alpha=1.0, tie_word_embeddings=True, attn_backend="auto",
                 initializer_range=0.02, use_cache=True, pad_token_id=None, bos_token_id=None,
                 eos_token_id=None, learnable_freqs=False, fixed_delta=None, rotary_fraction=1.0, **kwargs):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        if delta_init not in ("normal", "rope"):
            raise ValueError(f"delta_init: expected 'normal' or 'rope', got {delta_init!r}")
        if not isinstance(learnable_freqs, bool):
            raise ValueError(f"learnable_freqs: expected a bool, got {learnable_freqs!r}")
        if learnable_freqs and attention == "none":
            raise ValueError("learnable_freqs: attention='none' has no frequencies to learn")
        if fixed_delta is not None:
            if attention != "cmha":
                raise ValueError(f"fixed_delta: only for attention='cmha' (\"{attention}\" has no delta to fix)")
            if isinstance(fixed_delta, bool) or not isinstance(fixed_delta, (int, float)) or not math.isfinite(fixed_delta):
                raise ValueError(f"fixed_delta: expected a finite number or None, got {fixed_delta!r}")
            fixed_delta = float(fixed_delta)
        if isinstance(rotary_fraction, bool) or not isinstance(rotary_fraction, (int, float)) or not 0 < rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction: expected a number in (0, 1], got {rotary_fraction!r}")
        if rotary_fraction != 1 and attention == "none":
            raise ValueError("rotary_fraction: attention='none' rotates nothing")
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({num_key_value_heads}) must divide num_attention_heads "
                             f"({num_attention_heads})")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                                 f"({num_attention_heads}), or pass head_dim")
            head_dim = hidden_size // num_attention_heads
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even: CMHA pairs the features of a head")
        if intermediate_size is None:
            intermediate_size = 64 * math.ceil(8 * hidden_size / 3 / 64)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.rope_theta, self.rms_norm_eps = float(rope_theta), rms_norm_eps
        self.attention, self.delta_init, self.attention_bias = attention, delta_init, attention_bias
        self.loss, self.pdl_alpha = loss, float(pdl_alpha)
        self.learnable_freqs, self.fixed_delta, self.rotary_fraction = learnable_freqs, fixed_delta, float(rotary_fraction)
        self.attn_backend, self.initializer_range, self.use_cache = attn_backend, initializer_range, use_cache
        kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
