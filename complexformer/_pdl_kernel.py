"""The PDL loss kernel's Python side, shared by ``pdl.py`` (pdl_loss) and ``fused_linear.py``
(fused_linear_pdl_loss): the launch, and the backward's in-place rescale of a gradient computed
in the forward. Both modules import this one; neither imports the other's internals."""
import os

import torch
from torch import Tensor

from . import _ext
from .checks import compute_dtype as _acc_dtype  # weights, per-row losses and the loss

NONE, MEAN = 0, 2  # checks.REDUCTIONS' ids (1 is "sum")
# where reduction="mean"'s denominator comes from (csrc/pdl.h CF_PDL_NORM_*)
NORM_BATCH, NORM_GIVEN, NORM_PRECOMPUTED = 0, 1, 2


def sync_checks():
    return os.environ.get("COMPLEXFORMER_SYNC_CHECKS", "0") not in ("", "0")


def run_kernel(logits, targets, weights, norm, norm_mode, ignore_index, reduction, label_smoothing, grad=None,
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
        _ext.launch("pdl_loss_fwd", logits, targets, weights, norm, row_loss, grad, ignore_index, reduction,
                    label_smoothing, 0.0, norm_mode, 1, _ext.stream(logits), ws)
    else:
        norm_value = float(norm) if norm is not None else -1.0
        _ext.launch("pdl_loss_fwd", logits, targets, weights, None, row_loss, grad, ignore_index, reduction,
                    label_smoothing, norm_value, norm_mode, _ext.num_threads(), 0, None)
    return row_loss, grad


def _scale_in_place(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output, in place: a scalar (skipped when exactly 1) or one value per row."""
    per_row = grad_output.numel() != 1  # reduction="none" (one row: the same as a scalar)
    if grad.is_cuda:
        g = grad_output.to(torch.float32).contiguous()
        _ext.launch("pdl_scale", grad, g, int(per_row), _ext.stream(grad))
    elif per_row:
        grad.mul_(grad_output.reshape(*grad.shape[:-1], 1).to(grad.dtype))
    elif float(grad_output) != 1.0:  # CPU: checking on the host costs nothing
        grad.mul_(grad_output.reshape(()).to(grad.dtype))


_pdl_scale_ = _ext.KernelOp("pdl_scale_", _scale_in_place, fake=lambda grad, grad_output: None,
                            mutates_args=("grad",))


def scale(grad, grad_output):
    """grad * grad_output for the backward. Eager: in place (skipped on the device when
    grad_output == 1). Traced: out of place, since the traced graph may keep the forward's
    gradient output alive and a backward-time mutation of a forward output is not allowed
    (inductor fuses the multiply)."""
    if _ext.eager_plain(grad, grad_output):  # not traced: no custom op needed either
        _scale_in_place(grad, grad_output)
    elif _ext.tracing(grad):
        g = grad_output.to(grad.dtype)
        return grad * (g.reshape(*grad.shape[:-1], 1) if g.numel() != 1 else g.reshape(()))
    else:
        _pdl_scale_.op(grad, grad_output)
    return grad
