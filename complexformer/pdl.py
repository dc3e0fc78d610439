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
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C
from . import _ext
from ._ext import dl, dl_opt, needs_torch_math, num_threads, stream
from ._selfcheck import selfcheck
from .checks import (FLOAT_DTYPES, REDUCTIONS, check_logits, check_normalizer, check_not_differentiable,
                     check_pdl_options, check_targets_in_range, check_targets_weights, check_tensor)
from .checks import compute_dtype as _acc_dtype  # weights, per-row losses and the loss
from .counts import pdl_weights, token_counts  # noqa: F401 (public names of this module)
from .reference import reference_pdl_loss

__all__ = ["PDLLoss", "fused_linear_pdl_loss", "pdl_loss", "pdl_weights", "token_counts"]

_NONE, _SUM, _MEAN = 0, 1, 2  # REDUCTIONS' ids
# where reduction="mean"'s denominator comes from (csrc/pdl.h CF_PDL_NORM_*)
_NORM_BATCH, _NORM_GIVEN, _NORM_PRECOMPUTED = 0, 1, 2


def _sync_checks():
    return os.environ.get("COMPLEXFORMER_SYNC_CHECKS", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# pdl_loss: the fused kernel as custom ops
# --------------------------------------------------------------------------------------------


def _run_kernel(logits, targets, weights, norm, norm_mode, ignore_index, reduction, label_smoothing, grad=None,
                want_grad=True):
    """Launch the fused kernel: returns (row_loss (N,), grad (logits.shape, contiguous) or None
    when not want_grad: the loss alone, no N x V write).
    logits: last-dim stride 1, 2-D or 3-D; targets: flat contiguous; weights: the kernel's dtype;
    norm: None, or the mean's denominator (CUDA: float32 device scalar; CPU: any scalar tensor)."""
    n = targets.numel()
    row_loss = torch.empty(n, dtype=_acc_dtype(logits.dtype), device=logits.device)
    if grad is None and want_grad:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return row_loss, grad
    if logits.is_cuda:
        ws = torch.empty(4, dtype=torch.float32, device=logits.device)
        _C.pdl_loss_fwd(dl(logits), dl(targets), dl(weights), dl_opt(norm), dl(row_loss), dl_opt(grad),
                        ignore_index, reduction, label_smoothing, 0.0, norm_mode, 1, stream(logits),
                        dl(ws))
    else:
        norm_value = float(norm) if norm is not None else -1.0
        _C.pdl_loss_fwd(dl(logits), dl(targets), dl(weights), None, dl(row_loss), dl_opt(grad),
                        ignore_index, reduction, label_smoothing, norm_value, norm_mode, num_threads(), 0, None)
    return row_loss, grad


def _reduce(row_loss, reduction, shape):
    if reduction == _NONE:
        return row_loss.view(shape)
    return row_loss.sum()


def _loss_and_grad(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing, want_grad=True):
    """(loss, grad) with grad = d(loss) / d(logits) for grad_output = 1 (None when not want_grad): the
    body of the custom op pdl_loss_fwd and of the eager autograd.Function."""
    mode = _NORM_BATCH if normalizer is None else _NORM_GIVEN
    row_loss, grad = _run_kernel(logits, targets, weights, normalizer, mode, ignore_index, reduction, label_smoothing,
                                 want_grad=want_grad)
    return _reduce(row_loss, reduction, logits.shape[:-1]), grad


def _loss_value(*args):
    """The loss alone (no gradient wanted: evaluation, torch.no_grad): no N x V buffer at all."""
    return _loss_and_grad(*args, want_grad=False)[0]


@torch.library.custom_op("complexformer::pdl_loss_fwd", mutates_args=())
def _pdl_loss_fwd(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    normalizer: Optional[Tensor],
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
) -> Tuple[Tensor, Tensor]:
    """(loss, grad): grad = d(loss) / d(logits) for grad_output = 1."""
    return _loss_and_grad(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing)


@_pdl_loss_fwd.register_fake
def _(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing):
    acc = _acc_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[:-1] if reduction == _NONE else (), dtype=acc)
    return loss, logits.new_empty(logits.shape)


