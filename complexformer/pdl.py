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

Semantics (SPEC section 2):
  * ``reduction="mean"`` divides by the batch's sum of target weights ``sum_t w[y_t]``, like
    ``F.cross_entropy(weight=w)``, except that a batch with no counted token gives 0 (and a zero
    gradient), not NaN. ``normalizer=`` replaces that denominator: with S the sum over a whole
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
    gradient has the logits' dtype. No gradient flows to ``weights`` or ``normalizer``.
  * CPU kernels take float32/float64 logits (float16/bfloat16 are upcast to float32 by a copy);
    CUDA kernels take float32/float16/bfloat16 (float32 accumulation).
"""
import math
import os
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C
from ._ext import check_tensor, dl, dl_opt, num_threads, require_cuda_kernels, stream
from ._selfcheck import selfcheck

__all__ = ["PDLLoss", "fused_linear_pdl_loss", "pdl_loss", "pdl_weights", "token_counts"]

_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_NONE, _SUM, _MEAN = 0, 1, 2
# where reduction="mean"'s denominator comes from (csrc/pdl.h CF_PDL_NORM_*)
_NORM_BATCH, _NORM_GIVEN, _NORM_PRECOMPUTED = 0, 1, 2
_INT_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _sync_checks():
    return os.environ.get("COMPLEXFORMER_SYNC_CHECKS", "0") not in ("", "0")


# The fused CUDA kernel's variant (csrc/pdl.h CF_PDL_CUDA_*), read at every call so a benchmark or
# test can compare them in one process: "cached" keeps each row in shared memory between
# the kernel's two sweeps; "legacy" re-reads it from global memory; "cached2" (default) is "cached" with two
# blocks per SM for rows over 96 KB (half the cache each). The default is the one place to flip:
# _CUDA_VARIANT_DEFAULT.
_CUDA_VARIANTS = {"cached": 0, "legacy": 1, "cached2": 2}
# GPU run 2026-11-26 (H200, bf16, fwd+bwd, N=16384, V=128256): cached2 2.80 ms = 0.71 of copy
# bandwidth, cached 3.15 ms = 0.63, legacy 3.71 ms = 0.53 (benchmarks/RESULTS.md).
_CUDA_VARIANT_DEFAULT = "cached2"


def _cuda_variant():
    name = os.environ.get("CF_PDL_CUDA_VARIANT", "") or _CUDA_VARIANT_DEFAULT
    if name not in _CUDA_VARIANTS:
        raise ValueError(f"CF_PDL_CUDA_VARIANT: expected one of {sorted(_CUDA_VARIANTS)}, got {name!r}")
    return _CUDA_VARIANTS[name]


def _acc_dtype(dtype):
    """dtype of weights, per-row losses and the loss: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# token_counts / pdl_weights
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("complexformer::token_counts", mutates_args=())
def _token_counts_op(ids: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    counts = torch.empty(vocab_size, dtype=torch.int64, device=ids.device)
    if ids.numel() == 0:
        return counts.zero_()
    ids = ids.contiguous()
    if ids.is_cuda:
        # One host sync to report out-of-range ids: counting is preprocessing, not the hot path.
        bad = torch.zeros(2, dtype=torch.int64, device=ids.device)
        _C.pdl_token_counts(dl(ids), dl(counts), ignore_index, 1, stream(ids), dl(bad))
        n_bad, value = bad.tolist()
        if n_bad:
            raise ValueError(
                f"ids: {n_bad} value(s) out of range for vocab_size={vocab_size}, e.g. {value} "
                f"(expected 0 <= id < vocab_size, or ignore_index={ignore_index})"
            )
    else:
        _C.pdl_token_counts(dl(ids), dl(counts), ignore_index, num_threads(), 0, None)
    return counts


@_token_counts_op.register_fake
def _(ids, vocab_size, ignore_index):
    return ids.new_empty(vocab_size, dtype=torch.int64)


def token_counts(ids, vocab_size, *, ignore_index=-100):
    """How often each token id occurs in ``ids`` (any shape, int32 or int64): a (vocab_size,) int64
    tensor on ids' device. Entries equal to ``ignore_index`` are skipped; any other id outside
    [0, vocab_size) raises ValueError naming ``ids`` and the value.

    Count the *label stream* the loss will see (e.g. ``labels[:, 1:]`` of your finetuning set,
    special and template tokens included), not re-tokenised raw text: see ``pdl_weights``.

    CPU: threaded (private per-thread histograms merged in a fixed order). CUDA: integer atomics
    (deterministic), plus one host synchronisation to report out-of-range ids.
    """
    check_tensor("ids", ids, dtypes=_INT_DTYPES)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    require_cuda_kernels("token_counts", ids)
    return _token_counts_op(ids, vocab_size, ignore_index)


def pdl_weights(counts, alpha=1.0, eps=1e-7, *, max_weight=None):
    """Power-law decay weights ``w_v = (c_v + eps)^(-alpha)``, clipped at ``max_weight``: (V,) float32.

    ``counts`` is a (V,) tensor of target frequencies (``token_counts``). ``alpha=0`` gives
    all-ones weights, i.e. plain cross-entropy. Computed in float64, returned as float32.

    Why count the label stream: a token that never occurs as a target gets ``eps^-alpha``
    (1e7 at the defaults); if it ever does appear as a target, that single token dominates the
    batch's weighted mean. Counting exactly the label ids the loss will see (special, EOS and chat
    template tokens included: the reference trainer's ``add_special_tokens=False`` count gives
    them weight 1e7) means every target the loss meets has a count >= 1, hence a weight <= 1.
    ``max_weight`` additionally caps weights when counts come from a different corpus.
    """
    check_tensor("counts", counts, ndim=1, allow_empty=False)
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts: expected an integer or floating tensor, got {counts.dtype}")
    for name, v in (("alpha", alpha), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0 (power-law *decay*), got {alpha}")
    if eps <= 0:
        raise ValueError(f"eps: must be > 0 (an unseen token would get an infinite weight), got {eps}")
    if max_weight is not None and (
        isinstance(max_weight, bool) or not isinstance(max_weight, (int, float)) or not max_weight > 0
    ):
        raise ValueError(f"max_weight: expected a positive number or None, got {max_weight!r}")
    c = counts.to(torch.float64)
    if counts.numel() and bool((c < 0).any()):
        raise ValueError("counts: must be non-negative")
    w = (c + eps).pow(-float(alpha))
    if max_weight is not None:
        w = w.clamp(max=float(max_weight))
    return w.to(torch.float32)


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
                        ignore_index, reduction, label_smoothing, 0.0, norm_mode, _cuda_variant(), stream(logits),
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
    mode = _NORM_BATCH if normalizer is None else _NORM_GIVEN
    row_loss, grad = _run_kernel(logits, targets, weights, normalizer, mode, ignore_index, reduction, label_smoothing)
    return _reduce(row_loss, reduction, logits.shape[:-1]), grad


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
    mode = _NORM_BATCH if normalizer is None else _NORM_GIVEN
    row_loss, _ = _run_kernel(logits, targets, weights, normalizer, mode, ignore_index, reduction, label_smoothing,
                              want_grad=False)
    return _reduce(row_loss, reduction, logits.shape[:-1])


@_pdl_loss_value.register_fake
def _(logits, targets, weights, normalizer, ignore_index, reduction, label_smoothing):
    return logits.new_empty(logits.shape[:-1] if reduction == _NONE else (), dtype=_acc_dtype(logits.dtype))


@torch.library.custom_op("complexformer::pdl_scale_", mutates_args=("grad",))
def _pdl_scale_(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output, in place: a scalar (skipped when exactly 1) or one value per row."""
    per_row = grad_output.numel() != 1  # reduction="none" (one row: the same as a scalar)
    if grad.is_cuda:
        g = grad_output.to(torch.float32).contiguous()
        _C.pdl_scale(dl(grad), dl(g), int(per_row), stream(grad))
    elif per_row:
        grad.mul_(grad_output.reshape(*grad.shape[:-1], 1).to(grad.dtype))
    elif float(grad_output) != 1.0:  # CPU: checking on the host costs nothing
        grad.mul_(grad_output.reshape(()).to(grad.dtype))


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
    if _tracing(grad):
        g = grad_output.to(grad.dtype)
        return grad * (g.reshape(*grad.shape[:-1], 1) if g.numel() != 1 else g.reshape(()))
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
    if grad is None:
        logits, targets, weights, normalizer = ctx.saved_tensors
        _, grad = _pdl_loss_fwd(logits.detach(), targets, weights, normalizer, *ctx.args)
    return _scale(grad, grad_loss), None, None, None, None, None, None


_pdl_loss_fwd.register_autograd(_pdl_loss_backward, setup_context=_pdl_loss_setup)


# --------------------------------------------------------------------------------------------
# validation shared by the public functions
# --------------------------------------------------------------------------------------------


def _check_options(ignore_index, reduction, label_smoothing):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected 'none', 'sum' or 'mean', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
        0.0 <= label_smoothing <= 1.0
    ):
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")


def _check_targets_weights(targets, weights, batch_shape, V, device):
    check_tensor("targets", targets, dtypes=_INT_DTYPES, device=device)
    if tuple(targets.shape) != tuple(batch_shape):
        raise ValueError(f"targets: expected shape {tuple(batch_shape)} to match the logits, got {tuple(targets.shape)}")
    check_tensor("weights", weights, dtypes=_FLOAT_DTYPES, ndim=1, device=device)
    if weights.shape[0] != V:
        raise ValueError(f"weights: has {weights.shape[0]} entries but the logits have V={V} classes")


def check_pdl_weights(weights):
    """The class weights' rule, shared by every PDL entry point: finite and >= 0, else a ValueError
    naming ``weights``. (A negative weight makes the weighted mean's denominator meaningless, and
    can make a batch's weight sum 0 or negative.) On CUDA the check reads the tensor once per
    tensor version (one host sync), then is remembered; under torch.compile tracing values are
    unknown and it is skipped."""
    if torch.compiler.is_compiling():
        return
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(weights) or weights.device.type == "meta":
        return
    seen = _checked_weights.get(id(weights))
    if weights.is_cuda and seen is not None and seen[0]() is weights and seen[1] == weights._version:
        return
    ok = (weights >= 0) & (weights < math.inf)
    if not bool(ok.all()):
        bad = weights[~ok][0].item()
        raise ValueError(f"weights: class weights must be finite and >= 0, got {bad} (PDL weights come from "
                         f"pdl_weights(counts), which are positive)")
    if weights.is_cuda:
        if len(_checked_weights) > 64:
            _checked_weights.clear()
        _checked_weights[id(weights)] = (weakref.ref(weights), weights._version)


_checked_weights = {}  # id -> (weakref to the tensor, its version when checked)


def _check_normalizer(normalizer, reduction, device, kernel_dtype):
    """None, or the mean's denominator as a 1-element tensor on ``device``."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer: only applies to reduction='mean' (got reduction={reduction!r})")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or not normalizer.is_floating_point() and normalizer.dtype not in _INT_DTYPES:
            raise ValueError(f"normalizer: expected a positive number or a 1-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.device.type == "cpu" and not float(normalizer) > 0:
            raise ValueError(f"normalizer: must be positive, got {float(normalizer)}")
        if normalizer.device.type != "cpu" and normalizer.device != device:
            raise ValueError(f"normalizer: on {normalizer.device}, but the logits are on {device}")
        # a device tensor cannot be checked without a sync: the kernel makes a non-positive one NaN
        return normalizer.detach().reshape(()).to(device=device, dtype=kernel_dtype)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not (
        math.isfinite(normalizer) and normalizer > 0
    ):
        raise ValueError(f"normalizer: must be a positive finite number, got {normalizer!r}")
    return torch.full((), float(normalizer), dtype=kernel_dtype, device=device)


def _prepare_logits(name, logits):
    """Logits as the kernel reads them: float32/float64 on the CPU, float32/float16/bfloat16 on
    CUDA, last dimension of stride 1 (rows may be strided, e.g. logits[:, :-1])."""
    check_tensor(name, logits, dtypes=_FLOAT_DTYPES, ndim=(2, 3))
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: the class dimension V must not be empty, got shape {tuple(logits.shape)}")
    require_cuda_kernels("pdl_loss", logits)
    if logits.is_cuda and logits.dtype == torch.float64:
        raise TypeError(f"{name}: float64 is supported on the CPU only (CUDA: float32, float16, bfloat16)")
    if not logits.is_cuda and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the CPU kernels compute in float32 (autograd casts the gradient back)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def _check_targets_in_range(targets, V, ignore_index):
    """COMPLEXFORMER_SYNC_CHECKS=1: check CUDA targets eagerly (syncs) instead of returning NaN."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"targets: value {value} is out of range for {V} classes (expected 0 <= target < {V}, or ignore_index={ignore_index})")


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
    _check_options(ignore_index, reduction, label_smoothing)
    logits = _prepare_logits("logits", logits)
    V = logits.shape[-1]
    _check_targets_weights(targets, weights, logits.shape[:-1], V, logits.device)
    kdtype = _acc_dtype(logits.dtype)
    norm = _check_normalizer(normalizer, reduction, logits.device, kdtype)
    targets = targets.reshape(-1).contiguous()
    if logits.is_cuda and _sync_checks():
        _check_targets_in_range(targets, V, ignore_index)
    w = weights.detach().to(kdtype).contiguous()
    args = (logits, targets, w, norm, ignore_index, _REDUCTIONS[reduction], float(label_smoothing))
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _pdl_loss_value(*args)  # evaluation: the loss alone, no gradient buffer
    loss, _ = _pdl_loss_fwd(*args)
    return loss


class PDLLoss(torch.nn.Module):
    """``pdl_loss`` as a module; ``weights`` is a buffer (moves with ``.to()``, saved in state_dict).

    ``forward(logits, targets, normalizer=None)``.
    """

    def __init__(self, weights, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__()
        check_tensor("weights", weights, dtypes=_FLOAT_DTYPES, ndim=1, allow_empty=False)
        _check_options(ignore_index, reduction, label_smoothing)
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
# plain-PyTorch reference (tests, self-check) and self-checks
# --------------------------------------------------------------------------------------------


def reference_pdl_loss(logits, targets, weights, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       normalizer=None):
    """The loss in plain PyTorch math (float64 recommended), for tests: the SPEC's formula."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = targets.reshape(-1)
    w = weights.to(z.dtype)
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    logp = torch.log_softmax(z, dim=-1)
    wy = w[ys] * valid
    nll = -logp.gather(1, ys[:, None])[:, 0]
    rows = (1 - label_smoothing) * wy * nll
    if label_smoothing > 0:
        rows = rows + label_smoothing / V * (-(logp * w).sum(-1)) * valid
    if reduction == "none":
        return rows.view(targets.shape)
    if reduction == "sum":
        return rows.sum()
    denom = wy.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=z.dtype)
    return rows.sum() / denom if float(denom) > 0 else rows.sum() * 0


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


@selfcheck("token_counts", 0.0)
def _selfcheck_token_counts(device):
    ids = torch.randint(-1, 3000, (10007,), generator=torch.Generator().manual_seed(1))
    got = token_counts(ids.to(device), 3000, ignore_index=-1).cpu()
    return float((got - torch.bincount(ids[ids >= 0], minlength=3000)).abs().max())


# Kept importable from here too (it lived in this module before).
from .fused_linear import fused_linear_pdl_loss  # noqa: E402
