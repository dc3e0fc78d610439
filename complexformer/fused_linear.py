"""Fused LM head + Power-Law Decay Loss: ``pdl_loss(hidden @ W.T + b, targets, weights)`` without
ever holding the N x V logits.

    loss = fused_linear_pdl_loss(hidden, lm_head.weight, targets, weights, bias=lm_head.bias)

The rows are processed in chunks. For each chunk: one matmul gives its logits, the PDL kernel
(``pdl.py``) turns them into the loss and d(loss)/d(logits) in one pass, and two more matmuls turn
that gradient into the chunk's rows of grad_hidden and its contribution to grad_weight (and
grad_bias). So the forward computes the gradients too (for a scalar loss; the backward only
rescales them by grad_output, or does nothing when it is exactly 1), and the whole thing costs the
same three matmuls as ``F.linear`` + cross-entropy with only chunk x V buffers in memory (two;
three on the CPU for float16/bfloat16, whose kernel computes in float32).

See :func:`fused_linear_pdl_loss` for the chunk-size rule and the peak-memory formula.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ._pdl_kernel import MEAN, NONE, NORM_GIVEN, NORM_PRECOMPUTED, run_kernel, scale, sync_checks
from ._selfcheck import selfcheck
from .checks import (FLOAT_DTYPES, REDUCTIONS, check_int, check_normalizer, check_not_differentiable,
                     check_pdl_options, check_targets_in_range, check_targets_weights, check_tensor)
from .checks import compute_dtype as _acc_dtype

__all__ = ["fused_linear_pdl_loss", "fused_linear_chunk_rows"]

_LOW = (torch.float16, torch.bfloat16)
# Rows per chunk at which the chunk's matmuls run near full speed. Each chunk also reads and
# writes the (V, D) weight-gradient accumulator once (8 bytes per entry in float32) for
# 2 * rows * V * D flops of its update, so that traffic costs about (4/3) * B / rows of the
# chunk's three matmuls, B being the machine's flops per byte of memory traffic (about 10 for a
# CPU core, about 300 for an H100/H200 in bf16): 1024 rows keep it near 1% on a CPU; 4096 rows
# keep it near 10% on a GPU (the GEMMs themselves reach full speed well before that).
_FAST_ROWS = {"cpu": 1024, "cuda": 4096}
# The default budget for the chunk buffers: a quarter of what the full N x V logits would take,
# but at least this much (small batches need no chunking at all).
_MIN_DEFAULT_BUDGET = 64 << 20


def _kernel_dtype(dtype, device):
    """dtype the PDL kernel reads and writes: the CPU kernels compute float16/bfloat16 in float32."""
    return torch.float32 if device.type == "cpu" and dtype in _LOW else dtype


def _bytes_per_chunk_row(V, dtype, device):
    """Chunk buffer bytes per row: the logits and their gradient in the kernel's dtype, plus (CPU,
    float16/bfloat16) one low-precision buffer: the logits the matmul writes, then the rounded
    gradient the next matmul reads."""
    kd = _kernel_dtype(dtype, device)
    per = 2 * V * kd.itemsize
    if kd != dtype:
        per += V * dtype.itemsize
    return per


def fused_linear_chunk_rows(n, d, v, dtype, device="cpu", memory_budget=None):
    """The default chunk size of :func:`fused_linear_pdl_loss` (rows per chunk), see its docstring."""
    device = torch.device(device)
    if n <= 0:
        return 1
    per_row = _bytes_per_chunk_row(v, dtype, device)
    if memory_budget is None:
        memory_budget = max(n * v * _kernel_dtype(dtype, device).itemsize // 4, _MIN_DEFAULT_BUDGET)
    rows = min(n, _FAST_ROWS.get(device.type, _FAST_ROWS["cuda"]), max(1, memory_budget // per_row))
    chunks = -(-n // rows)
    return -(-n // chunks)  # equal chunks: the last one is not a small remainder


# --------------------------------------------------------------------------------------------
# the op: forward computes the loss and (for grad_mask != 0) the gradients
# --------------------------------------------------------------------------------------------

_GRAD_HIDDEN, _GRAD_WEIGHT, _GRAD_BIAS = 1, 2, 4


def _chunked(hidden, weight, bias, targets, weights, norm, mode, ignore_index, reduction, label_smoothing, chunk,
             row_scale, grad_mask):
    n, d = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    kd = _kernel_dtype(dt, dev)
    chunk = max(1, min(chunk, n))
    multi = n > chunk
    # the weight gradient sums over chunks: in float32 for float16/bfloat16 (one chunk: the
    # GEMM itself accumulates in float32)
    gw_acc_dtype = torch.float32 if dt in _LOW and multi else dt
    want_h, want_w, want_b = grad_mask & _GRAD_HIDDEN, grad_mask & _GRAD_WEIGHT, grad_mask & _GRAD_BIAS
    losses = torch.empty(n, dtype=_acc_dtype(dt), device=dev)
    gh = torch.empty((n, d) if want_h else (0,), dtype=dt, device=dev)
    gw = torch.zeros((V, d), dtype=gw_acc_dtype, device=dev) if want_w and (multi or n == 0) else None
    gb = torch.zeros(V, dtype=torch.float32 if dt in _LOW else dt, device=dev) if want_b else None
    logits = torch.empty((chunk, V), dtype=kd, device=dev)
    logits_lp = torch.empty((chunk, V), dtype=dt, device=dev) if kd != dt else None
    grad = torch.empty((chunk, V), dtype=kd, device=dev) if grad_mask else None
    wt = weight.t()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = hidden[s:e]
        out = (logits_lp if logits_lp is not None else logits)[: e - s]
        if bias is None:
            torch.mm(hc, wt, out=out)
        else:
            torch.addmm(bias, hc, wt, out=out)
        if logits_lp is not None:
            logits[: e - s].copy_(out)
        row_loss, g = run_kernel(logits[: e - s], targets[s:e], weights, norm, mode, ignore_index, reduction,
                                 label_smoothing, grad=grad[: e - s] if grad_mask else None, want_grad=bool(grad_mask))
        losses[s:e] = row_loss
        if not grad_mask:
            continue
        if row_scale is not None:
            g.mul_(row_scale[s:e, None].to(g.dtype))
        # CPU float16/bfloat16: the kernel's float32 gradient, rounded as torch's own backward would
        g_lp = logits_lp[: e - s].copy_(g) if logits_lp is not None else g
        if want_h:
            torch.mm(g_lp, weight, out=gh[s:e])
        if want_b:
            gb.add_(g.sum(0, dtype=gb.dtype))
        if not want_w:
            continue
        if gw is None:  # one chunk
            gw = torch.mm(g_lp.t(), hc)
        elif gw.dtype == dt:
            gw.addmm_(g_lp.t(), hc)
        elif dev.type == "cpu":
            gw.addmm_(g.t(), hc.float())  # the kernel's float32 gradient, unrounded
        else:
            torch.addmm(gw, g_lp.t(), hc, out_dtype=torch.float32, out=gw)  # float32 accumulate in the GEMM
    loss = losses if reduction == NONE else losses.sum()
    gw = hidden.new_empty(0, dtype=weight.dtype) if gw is None else gw.to(weight.dtype)
    gb = hidden.new_empty(0) if gb is None else gb.to(bias.dtype)
    return loss, gh, gw, gb


def _fused_linear_body(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    weights: Tensor,
    normalizer: Optional[Tensor],
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    chunk_size: int,
    row_scale: Optional[Tensor],
    grad_mask: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss: per-row (N,) or reduced, grad_hidden (N, D), grad_weight (V, D), grad_bias (V,)) for
    grad_output = 1, or for the per-row grad_output ``row_scale``. ``grad_mask`` bits (1 hidden,
    2 weight, 4 bias) say which gradients to compute; the others come back empty."""
    norm, mode = normalizer, NORM_GIVEN
    if normalizer is None and reduction == MEAN:
        # the batch's weight sum, on the device, before any chunk runs (no host sync)
        V = weight.shape[0]
        valid = targets != ignore_index
        idx = torch.where(valid & (targets >= 0) & (targets < V), targets, 0)
        norm, mode = (weights[idx] * valid).to(_acc_dtype(hidden.dtype)).sum(), NORM_PRECOMPUTED
    with torch.autocast(hidden.device.type, enabled=False):  # the matmuls run in the dtypes chosen here
        return _chunked(hidden, weight, bias, targets, weights, norm, mode, ignore_index, reduction,
                        label_smoothing, chunk_size, row_scale, grad_mask)


