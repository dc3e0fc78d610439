"""Fused LM head + loss inside Hugging Face causal LMs: :func:`apply_fused_pdl`.

``apply_fused_pdl(model, weights)`` patches one model instance so that ``model(..., labels=y)``
computes the shifted causal-LM loss with :func:`complexformer.fused_linear_pdl_loss` from the
final hidden states and the LM head, and never builds the (B, T, V) logits. ``weights=None`` is
cross-entropy (unit weights), exactly the model's own loss; a (V,) weight vector is PDL.

The loss is :func:`complexformer.causal_lm_pdl_loss` with the LM head; the pieces
:class:`complexformer.hf.PDLTrainer` shares (``final_hidden_states``, ``check_fused_support``,
``router_aux_loss``) live here too. Nothing here imports transformers.
"""
from __future__ import annotations

import functools
import inspect
import math
import types

import torch

from ..causal_lm import causal_lm_pdl_loss
from ..checks import check_pdl_options, check_pdl_weights

__all__ = ["apply_fused_pdl", "is_fused_pdl"]

_PATCH = "_complexformer_fused_pdl"
# config attributes of models that transform the LM head's output before the loss, and the
# value that means "no transform"
_LOGIT_TRANSFORMS = (("final_logit_softcapping", None), ("logit_scale", None), ("logits_scaling", 1.0),
                     ("output_multiplier_scale", None), ("attn_logit_softcapping_final", None),
                     ("lm_head_multiplier", 1.0))
# model_type -> (the config field, the factor c its forward multiplies the logits by) for the families
# whose only logit transform is that scalar: c * (h W^T + b) = (c h) W^T + c b, so the fused head
# applies it exactly. Keyed by family, not by attribute: the same name means different things
# (Granite divides by logits_scaling, HyperCLOVA X multiplies by it). Cohere's forward reads the
# model's own logit_scale (copied from the config at init), Granite's the config.
_LOGIT_SCALES = {
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid"),
                    ("logits_scaling", lambda m: 1.0 / _scale_value(m.config.logits_scaling, "config.logits_scaling"))),
    **dict.fromkeys(("cohere", "cohere2"), ("logit_scale", lambda m: _scale_value(m.logit_scale, "logit_scale"))),
}


def _scale_value(value, name):
    value = float(value)
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"{name}: the fused LM head + loss needs a finite nonzero scale, got {value}")
    return value


def fused_logit_scale(model, who):
    """The factor c by which ``model``'s forward multiplies its LM head's output (Granite:
    1 / ``config.logits_scaling``; Cohere: ``logit_scale``), None when it applies none. Any other
    logit transform (Gemma 2's ``final_logit_softcapping``: a tanh, which no linear head
    computes) raises NotImplementedError naming ``who`` and the config field."""
    cfg = getattr(model, "config", None)
    folded, read = _LOGIT_SCALES.get(getattr(cfg, "model_type", None), (None, None))
    for attr, neutral in _LOGIT_TRANSFORMS:
        value = getattr(cfg, attr, neutral)
        if attr != folded and value is not None and value != neutral:
            raise NotImplementedError(
                f"{who}: {type(model).__name__} transforms its logits ({attr}={value}), which the fused "
                f"head + loss cannot apply; set config.{attr} to {neutral} or use the unfused loss")
    return None if read is None else read(model)


