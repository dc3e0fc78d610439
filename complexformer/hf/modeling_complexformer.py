"""ComplexFormer: a Hugging Face causal LM built on CMHA (``ComplexFormerConfig`` / ``ComplexFormerForCausalLM``).

Pre-norm decoder (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual), final
RMSNorm, LM head (tied to the embedding by default). Registered with ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` under model_type "complexformer", so it works with
``Trainer``, ``generate()``, ``save_pretrained`` / ``from_pretrained``, gradient checkpointing and
``torch.compile``.

The configuration (``attention`` = "cmha" | "rope" | "none", ``loss``, sizes) is
:class:`ComplexFormerConfig` in ``configuration_complexformer.py``.

``loss`` = "ce" (the shifted cross-entropy) or "pdl" (the shifted PDL loss with the ``pdl_weights``
buffer, set by :meth:`ComplexFormerForCausalLM.set_pdl_weights` and saved with the model); both are
:func:`complexformer.causal_lm_pdl_loss`. Under gradient accumulation or DDP use :class:`complexformer.hf.PDLTrainer`, which
computes the exact PDL mean over the whole optimizer step.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import (
        AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel,
    )
    from transformers.cache_utils import Cache, DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover
    raise ImportError(f"ComplexFormerForCausalLM needs transformers >= 4.56: pip install -U 'complexformer[hf]' ({e})") from e

from ..causal_lm import causal_lm_pdl_loss
from ..checks import check_pdl_weights
from ..counts import pdl_weights
from .angles import _warn_on_peft_save, cmha_parameters
from .ablation_attention import AblationAttention, partial_freqs
from .cmha_attention import CMHAAttention, _hf_init, rope_freqs
from .configuration_complexformer import ComplexFormerConfig
from .serving import restore_training_config, set_cmha_mode

_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])
# The name the model outputs give the cache: `cache` from transformers 5.24, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ComplexFormerMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _attention_module(config, layer_idx):
    freqs = rope_freqs(config.head_dim, config.rope_theta)
    if config.attention == "none":
        freqs = torch.zeros_like(freqs)
    fraction = getattr(config, "rotary_fraction", 1.0)
    if fraction != 1.0:
        freqs = partial_freqs(freqs, fraction)
    kwargs = dict(
        hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, layer_idx=layer_idx,
        num_layers=config.num_hidden_layers, freqs=freqs,
        learnable=("delta", "beta") if config.attention == "cmha" else (),
        delta_init="rope" if config.delta_init == "rope" else "normal",
        bias=(config.attention_bias,) * 4, backend=config.attn_backend,
    )
    learnable_freqs, fixed_delta = getattr(config, "learnable_freqs", False), getattr(config, "fixed_delta", None)
    if learnable_freqs or fixed_delta is not None:
        return AblationAttention(learnable_freqs=learnable_freqs, fixed_delta=fixed_delta, **kwargs)
    return CMHAAttention(**kwargs)


class ComplexFormerDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = _attention_module(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ComplexFormerMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, **kwargs):
        a, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, **kwargs)
        hidden_states = hidden_states + a
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class ComplexFormerPreTrainedModel(PreTrainedModel):
    config_class = ComplexFormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ComplexFormerDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # generate() auto-compiles only with a static cache, which CMHA attention refuses;
    # torch.compile(model, fullgraph=True) itself works (tested with a padding mask)
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' init functions skip tensors already loaded from a checkpoint
        init, std = _hf_init(), self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                init.constant_(module.bias, 0.0)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.RMSNorm):
            init.constant_(module.weight, 1.0)
        elif isinstance(module, CMHAAttention):
            module.init_weights_hf()
        elif isinstance(module, ComplexFormerForCausalLM) and module.pdl_weights is not None:
            init.constant_(module.pdl_weights, float("nan"))  # "not set": set_pdl_weights or a checkpoint fills it


class ComplexFormerModel(ComplexFormerPreTrainedModel):
    """The decoder stack without the LM head: returns ``last_hidden_state`` (and the cache)."""

    def __init__(self, config):
        serving = restore_training_config(config)  # saved while serving: build with the true kv heads
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(ComplexFormerDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()
        if serving:
            set_cmha_mode(self, "serving", attn_implementation=serving)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, cache=None, **kwargs):
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        wants = kwargs.get("output_attentions")
        if self.config.output_attentions if wants is None else wants:
            raise NotImplementedError("output_attentions=True: ComplexFormerModel does not return attention "
                                      "probabilities (its fused CMHA kernels never build them)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a cache written during recomputation would hold every step twice
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache and isinstance(cache, Cache):
            cache = None  # (a paged cache, not a Cache, comes from continuous batching with use_cache=False)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (past + torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device))[None]
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(f"attention_mask: expected (batch, keys) or (batch, 1, queries, keys), got shape "
                             f"{tuple(attention_mask.shape)}")
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  **{_CACHE_ARG: cache}, position_ids=position_ids)
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        hidden, all_hidden = inputs_embeds, [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache, **kwargs)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None,
                                       **{_CACHE_FIELD: cache})


def _mask_cache_arg():
    import inspect

    params = inspect.signature(create_causal_mask).parameters
    return "cache" if "cache" in params else "past_key_values"


_CACHE_ARG = _mask_cache_arg()


class ComplexFormerForCausalLM(ComplexFormerPreTrainedModel, GenerationMixin):
    """ComplexFormer with an LM head. ``forward(...)`` -> ``CausalLMOutputWithPast``; with ``labels``
    the loss is HF's shifted one (logits at t predict labels at t+1, -100 ignored): cross-entropy, or
    the PDL weighted mean when ``config.loss == "pdl"``."""

    # transformers 5 maps tied parameters to their source; 4.x lists them
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5
                          else ["lm_head.weight"])

    def __init__(self, config):
        super().__init__(config)
        self.model = ComplexFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.loss == "pdl":
            self.register_buffer("pdl_weights", torch.full((config.vocab_size,), float("nan")))
        else:
            self.pdl_weights = None
        self._pdl_checked = None  # (weakref to the buffer, its version) when last found valid
        self.post_init()
        if config.attention == "cmha":
            _warn_on_peft_save()  # learned angles are not in a PEFT adapter: warn when they would be dropped

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16) / .half() would round the PDL weights to 8 (11) bits: keep them float32.
        w = self._buffers.get("pdl_weights")
        super()._apply(fn, *args, **kwargs)
        new = self._buffers.get("pdl_weights")
        if w is not None and new is not None and new.dtype not in (torch.float32, torch.float64):
            self._buffers["pdl_weights"] = w.to(device=new.device, dtype=torch.float32)
        return self

    @property
    def accepts_loss_kwargs(self):
        # Trainer: True means "my loss is normalised by num_items_in_batch, do not divide it by the
        # accumulation steps". The CE loss is; the PDL mean cannot be (its normaliser is a weight sum of
        # the whole window), so under a plain Trainer loss="pdl" averages the micro-batch means.
        # PDLTrainer computes the exact window mean instead.
        return self.config.loss == "ce"

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def cmha_parameters(self):
        """The learnable CMHA angles (every layer's delta and beta, and omega with ``learnable_freqs``): give them their own optimizer
        group, e.g. ``[{"params": m.cmha_parameters(), "lr": 1e-2}, {"params": rest}]``."""
        return cmha_parameters(self)

    @torch.no_grad()
    def set_pdl_weights(self, weights):
        """Set the (vocab_size,) PDL class weights (``complexformer.pdl_weights(counts, alpha)``)."""
        if self.pdl_weights is None:
            raise ValueError("set_pdl_weights: this model has loss='ce'; build it with ComplexFormerConfig(loss='pdl')")
        w = torch.as_tensor(weights)
        if w.shape != self.pdl_weights.shape or not w.is_floating_point():
            raise ValueError(f"weights: expected a float tensor of shape ({self.config.vocab_size},), got "
                             f"{w.dtype} {tuple(w.shape)}")
        check_pdl_weights(w)
        self.pdl_weights.copy_(w.to(self.pdl_weights.device, torch.float32))

    def set_pdl_counts(self, counts, eps=1e-7, max_weight=None):
        """Set the PDL weights from target-token counts (``complexformer.token_counts`` or
        ``complexformer.hf.label_token_counts``): ``pdl_weights(counts, config.pdl_alpha, eps, max_weight=...)``."""
        self.set_pdl_weights(pdl_weights(counts, alpha=self.config.pdl_alpha, eps=eps, max_weight=max_weight))

    def _checked_pdl_weights(self):
        """The pdl_weights buffer, checked (checks.check_pdl_weights) again whenever it is replaced
        or written in place (load_state_dict, .to(), copy_ all bump its version): two attribute
        reads per call otherwise."""
        w = self.pdl_weights
        seen = self._pdl_checked
        if seen is None or seen[0]() is not w or seen[1] != w._version:
            try:
                check_pdl_weights(w)
            except ValueError as e:
                raise RuntimeError("loss='pdl' but the PDL weights are not set or invalid (NaN, inf or negative; "
                                   "e.g. loaded from a checkpoint that lacks them): call model.set_pdl_weights("
                                   "complexformer.pdl_weights(counts, alpha)) first") from e
            self._pdl_checked = (weakref.ref(w), w._version)
        return w

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=None, inputs_embeds=None, logits_to_keep=0, output_hidden_states=None, return_dict=True,
                cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states,
                         **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"})
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[-1]:
                raise ValueError(f"labels: {labels.shape[-1]} positions but {logits.shape[1]} logits "
                                 "(logits_to_keep must be 0 with labels)")
            if self.config.loss == "pdl":
                loss = causal_lm_pdl_loss(logits, labels, self._checked_pdl_weights())
            else:  # as HF's own causal-LM loss: on float32 logits, divided by num_items_in_batch (the
                # window's token count) under Trainer's gradient accumulation
                loss = causal_lm_pdl_loss(logits.float(), labels, normalizer=kwargs.get("num_items_in_batch"))
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if return_dict else result.to_tuple()


AutoConfig.register("complexformer", ComplexFormerConfig, exist_ok=True)
AutoModel.register(ComplexFormerConfig, ComplexFormerModel, exist_ok=True)
AutoModelForCausalLM.register(ComplexFormerConfig, ComplexFormerForCausalLM, exist_ok=True)