def _fused_linear_fake(hidden, weight, bias, targets, weights, normalizer, ignore_index, reduction, label_smoothing,
                       chunk_size, row_scale, grad_mask):
    n, d = hidden.shape
    loss = hidden.new_empty((n,) if reduction == NONE else (), dtype=_acc_dtype(hidden.dtype))
    gh = hidden.new_empty((n, d) if grad_mask & _GRAD_HIDDEN else (0,))
    gw = hidden.new_empty(tuple(weight.shape) if grad_mask & _GRAD_WEIGHT else (0,), dtype=weight.dtype)
    gb = hidden.new_empty((weight.shape[0],) if grad_mask & _GRAD_BIAS else (0,),
                          dtype=bias.dtype if bias is not None else hidden.dtype)
    return loss, gh, gw, gb


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias, targets, weights, normalizer, ignore_index, reduction, ls, chunk, _, grad_mask = inputs
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.args = (ignore_index, reduction, ls, chunk, grad_mask)
    ctx.save_for_backward(hidden, weight, bias, targets, weights, normalizer)
    # The gradients ride on ctx (not save_for_backward): backward scales them in place and hands
    # them to autograd, then drops them. A second backward through a retained graph finds them
    # gone and recomputes them chunk by chunk from the saved inputs.
    ctx.grads = (gh, gw, gb) if grad_mask else None