@torch.library.custom_op("complexformer::pdl_loss_value", mutates_args=())
def _pdl_loss_value(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    normalizer: Optional[Tensor],
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
) -> Tensor:
    """The loss alone (no gradient wanted: evaluation, torch.no_grad): no N x V buffer at all."""
    return _loss_value(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing)


@_pdl_loss_value.register_fake
def _(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing):
    return logits.new_empty(logits.shape[:-1] if reduction == _NONE else (), dtype=_acc_dtype(logits.dtype))


def _scale_in_place(grad, grad_output):
    """grad *= grad_output, in place: a scalar (skipped when exactly 1) or one value per row."""
    per_row = grad_output.numel() != 1  # reduction="none" (one row: the same as a scalar)
    if grad.is_cuda:
        g = grad_output.to(torch.float32).contiguous()
        _C.pdl_scale(dl(grad), dl(g), int(per_row), stream(grad))
    elif per_row:
        grad.mul_(grad_output.reshape(*grad.shape[:-1], 1).to(grad.dtype))
    elif float(grad_output) != 1.0:  # CPU: checking on the host costs nothing
        grad.mul_(grad_output.reshape(()).to(grad.dtype))


@torch.library.custom_op("complexformer::pdl_scale_", mutates_args=("grad",))
def _pdl_scale_(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output, in place: a scalar (skipped when exactly 1) or one value per row."""
    _scale_in_place(grad, grad_output)


@_pdl_scale_.register_fake
def _(grad, grad_output):
    return None


def _tracing(t):
    """True while torch.compile / AOTAutograd / opcheck trace the backward with fake tensors."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _scale(grad, grad_output):
    """grad * grad_output for the backward. Eager: in place (skipped on the device when
    grad_output == 1). Traced: out of place, since the traced graph may keep the forward's
    gradient output alive and a backward-time mutation of a forward output is not allowed
    (inductor fuses the multiply)."""
    if _ext.eager_plain(grad, grad_output):  # not traced: no custom op needed either
        _scale_in_place(grad, grad_output)
    elif _tracing(grad):
        g = grad_output.to(grad.dtype)
        return grad * (g.reshape(*grad.shape[:-1], 1) if g.numel() != 1 else g.reshape(()))
    else:
        _pdl_scale_(grad, grad_output)
    return grad


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
        _, grad = _ext.op_call(_pdl_loss_fwd, _loss_and_grad, logits.detach(), targets, weights, normalizer,
                               *ctx.args)
    return _scale(grad, grad_loss), None, None, None, None, None, None


_pdl_loss_fwd.register_autograd(_pdl_loss_backward, setup_context=_pdl_loss_setup)
_PDLLossFunction = _ext.eager_function(_loss_and_grad, _pdl_loss_setup, _pdl_loss_backward)


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
    if needs_torch_math(logits, weights, norm):
        # forward-mode AD or a torch.func transform: the same math in differentiable torch ops
        check_targets_in_range(targets, V, ignore_index)
        return reference_pdl_loss(logits.to(kdtype), targets, weights.detach().to(kdtype), ignore_index=ignore_index,
                                  reduction=reduction, label_smoothing=label_smoothing,
                                  normalizer=None if norm is None else norm.detach())
    targets = targets.reshape(-1).contiguous()
    if logits.is_cuda and _sync_checks():
        check_targets_in_range(targets, V, ignore_index)
    w = weights.detach().to(kdtype).contiguous()
    args = (logits, targets, w, norm, ignore_index, REDUCTIONS[reduction], label_smoothing)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _ext.op_call(_pdl_loss_value, _loss_value, *args)  # evaluation: the loss alone, no gradient buffer
    loss, _ = _ext.op_call(_pdl_loss_fwd, _PDLLossFunction.apply, *args)
    return loss


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
        name = {v: k for k, v in REDUCTIONS.items()}[reduction]
        loss = reference_pdl_loss(z, targets, weights, ignore_index=ignore_index, reduction=name,
                                  label_smoothing=label_smoothing, normalizer=normalizer)
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


# Kept importable from here too (it lived in this module before).
from .fused_linear import fused_linear_pdl_loss  # noqa: E402
