"""The causal-LM loss: shifted cross-entropy or PDL, from the logits or, fused, from the final
hidden states and the LM head (:func:`causal_lm_pdl_loss`). Every caller uses it: the ComplexFormer
model (``complexformer.hf``), ``PDLTrainer``, ``apply_fused_pdl``, ``python -m complexformer.train``
and examples/train_cmha_lm.py. Framework-free (torch only).

The rule, written once here:

- targets: with ``shift=True`` (Hugging Face's unshifted labels) position t predicts labels[t + 1]:
  the targets are labels[..., 1:] with ``ignore_index`` appended, so the last position counts
  nothing and the logits / hidden states stay contiguous. ``shift=False``: the labels are already
  aligned with the positions.
- loss = sum_t w[y_t] ce_t / normalizer over the counted targets (y_t != ignore_index); w =
  ``weights``, or all ones (cross-entropy) when ``weights`` is None.
- normalizer: None gives this batch's own sum_t w[y_t] (for cross-entropy: its number of counted
  targets), the mean. For gradient accumulation and data parallelism pass the same sum over the
  whole window, on all processes: :func:`causal_lm_normalizer` of every micro-batch, summed (for
  cross-entropy that is Hugging Face's ``num_items_in_batch``). Then k micro-batches give the
  gradient of one batch. A window with no counted target has normalizer 0 and only zero terms:
  its loss is 0, never NaN, as a batch's mean is.
"""
from __future__ import annotations

import torch

from .fused_linear import fused_linear_pdl_loss
from .pdl import pdl_loss

__all__ = ["causal_lm_normalizer", "causal_lm_pdl_loss", "shift_labels"]


def shift_labels(labels, ignore_index=-100):
    """(..., T) targets aligned with the (..., T) positions: labels[..., 1:] followed by ignore_index."""
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def causal_lm_normalizer(labels, weights=None, *, shift=True, ignore_index=-100):
    """sum_t w[y_t] over the counted targets of one batch (their number when ``weights`` is None):
    the denominator :func:`causal_lm_pdl_loss` takes by default. Sum it over the micro-batches of
    an accumulation window (and all-reduce it over processes) to pass it as ``normalizer``.

    Returns a 0-d float64 tensor (float32 on MPS, which has no float64) on the labels' device;
    ``weights`` is used as given when it already has that dtype and device (no copy).
    """
    targets = shift_labels(labels, ignore_index) if shift else labels
    counted = targets != ignore_index
    acc = torch.float32 if targets.device.type == "mps" else torch.float64
    if weights is None:
        return counted.sum().to(acc)
    return weights.to(device=targets.device, dtype=acc)[targets[counted]].sum()


_UNIT_WEIGHTS = {}  # (V, device) -> ones(V): cross-entropy's weights, made once per size and device


def _unit_weights(V, device):
    w = _UNIT_WEIGHTS.get((V, device))
    if w is None:
        if len(_UNIT_WEIGHTS) >= 8:
            _UNIT_WEIGHTS.clear()
        w = _UNIT_WEIGHTS[(V, device)] = torch.ones(V, dtype=torch.float32, device=device)
    return w


def _window_normalizer(normalizer, device):
    """The normalizer as given, except that a window sum of 0 (no counted target) becomes 1."""
    if torch.is_tensor(normalizer):
        if normalizer.device.type != "cpu" and normalizer.device != device:
            normalizer = normalizer.to(device)
        return torch.where(normalizer == 0, torch.ones_like(normalizer), normalizer)
    if normalizer is not None and not isinstance(normalizer, bool) and normalizer == 0:
        return 1
    return normalizer


def causal_lm_pdl_loss(hidden_or_logits, labels, weights=None, *, shift=True, normalizer=None, lm_head=None,
                       lm_head_bias=None, logit_scale=None, ignore_index=-100, label_smoothing=0.0):
    """The causal-LM loss (rule in the module docstring): cross-entropy (``weights=None``) or PDL.

    Args:
        hidden_or_logits: (B, T, V) logits, or (B, T, D) final hidden states when ``lm_head`` is given.
        labels: (B, T) integer ids; ``ignore_index`` entries count nothing.
        weights: None (cross-entropy) or the (V,) PDL class weights (``pdl_weights``), on the
            input's device.
        shift: True for unshifted labels (position t predicts labels[t + 1]); False when ``labels``
            are already the targets of each position.
        normalizer: None (the batch mean), or the window's :func:`causal_lm_normalizer` sum
            (a number or a 1-element tensor; 0 means an empty window: the loss is 0).
        lm_head, lm_head_bias: the LM head's (V, D) weight and optional (V,) bias: the loss then
            runs through :func:`complexformer.fused_linear_pdl_loss` and never builds the logits.
            Under autocast the head runs in the autocast dtype, as ``F.linear`` would.
        logit_scale: with ``lm_head``, None or a number c: the logits are c * (h W^T + b) (Granite's
            1 / logits_scaling, Cohere's logit_scale). Applied as (c h) W^T + c b, so the head
            stays fused; the scaling adds no rounding when c is a power of 2, one of c h otherwise.
        ignore_index, label_smoothing: as in :func:`complexformer.pdl_loss`.

    Returns the 0-d loss; gradients flow to the input (and to the head's weight and bias).
    """
    x = hidden_or_logits
    targets = shift_labels(labels, ignore_index) if shift else labels
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden_or_logits "
                         f"{tuple(x.shape)} (expected {tuple(x.shape[:-1])})")
    targets = targets.to(x.device)
    if weights is None:
        weights = _unit_weights(x.shape[-1] if lm_head is None else lm_head.shape[0], x.device)
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
              normalizer=_window_normalizer(normalizer, x.device))
    if lm_head is None:
        for name, value in (("lm_head_bias", lm_head_bias), ("logit_scale", logit_scale)):
            if value is not None:
                raise ValueError(f"{name}: given without lm_head")
        return pdl_loss(x, targets, weights, **kw)
    if logit_scale is not None:  # before the autocast cast: float32 hidden states round once, as unscaled
        x = x * logit_scale
        lm_head_bias = None if lm_head_bias is None else lm_head_bias * logit_scale
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    bias = None if lm_head_bias is None else lm_head_bias.to(dtype)
    return fused_linear_pdl_loss(x.to(dtype), lm_head.to(dtype), targets, weights, bias=bias, **kw)