def _fused_backward(ctx, grad_loss, _gh, _gw, _gb):
    ignore_index, reduction, ls, chunk, fwd_mask = ctx.args
    grads, ctx.grads = ctx.grads, None
    if grad_loss is None:
        return (None,) * 12
    need = ctx.needs_input_grad
    mask = (_GRAD_HIDDEN if need[0] else 0) | (_GRAD_WEIGHT if need[1] else 0) | (_GRAD_BIAS if need[2] else 0)
    if grads is None or reduction == NONE or mask & ~fwd_mask:
        # reduction "none" (per-row grad_output), a second backward, or a gradient the forward
        # was not asked for: recompute, chunk by chunk
        hidden, weight, bias, targets, weights, normalizer = ctx.saved_tensors
        row_scale = grad_loss.reshape(-1) if reduction == NONE else None
        _, gh, gw, gb = _fused_linear_fwd.run(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                              targets, weights, normalizer, ignore_index, reduction, ls, chunk,
                                              row_scale, mask)
    else:
        gh, gw, gb = grads
    if reduction != NONE:
        gh, gw, gb = (scale(g, grad_loss) if m & mask else None for g, m in
                      ((gh, _GRAD_HIDDEN), (gw, _GRAD_WEIGHT), (gb, _GRAD_BIAS)))
    return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 9


