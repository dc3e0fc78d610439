"""Power-Law Decay Loss (PDL): token-frequency-weighted cross-entropy with fused C/CUDA kernels.

    counts  = token_counts(label_ids, vocab_size)         # how often each token is a *target*
    weights = pdl_weights(counts, alpha=1.0)              # w_v = (c_v + eps)^-alpha
    loss    = pdl_loss(logits, targets, weights)          # == F.cross_entropy(..., weight=weights)

The loss kernel computes the loss and the gradient in one pass per row (Liger-Kernel style): the
forward writes d(loss)/d(logits) while the row is in cache, and the backward only rescales it by
grad_output, in place, or not at all when grad_output is exactly 1 (the usual ``loss.backward()``).
Peak memory is the gradient buffer itself: no N x V softmax or log-probability temporary; when no
gradient is wanted (``torch.no_grad()``, or logits that do not require grad) only the loss is
computed and no N x V buffer is allocated at all.
``fused_linear_pdl_loss`` (``fused_linear.py``) also fuses the LM head, so the N x V logits never
exist at once.
Counts and weights live in ``counts.py``, the argument checks in ``checks.py``, the loss in plain
PyTorch in ``reference.py``; this file holds the loss's custom ops, autograd and public functions.

Semantics (docs/design.md, "PDL"):
  * ``reduction="mean"`` divides by the batch's sum of target weights ``sum_t w[y_t]``, like
    ``F.cross_entropy(weight=w)`` (negative weights included), except that a batch whose target
    weights sum to exactly 0 (no counted token) gives 0 (and a zero gradient), not NaN. ``normalizer=`` replaces that denominator: with S the sum over a whole
    batch, ``pdl_loss(a, normalizer=S) + pdl_loss(b, normalizer=S) == pdl_loss(a + b)``, which is
    what gradient accumulation needs (Hugging Face's ``num_items_in_batch`` is a token count, not
    a weight sum, so it is the wrong denominator for a weighted loss).
  * ``label_smoothing`` is torch's definition for weighted cross-entropy: the smoothing term is
    ``(eps / V) sum_c w_c (-log p_c)`` and the mean still divides by ``sum_t w[y_t]``.
  * ignored targets (``ignore_index``) contribute 0 to the loss and a zero gradient row.
  * out-of-range targets: on the CPU a ``ValueError`` naming ``targets``. On CUDA the kernels never
    synchronise with the host, so such a row's loss and gradient are NaN (never silently wrong);
    set ``COMPLEXFORMER_SYNC_CHECKS=1`` to check targets eagerly (one host sync) and raise instead.
  * the loss is float32 for float16/bfloat16/float32 logits and float64 for float64 logits; the
    gradient has the logits' dtype. ``weights`` and ``normalizer`` get no gradient: one that
    requires grad raises a RuntimeError, as ``F.cross_entropy`` does for its ``weight``.
  * autograd: the kernels serve reverse mode; ``create_graph=True`` (double backward, gradient
    penalties, Hessian-vector products) rebuilds the gradient in torch ops, and forward-mode AD or
    a ``torch.func`` transform runs the whole loss in torch ops (``reference_pdl_loss``).
  * CPU kernels take float32/float64 logits (float16/bfloat16 are upcast to float32 by a copy);
    CUDA kernels take float32/float16/bfloat16 (float32 accumulation).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ._pdl_kernel import NONE, NORM_BATCH, NORM_GIVEN, run_kernel, scale, sync_checks
from ._selfcheck import selfcheck
from .checks import (FLOAT_DTYPES, REDUCTIONS, check_logits, check_normalizer, check_not_differentiable,
                     check_pdl_options, check_targets_in_range, check_targets_weights, check_tensor)
from .checks import compute_dtype as _acc_dtype  # weights, per-row losses and the loss
from .counts import pdl_weights, token_counts  # noqa: F401 (public names of this module)
from .fused_linear import fused_linear_pdl_loss  # noqa: F401 (lived in this module before)
from .reference import reference_pdl_loss

__all__ = ["PDLLoss", "fused_linear_pdl_loss", "pdl_loss", "pdl_weights", "token_counts"]

_REDUCTION_NAMES = {v: k for k, v in REDUCTIONS.items()}


# --------------------------------------------------------------------------------------------
# pdl_loss: the fused kernel as two ops (loss and gradient; the loss alone)
# --------------------------------------------------------------------------------------------


def _run(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing, want_grad):
    mode = NORM_BATCH if normalizer is None else NORM_GIVEN
    row_loss, grad = run_kernel(logits, targets, weights, normalizer, mode, ignore_index, reduction, label_smoothing,
                                want_grad=want_grad)
    return (row_loss.view(logits.shape[:-1]) if reduction == NONE else row_loss.sum()), grad


def _loss_and_grad(logits: Tensor, targets: Tensor, weights: Tensor, normalizer: Optional[Tensor],
                   ignore_index: int, reduction: int, label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """(loss, grad) with grad = d(loss) / d(logits) for grad_output = 1."""
    return _run(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing, True)


def _loss_value(logits: Tensor, targets: Tensor, weights: Tensor, normalizer: Optional[Tensor], ignore_index: int,
                reduction: int, label_smoothing: float) -> Tensor:
    """The loss alone (no gradient wanted: evaluation, torch.no_grad): no N x V buffer at all."""
    return _run(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing, False)[0]


def _loss_torch(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing):
    """The loss in differentiable torch ops (forward-mode AD, torch.func transforms, double backward)."""
    loss = reference_pdl_loss(logits, targets, weights, ignore_index=ignore_index,
                              reduction=_REDUCTION_NAMES[reduction], label_smoothing=label_smoothing,
                              normalizer=None if normalizer is None else normalizer.detach())
    return loss.view(logits.shape[:-1]) if reduction == NONE else loss


def _loss_value_torch(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing):
    check_targets_in_range(targets, logits.shape[-1], ignore_index)
    return _loss_torch(logits.to(weights.dtype), targets, weights, normalizer, ignore_index, reduction,
                       label_smoothing)


def _loss_and_grad_torch(*args):
    return _loss_value_torch(*args), args[0].new_empty((0,))  # no gradient buffer: autograd differentiates


def _loss_fake(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing):
    return logits.new_empty(logits.shape[:-1] if reduction == NONE else (), dtype=_acc_dtype(logits.dtype))


def _pdl_loss_setup(ctx, inputs, output):
    logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing = inputs
    loss, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else autograd makes an N x V zeros "gradient" for `grad`
    ctx.save_for_backward(logits, targets, weights, normalizer)
    ctx.args = (ignore_index, reduction, label_smoothing)
    # The gradient buffer rides on ctx (not save_for_backward): backward scales it in place and
    # hands it to autograd, then drops it. A second backward through a retained graph finds
    # ctx.grad gone and recomputes from the saved logits.
    ctx.grad = grad


def _pdl_loss_backward(ctx, grad_loss, _grad_grad):
    grad = ctx.grad
    ctx.grad = None
    if grad_loss is None:  # the loss took no part in what is differentiated
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():
        # create_graph=True (double backward, a gradient penalty, Hessian-vector products): the
        # gradient is rebuilt from the saved logits in differentiable torch ops
        logits, targets, weights, normalizer = ctx.saved_tensors
        return _pdl_grad_torch(logits, targets, weights, normalizer, *ctx.args, grad_loss), None, None, None, \
            None, None, None
    if grad is None:
        logits, targets, weights, normalizer = ctx.saved_tensors
        _, grad = _pdl_loss_fwd.run(logits.detach(), targets, weights, normalizer, *ctx.args)
    return scale(grad, grad_loss), None, None, None, None, None, None


_pdl_loss_fwd = _ext.KernelOp(
    "pdl_loss_fwd", _loss_and_grad,
    fake=lambda logits, *a: (_loss_fake(logits, *a), logits.new_empty(logits.shape)),
    setup_context=_pdl_loss_setup, backward=_pdl_loss_backward, double_backward=True,
    torch_math=_loss_and_grad_torch, label="pdl_loss")
_pdl_loss_value = _ext.KernelOp("pdl_loss_value", _loss_value, fake=_loss_fake, torch_math=_loss_value_torch,
                                label="pdl_loss")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def pdl_loss(logits, targets, weights, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, normalizer=None):
    """Power-Law Decay Loss: cross-entropy weighted by target-token weights (``pdl_weights``).

    Args:
        logits: (N, V) or (B, T, V) float tensor (rows may be strided; the last dim is made
            stride-1 if it is not).
        targets: (N,) or (B, T) int64 or int32 class ids; ``ignore_index`` entries are skipped.
        weights: (V,) float tensor of per-class weights.
        reduction: "mean" (divide by the sum of target weights, or ``normalizer``), "sum" or "none"
            (per-token ``w[y] * loss``, 0 where ignored, shaped like ``targets``).
        label_smoothing: in [0, 1], as ``F.cross_entropy`` defines it for weighted cross-entropy.
        normalizer: the mean's denominator (a positive number or a 1-element tensor), for
            gradient accumulation: pass the whole batch's ``sum_t w[y_t]``.

    Equals ``F.cross_entropy(logits.flatten(0, -2), targets.flatten(), weight=weights, ...)``,
    except that a batch with no counted token gives 0, not NaN. See the module docstring for
    out-of-range targets on CUDA (NaN, or ``COMPLEXFORMER_SYNC_CHECKS=1`` to raise).
    """
    ignore_index, label_smoothing = check_pdl_options(ignore_index, reduction, label_smoothing)
    logits = check_logits("logits", logits)
    V = logits.shape[-1]
    check_targets_weights(targets, weights, logits.shape[:-1], V, logits.device)
    check_not_differentiable("weights", weights, "pdl_loss")
    check_not_differentiable("normalizer", normalizer, "pdl_loss")
    kdtype = _acc_dtype(logits.dtype)
    norm = check_normalizer(normalizer, reduction, logits.device, kdtype)
    targets = targets.reshape(-1).contiguous()
    if logits.is_cuda and sync_checks():
        check_targets_in_range(targets, V, ignore_index)
    w = weights.detach().to(kdtype).contiguous()
    args = (logits, targets, w, norm, ignore_index, REDUCTIONS[reduction], label_smoothing)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _pdl_loss_value(*args)  # evaluation: the loss alone, no gradient buffer
    return _pdl_loss_fwd(*args)[0]


class PDLLoss(torch.nn.Module):
    """``pdl_loss`` as a module; ``weights`` is a buffer (moves with ``.to()``, saved in state_dict).

    ``forward(logits, targets, normalizer=None)``.
    """

    def __init__(self, weights, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__()
        check_tensor("weights", weights, dtypes=FLOAT_DTYPES, ndim=1, allow_empty=False)
        ignore_index, label_smoothing = check_pdl_options(ignore_index, reduction, label_smoothing)
        self.register_buffer("weights", weights.detach().clone())
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets, normalizer=None):
        return pdl_loss(logits, targets, self.weights, ignore_index=self.ignore_index, reduction=self.reduction,
                        label_smoothing=self.label_smoothing, normalizer=normalizer)

    def extra_repr(self):
        return f"V={self.weights.numel()}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


# --------------------------------------------------------------------------------------------
# double backward and self-checks
# --------------------------------------------------------------------------------------------


def _pdl_grad_torch(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing, grad_loss):
    """d(loss)/d(logits) * grad_loss in differentiable torch ops (create_graph=True): the Hessian
    of weighted cross-entropy then comes from autograd through this expression."""
    with torch.enable_grad():
        z = logits if logits.requires_grad else logits.detach().requires_grad_()
        loss = _loss_torch(z, targets, weights, normalizer, ignore_index, reduction, label_smoothing)
        (g,) = torch.autograd.grad(loss, z, grad_loss.to(loss.dtype), create_graph=True)
    return g


@selfcheck("pdl_loss", 1e-4)
def _selfcheck_pdl_loss(device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 1003, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1003, (37,), generator=g)
    y[::5] = -100
    w = pdl_weights(torch.randint(0, 50, (1003,), generator=g))
    ref = reference_pdl_loss(z, y, w, label_smoothing=0.1)
    zd = z.float().to(device).requires_grad_()
    out = pdl_loss(zd, y.to(device), w.to(device), label_smoothing=0.1)
    out.backward()
    zr = z.clone().requires_grad_()
    reference_pdl_loss(zr, y, w, label_smoothing=0.1).backward()
    out = out.detach()
    return max(abs(float(out) - float(ref)) / max(1.0, abs(float(ref))),
               float((zd.grad.double().cpu() - zr.grad).abs().max() / zr.grad.abs().max()))