def check_fused_support(model, who):
    """Raise NotImplementedError (naming ``who`` and the reason) unless the fused path computes
    exactly what the model's own head + loss would: an nn.Linear output layer (bias allowed), a
    forward that takes ``logits_to_keep`` and returns ``hidden_states``, and no logit transform
    other than a scale (:func:`fused_logit_scale`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(
            f"{who}: {type(model).__name__} needs an nn.Linear output layer (get_output_embeddings()), "
            f"got {type(head).__name__}")
    forward = getattr(getattr(model, "forward", None), "__wrapped__", None) or model.forward
    params = inspect.signature(forward).parameters
    if "logits_to_keep" not in params:
        raise NotImplementedError(f"{who}: {type(model).__name__}.forward takes no logits_to_keep")
    fused_logit_scale(model, who)


def router_aux_loss(model, outputs):
    """``router_aux_loss_coef * aux_loss`` when the forward returned a router load-balancing loss
    (MoE models with ``output_router_logits=True``: Mixtral, Qwen2-MoE, Qwen3-MoE), the term their
    own loss adds to the cross-entropy; else None. ``model``: the unwrapped model (PEFT is fine)."""
    aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
    if aux is None:
        return None
    # (a PEFT wrapper forwards these attribute reads to the model it holds)
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", None)
    if coef is None:
        raise NotImplementedError(
            f"{type(model).__name__} returned a router aux_loss but has no router_aux_loss_coef: the fused loss "
            "cannot add it as the model would")
    return coef * aux


def final_hidden_states(model, inputs):
    """(outputs, hidden): one forward of ``model`` (a DDP wrapper is fine) asking for the hidden
    states and for the logits of the last position only; ``hidden`` is the final (normed) hidden
    state, the LM head's input."""
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    states = outputs["hidden_states"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else None
    if not states:
        raise NotImplementedError(f"{type(model).__name__}: the forward returned no hidden_states")
    return outputs, states[-1]


def is_fused_pdl(model):
    """True when ``model`` (or the model a DDP / accelerate wrapper holds) was patched by apply_fused_pdl."""
    inner = getattr(model, "module", model)
    return getattr(inner, _PATCH, None) is not None


class _Patch:
    """What apply_fused_pdl keeps on the model: the original forward and the loss settings."""

    def __init__(self, forward, names, weights, ignore_index, label_smoothing, model_weights=False):
        self.forward = forward  # the original forward, a function of (self, ...)
        self.names = names  # its parameters after self, for positional arguments
        self.weights = weights  # None (cross-entropy) or float32 on the CPU
        self.model_weights = model_weights  # read the model's own pdl_weights buffer at each call
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self._on = {}

    def weights_on(self, device):
        w = self._on.get(device)
        if w is None:
            w = self._on[device] = self.weights.to(device)
        return w


def apply_fused_pdl(model, weights=None, *, ignore_index=-100, label_smoothing=0.0):
    """Patch a Hugging Face causal LM so that a forward with ``labels`` computes its loss through
    :func:`complexformer.causal_lm_pdl_loss` with the LM head (``fused_linear_pdl_loss``) and never
    builds the (B, T, V) logits.

    Args:
        model: a transformers causal LM with an ``nn.Linear`` output layer (bias allowed) whose
            forward takes ``logits_to_keep`` and returns ``hidden_states``: Llama, Mistral,
            Qwen2, GPT-2 and most decoder-only models of transformers >= 4.45 (and
            ``ComplexFormerForCausalLM`` / converted CMHA models, which keep these heads).
            A logit scale is folded into the head exactly (Granite / GraniteMoE
            ``logits_scaling``, Cohere / Cohere2 ``logit_scale``); any other logit transform
            (Gemma 2's ``final_logit_softcapping``) raises NotImplementedError naming the field.
        weights: None for the model's own loss: cross-entropy, or, for a model configured for
            PDL (``config.loss == "pdl"`` with a ``pdl_weights`` buffer, as
            ``ComplexFormerForCausalLM``), PDL with that buffer, read at every call; or the (V,)
            PDL class weights (``complexformer.pdl_weights``; finite and >= 0).
        ignore_index, label_smoothing: as in ``pdl_loss``.

    Returns the same model (patched in place; ``apply_fused_pdl`` again replaces the settings).

    The patched ``forward(..., labels=None, shift_labels=None, num_items_in_batch=None, ...)``:
      * without ``labels`` / ``shift_labels``: the original forward, unchanged (generation,
        evaluation with logits);
      * with them: the loss on the shifted labels (``labels[:, 1:]``; ``shift_labels`` is taken
        as already shifted), with the usual mean over the target weights (over the counted
        tokens for cross-entropy), except that a batch with no counted token gives 0, not NaN.
        ``num_items_in_batch`` (what ``transformers.Trainer`` passes under gradient accumulation)
        becomes the denominator, as in the model's own loss: exact under gradient accumulation
        and DDP, like the unpatched model. It is a token count, which is the right denominator
        only for cross-entropy, so with PDL ``weights`` it raises: use
        :class:`complexformer.hf.PDLTrainer`, which passes the window's weight sum.
    The output is the model's usual output with ``loss`` set and, instead of the full logits,
    ``logits`` = the last position's logits only, shape (B, 1, V) (what generation needs next);
    ``hidden_states`` is returned only if you asked for it (``output_hidden_states=True``).
    MoE models asked for their router logits (``output_router_logits=True``, argument or config)
    add ``router_aux_loss_coef * aux_loss`` to the loss, as their own forward does.

    :class:`complexformer.hf.PDLTrainer` uses the fused path automatically for a patched model.
    Patch the transformers model itself, before wrapping it (PEFT's ``get_peft_model``, DDP,
    ``accelerate.prepare``): the wrappers call its forward. The patch is a method bound to the
    instance, so ``copy.deepcopy(model)`` gives a patched copy that runs on its own parameters.
    """

    check_fused_support(model, "apply_fused_pdl")
    check_pdl_options(ignore_index, "mean", label_smoothing)
    V = model.get_output_embeddings().weight.shape[0]
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            weights = torch.as_tensor(weights)
        if weights.dim() != 1 or weights.shape[0] != V or not weights.is_floating_point():
            raise ValueError(f"weights: expected a float tensor of shape ({V},) (the model's output size), got "
                             f"{tuple(weights.shape)} {weights.dtype}")
        check_pdl_weights(weights)
        weights = weights.detach().to("cpu", torch.float32).contiguous()
    previous = getattr(model, _PATCH, None)
    if previous is not None:
        func = previous.forward
    elif "forward" in vars(model):  # the instance's forward was replaced before
        func = getattr(vars(model)["forward"], "__func__", None)
        if func is None or vars(model)["forward"].__self__ is not model:
            raise NotImplementedError(
                "apply_fused_pdl: model.forward was already replaced on this instance by something that is "
                "not a method of it; apply the fused PDL patch first")
    else:
        func = type(model).forward
    names = list(inspect.signature(func).parameters)[1:]  # without self
    # a model configured for PDL (ComplexFormerForCausalLM with config.loss == "pdl") keeps its
    # weights in a buffer: weights=None then means those, not cross-entropy
    model_weights = weights is None and getattr(getattr(model, "config", None), "loss", None) == "pdl" and \
        isinstance(getattr(model, "pdl_weights", None), torch.Tensor)
    setattr(model, _PATCH, _Patch(func, names, weights, int(ignore_index), float(label_smoothing), model_weights))

    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    # A method bound to the model (not a closure over it): copy.deepcopy(model) gives a copy whose
    # forward runs on the copy. The signature stays the original's (Trainer reads it).
    functools.update_wrapper(forward, func)
    model.forward = types.MethodType(forward, model)
    return model


def _fused_forward(self, *args, **kwargs):
    patch = getattr(self, _PATCH)
    original = types.MethodType(patch.forward, self)
    kwargs.update(zip(patch.names, args))
    labels, shifted = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    if labels is None and shifted is None:
        if num_items is not None:
            kwargs["num_items_in_batch"] = num_items
        return original(**kwargs)
    want_states = kwargs.pop("output_hidden_states", None)
    kwargs.pop("logits_to_keep", None)
    outputs = original(**kwargs, output_hidden_states=True, logits_to_keep=1)
    hidden = outputs["hidden_states"][-1]
    head = self.get_output_embeddings()
    weights = patch.weights
    if patch.model_weights:
        weights = self.pdl_weights
        check_pdl_weights(weights)  # e.g. still unset (NaN): set them with model.set_pdl_weights(...)
    elif weights is not None:
        weights = patch.weights_on(hidden.device)
    if num_items is not None and weights is not None:
        raise ValueError(
            "apply_fused_pdl: num_items_in_batch is a token count, the wrong denominator for a PDL "
            "(weighted) loss; train with complexformer.hf.PDLTrainer, which passes the weight sum")
    loss = causal_lm_pdl_loss(hidden, labels if shifted is None else shifted, weights, shift=shifted is None,
                              normalizer=num_items, lm_head=head.weight, lm_head_bias=head.bias,
                              logit_scale=fused_logit_scale(self, "apply_fused_pdl"), ignore_index=patch.ignore_index,
                              label_smoothing=patch.label_smoothing)
    aux = router_aux_loss(self, outputs)
    if aux is not None:  # MoE load balancing, added exactly as the model's own loss adds it
        loss = loss + aux.to(loss.device)
    fields = {k: v for k, v in outputs.items() if k not in ("loss", "hidden_states")}
    if want_states:
        fields["hidden_states"] = outputs["hidden_states"]
    return type(outputs)(loss=loss, **fields)