# Forward-mode AD and the torch.func transforms raise: the torch-ops equivalent would hold the
# N x V logits this op exists to avoid.
_fused_linear_fwd = _ext.KernelOp(
    "fused_linear_pdl_fwd", _fused_linear_body, fake=_fused_linear_fake, setup_context=_fused_setup,
    backward=_fused_backward, torch_math=_ext.UNSUPPORTED, label="fused_linear_pdl_loss",
    hint="; use pdl_loss on F.linear's logits for higher-order gradients")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def fused_linear_pdl_loss(hidden, lm_head_weight, targets, weights, *, bias=None, ignore_index=-100,
                          reduction="mean", label_smoothing=0.0, normalizer=None, chunk_size=None,
                          memory_budget=None):
    """``pdl_loss(F.linear(hidden, lm_head_weight, bias), targets, weights, ...)`` without the N x V logits.

    Args:
        hidden: (N, D) or (B, T, D) float32, float64 (CPU), float16 or bfloat16.
        lm_head_weight: (V, D) in nn.Linear's layout, hidden's dtype and device.
        targets, weights, ignore_index, reduction, label_smoothing, normalizer: as in ``pdl_loss``
            (negative weights divide like ``F.cross_entropy(weight=w)``, NaN propagates).
        bias: None or (V,), hidden's dtype.
        chunk_size: rows per chunk (default: the rule below).
        memory_budget: bytes for the chunk buffers when ``chunk_size`` is None (default: a quarter
            of the bytes the N x V logits would take, at least 64 MiB).

    Gradients flow to hidden, lm_head_weight and bias, in their dtypes. The weight and bias
    gradients are summed over chunks in float32 for float16/bfloat16 (in float64 for float64).
    Deterministic: a fixed chunk order, no atomics. On CUDA nothing synchronises with the host.
    Forward-mode AD, the ``torch.func`` transforms and double backward (``create_graph=True``)
    raise NotImplementedError / RuntimeError.

    How it runs: rows are split into equal chunks of at most ``c`` rows. For each chunk: logits
    = hidden_c @ W.T (+ b); the PDL kernel writes loss and d(loss)/d(logits) = G_c;
    grad_hidden_c = G_c @ W; grad_W += G_c.T @ hidden_c; grad_b += sum(G_c). For reduction
    "mean"/"sum" this happens in the forward (the backward multiplies by grad_output, in place,
    skipped when it is 1); for "none" the forward computes the loss only and the backward redoes
    the chunks with the per-row grad_output.

    Chunk rule (``fused_linear_chunk_rows``): ``c = min(N, R, budget // bytes_per_row)`` with
    R = 1024 rows on the CPU and 4096 on CUDA, the rows at which the chunk's matmuls, including
    the read-modify-write of the (V, D) gradient accumulator, run near full speed;
    bytes_per_row = 2 V k (the logits and their gradient in the kernel's dtype, k bytes each:
    the dtype's size, or 4 for float16/bfloat16 on the CPU, whose kernel computes in float32,
    which then also keeps V s bytes of low-precision logits / gradient, s = 2); then the chunks
    are evened out: c = ceil(N / ceil(N / c)).

    Peak memory beyond the inputs (e = hidden's element size):
        N D e                          grad_hidden
      + V D e  (+ V D 4)               grad_weight (+ its float32 accumulator for float16/bfloat16
                                       with more than one chunk)
      + V e (+ V 4)                    grad_bias, when a bias is given
      + c * bytes_per_row              the chunk buffers.
    No N x V tensor exists at any time. Between forward and backward the op keeps only the
    gradients (and references to its inputs). Example, CPU float32, N=4096, D=1024, V=32000:
    the budget N V 4 / 4 = 131 MB holds 512 rows of 2 V 4 = 256 KB (< R), so c = 512 and the
    peak is 16.8 MB + 131 MB + 131 MB = 279 MB, where F.linear + F.cross_entropy hold several
    N x V buffers (524 MB each) at their peak (benchmarks/fused_linear.py measures both).
    """
    ignore_index, label_smoothing = check_pdl_options(ignore_index, reduction, label_smoothing)
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_tensor("lm_head_weight", lm_head_weight, dtypes=FLOAT_DTYPES, ndim=2, device=hidden.device)
    if lm_head_weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight: dtype {lm_head_weight.dtype} differs from hidden's {hidden.dtype}")
    D = hidden.shape[-1]
    if lm_head_weight.shape[1] != D:
        raise ValueError(f"lm_head_weight: expected shape (V, {D}) to match hidden's last dimension, got "
                         f"{tuple(lm_head_weight.shape)}")
    V = lm_head_weight.shape[0]
    if V == 0 or D == 0:
        raise ValueError(f"lm_head_weight: V and the hidden size must not be empty, got {tuple(lm_head_weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=hidden.device)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} differs from hidden's {hidden.dtype}")
        if bias.shape[0] != V:
            raise ValueError(f"bias: expected shape ({V},) to match lm_head_weight, got {tuple(bias.shape)}")
    _ext.require_cuda_kernels("fused_linear_pdl_loss", hidden)
    if hidden.is_cuda and hidden.dtype == torch.float64:
        raise TypeError("hidden: float64 is supported on the CPU only (CUDA: float32, float16, bfloat16)")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, lo=1, what="a positive int or None")
    if memory_budget is not None:
        memory_budget = check_int("memory_budget", memory_budget, lo=1, what="a positive int or None")
    check_targets_weights(targets, weights, hidden.shape[:-1], V, hidden.device)
    check_not_differentiable("weights", weights, "fused_linear_pdl_loss")
    check_not_differentiable("normalizer", normalizer, "fused_linear_pdl_loss")
    batch_shape = hidden.shape[:-1]
    acc = _acc_dtype(hidden.dtype)
    norm = check_normalizer(normalizer, reduction, hidden.device, acc)
    h2 = hidden.reshape(-1, D)
    t = targets.reshape(-1).contiguous()
    if hidden.is_cuda and sync_checks():
        check_targets_in_range(t, V, ignore_index)
    n = h2.shape[0]
    chunk = chunk_size or fused_linear_chunk_rows(n, D, V, hidden.dtype, hidden.device, memory_budget)
    w = weights.detach().to(acc).contiguous()
    mask = 0
    if reduction != "none" and torch.is_grad_enabled():
        mask = ((_GRAD_HIDDEN if hidden.requires_grad else 0) | (_GRAD_WEIGHT if lm_head_weight.requires_grad else 0)
                | (_GRAD_BIAS if bias is not None and bias.requires_grad else 0))
    loss, _, _, _ = _fused_linear_fwd(h2, lm_head_weight, bias, t, w, norm, ignore_index, REDUCTIONS[reduction],
                                      float(label_smoothing), chunk, None, mask)
    return loss.view(batch_shape) if reduction == "none" else loss


@selfcheck("fused_linear_pdl_loss", 1e-4)
def _selfcheck_fused_linear(device):
    """float32 on ``device`` (two chunks and a bias) against F.linear + cross-entropy in float64."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g, dtype=torch.float64)
    W = torch.randn(1003, 24, generator=g, dtype=torch.float64) / 5
    b = torch.randn(1003, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1003, (37,), generator=g)
    y[::5] = -100
    w = torch.rand(1003, generator=g, dtype=torch.float64) + 0.1
    leaves = [t.clone().requires_grad_() for t in (h, W, b)]
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(*leaves), y, weight=w, label_smoothing=0.1)
    want = (ref,) + torch.autograd.grad(ref, leaves)
    ours = [t.float().to(device).requires_grad_() for t in (h, W, b)]
    out = fused_linear_pdl_loss(ours[0], ours[1], y.to(device), w.float().to(device), bias=ours[2],
                                label_smoothing=0.1, chunk_size=20)
    got = (out,) + torch.autograd.grad(out, ours)
    return max(float((a.detach().double().cpu() - r.detach()).abs().max() / r.detach().abs().max().clamp(min=1))
               for a, r in zip(got, want))
