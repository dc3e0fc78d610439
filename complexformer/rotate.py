"""The Euler rotation of CMHA (docs/design.md, "CMHA") as a PyTorch op with C and CUDA kernels.

Every (re, im) pair j of head i at position p becomes

    (r cos phi, r sin phi),   r = sqrt(re^2 + im^2 + 1e-9),   theta = atan2(im, re),
    phi = delta[i, j] * theta + beta[i, j] + omega[i, j] * p          (beta: queries only)

so that the CMHA score is the plain dot product of rotated queries and keys. RoPE is the case
delta = 1, beta = 0.

Layers of this file:
  * ``euler_rotate`` (public): validates, normalises positions, calls the op ``euler_rotate``.
  * ``euler_rotate_qk``: q and k in one launch (the "sdpa" attention backend calls its op,
    ``rotate_qk``, with arguments it checked itself).
  * the ops (``_ext.KernelOp``: the registered ``complexformer::*`` op for torch.compile, dispatch
    modes and subclasses, a plain autograd.Function in eager mode): ``euler_rotate``,
    ``euler_rotate_qk`` and ``euler_rotate_backward`` (``rotate_bwd``, which the fused-attention
    backward calls with float32 gradients of the rotated q~, k~).
  * ``_rotate_forward`` / ``_rotate_forward_qk`` / ``_rotate_backward``: the kernel launches
    without autograd, the ops' bodies.
  * the same math in plain PyTorch (``reference.rotate_reference`` / ``rotate_backward_reference``)
    runs where no kernel exists (float64 on CUDA), under forward-mode AD / torch.func, and in
    double backward.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _ext
from ._selfcheck import selfcheck
from .checks import (FLOAT_DTYPES, check_angles, check_bool, check_head_dim, check_heads, check_layout,
                     check_positions, check_rotary_dim, check_tensor, compute_dtype, layout_id)
from .reference import as_positions, rotate_backward_reference, rotate_reference

_CPU_CHUNKS = 64  # token chunks of the CPU backward reduction
_CUDA_BLOCKS = 2048  # target number of CUDA backward blocks (column blocks x token chunks)
_CUDA_COLS = 64  # (kv head, pair) columns per CUDA backward block
_CUDA_WS_ELEMS = 1 << 22  # cap of the CUDA backward's partial-sum workspace (16 MiB)
_CUDA_MAX_GROUP = 128  # query heads per kv head the CUDA backward takes (keys are expanded beyond)


def _uses_kernel(x):
    """C kernels: CPU float32/float64 (half types are widened), CUDA float32/float16/bfloat16."""
    if x.device.type == "cuda":
        return x.dtype != torch.float64
    return True


def _as_param(t, dtype):
    return None if t is None else t.detach().to(dtype).contiguous()


def _prep_x(x, dtype):
    """The tensor the kernel reads: dtype it supports, last dimension contiguous (other strides kept)."""
    x = x.detach()
    if x.numel() == 0:  # torch calls any empty tensor contiguous, whatever its strides
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _kernel_dtype(x):
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


# ----------------------------------------------------------------------------------------------
# Raw kernel calls (no autograd): the internal API of docs/design.md, "Attention"

def _rotate_forward(x, delta, beta, freqs, pos, *, layout):
    """x (B, Hx, L, d), Hx | H -> x~ (B, H, L, d) in x's dtype. beta None for keys; pos (Bp, L) int."""
    layout = layout_id(layout)
    if not _uses_kernel(x):
        return rotate_reference(x, delta, beta, freqs, pos, layout=layout).to(x.dtype)
    _ext.require_cuda_kernels("euler_rotate", x)
    pd = compute_dtype(x.dtype)
    xk = _prep_x(x, _kernel_dtype(x))
    B, _, L, d = x.shape
    out = torch.empty((B, delta.shape[0], L, d), dtype=xk.dtype, device=x.device)
    if out.numel() == 0:
        return out.to(x.dtype)
    _ext.launch("rotate_fwd", xk, _as_param(delta, pd), _as_param(beta, pd), _as_param(freqs, pd),
                as_positions(pos, x.device), out, layout, _ext.num_threads(), _ext.stream(x))
    return out.to(x.dtype)


def _rotate_forward_qk(q, k, delta, beta, freqs, q_pos, k_pos, *, layout):
    """(q~, k~) in one kernel launch on CUDA: q with beta, k without; both (B, H, L*, d)."""
    layout = layout_id(layout)
    if not _uses_kernel(q) or q.dtype != k.dtype or q.numel() == 0 or k.numel() == 0:
        return (_rotate_forward(q, delta, beta, freqs, q_pos, layout=layout),
                _rotate_forward(k, delta, None, freqs, k_pos, layout=layout))
    _ext.require_cuda_kernels("euler_rotate", q)
    pd = compute_dtype(q.dtype)
    qk, kk = _prep_x(q, _kernel_dtype(q)), _prep_x(k, _kernel_dtype(k))
    H = delta.shape[0]
    q_out = torch.empty((q.shape[0], H, q.shape[2], q.shape[3]), dtype=qk.dtype, device=q.device)
    k_out = torch.empty((k.shape[0], H, k.shape[2], k.shape[3]), dtype=kk.dtype, device=k.device)
    _ext.launch("rotate_fwd_qk", qk, kk, _as_param(delta, pd), _as_param(beta, pd), _as_param(freqs, pd),
                as_positions(q_pos, q.device), as_positions(k_pos, k.device), q_out, k_out, layout,
                _ext.num_threads(), _ext.stream(q))
    return q_out.to(q.dtype), k_out.to(k.dtype)


def _bwd_chunk(x, H):
    """Tokens per reduction chunk: a function of the shape only, so results never depend on the
    thread count or the timing (deterministic parameter gradients)."""
    ntok = x.shape[0] * x.shape[2]
    if x.device.type == "cuda":
        col_blocks = -(-x.shape[1] * (x.shape[3] // 2) // _CUDA_COLS)
        target = max(1, _CUDA_BLOCKS // max(col_blocks, 1))
        # and the (P, 3, H, h) float32 workspace stays under _CUDA_WS_ELEMS elements
        target = min(target, max(1, _CUDA_WS_ELEMS // (3 * H * (x.shape[3] // 2))))
        return max(16, -(-ntok // target))
    return max(1, -(-ntok // _CPU_CHUNKS))


def _rotate_backward(x, grad, delta, beta, freqs, pos, *, layout, need_freqs_grad):
    """Gradients of _rotate_forward for an upstream ``grad`` (B, H, L, d) of any float dtype.

    Returns (dx (B, Hx, L, d) in x's dtype, ddelta (H, h), dbeta (H, h) or None (keys),
    dfreqs (shape of freqs) or None) with the parameter gradients in the compute dtype (float64
    for float64 x, else float32). dx sums over the G query heads sharing a kv head. The parameter
    gradients are deterministic (fixed-order two-stage reductions, no atomics)."""
    layout = layout_id(layout)
    B, Hx, L, d = x.shape
    H = delta.shape[0]
    if not _uses_kernel(x):
        return rotate_backward_reference(x, grad, delta, beta, freqs, pos, layout=layout,
                                      need_freqs_grad=need_freqs_grad)
    _ext.require_cuda_kernels("euler_rotate", x)
    pd = compute_dtype(x.dtype)
    if x.numel() == 0:  # no tokens: zero parameter gradients
        z = torch.zeros((H, d // 2), dtype=pd, device=x.device)
        return (torch.zeros_like(x), z, z.clone() if beta is not None else None,
                torch.zeros(freqs.shape, dtype=pd, device=x.device) if need_freqs_grad else None)
    if x.device.type == "cuda" and H // max(Hx, 1) > _CUDA_MAX_GROUP:
        # very wide groups: rotate expanded keys (G = 1), then add the group's gradients in order
        xe = x.repeat_interleave(H // Hx, 1)
        dx, dd, db, df = _rotate_backward(xe, grad, delta, beta, freqs, pos, layout=layout,
                                          need_freqs_grad=need_freqs_grad)
        return dx.float().view(B, Hx, H // Hx, L, d).sum(2).to(x.dtype), dd, db, df
    kd = _kernel_dtype(x)
    xk = _prep_x(x, kd)
    cuda = x.device.type == "cuda"
    # CUDA reads float32 or x's dtype directly; anything else (and every CPU case) is converted
    g = _prep_x(grad, grad.dtype if cuda and grad.dtype in (torch.float32, kd) else
                (torch.float32 if cuda else kd))
    chunk = _bwd_chunk(x, H)
    P = -(-(B * L) // chunk)
    ws = torch.empty((P, 3, H, d // 2), dtype=torch.float32 if cuda else torch.float64, device=x.device)
    dx = torch.empty((B, Hx, L, d), dtype=kd, device=x.device)
    ddelta = torch.empty((H, d // 2), dtype=pd, device=x.device)
    dbeta = torch.empty_like(ddelta) if beta is not None else None
    dfreqs = torch.empty(freqs.shape, dtype=pd, device=x.device) if need_freqs_grad else None
    _ext.launch("rotate_bwd", xk, g, _as_param(delta, pd), _as_param(beta, pd), _as_param(freqs, pd),
                as_positions(pos, x.device), dx, ws, ddelta, dbeta, dfreqs, chunk, layout, _ext.num_threads(),
                _ext.stream(x))
    return dx.to(x.dtype), ddelta, dbeta, dfreqs


# ----------------------------------------------------------------------------------------------
# The ops (declared with _ext.KernelOp: registered op + eager path). Double backward rebuilds the
# gradients in torch ops; forward-mode AD and torch.func run rotate_reference.

def _empty0(like):
    return like.new_empty((0,))


def _rotate_body(x: Tensor, delta: Tensor, beta: Optional[Tensor], freqs: Tensor, positions: Tensor,
                 layout: int) -> Tensor:
    return _rotate_forward(x, delta, beta, freqs, positions, layout=layout)


def _rotate_torch(x, delta, beta, freqs, positions, layout):
    return rotate_reference(x, delta, beta, freqs, positions, layout=layout).to(x.dtype)


def _rotate_bwd_body(x: Tensor, grad: Tensor, delta: Tensor, beta: Optional[Tensor], freqs: Tensor,
                     positions: Tensor, layout: int,
                     need_freqs_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, ddelta, dbeta, dfreqs) of the backward kernel (dbeta, dfreqs empty when not wanted)."""
    dx, dd, db, df = _rotate_backward(x, grad, delta, beta, freqs, positions, layout=layout,
                                      need_freqs_grad=need_freqs_grad)
    return dx, dd, _empty0(dd) if db is None else db, _empty0(dd) if df is None else df


def _rotate_bwd_fake(x, grad, delta, beta, freqs, positions, layout, need_freqs_grad):
    pd = compute_dtype(x.dtype)
    dd = delta.new_empty(delta.shape, dtype=pd)
    db = delta.new_empty(delta.shape if beta is not None else (0,), dtype=pd)
    df = freqs.new_empty(freqs.shape if need_freqs_grad else (0,), dtype=pd)
    return x.new_empty(x.shape), dd, db, df


# called inside the backwards of euler_rotate, euler_rotate_qk and the fused attention
rotate_bwd = _ext.KernelOp("euler_rotate_backward", _rotate_bwd_body, fake=_rotate_bwd_fake)


def _param_grads(ctx, dd, db, df, delta, beta, freqs, first):
    """Cast the kernel's parameter gradients to the parameters' dtypes (None where not needed)."""
    n = ctx.needs_input_grad
    return (dd.to(delta.dtype) if n[first] else None,
            db.to(beta.dtype) if beta is not None and n[first + 1] else None,
            df.to(freqs.dtype) if n[first + 2] else None)


def _rotate_setup(ctx, inputs, output):
    x, delta, beta, freqs, positions, layout = inputs
    ctx.save_for_backward(x, delta, beta, freqs, positions)
    ctx.layout = layout


def _rotate_bwd_any(x, grad, delta, beta, freqs, positions, layout, need_freqs):
    """The backward kernel, or under create_graph=True (double backward) the same formulas in
    differentiable torch ops, so second derivatives are exact rather than silently dropped."""
    if torch.is_grad_enabled():
        dx, dd, db, df = rotate_backward_reference(x, grad, delta, beta, freqs, positions, layout=layout,
                                                   need_freqs_grad=need_freqs)
        return dx, dd, db, df
    return rotate_bwd(x, grad, delta, beta, freqs, positions, layout, need_freqs)


def _rotate_grad(ctx, grad):
    x, delta, beta, freqs, positions = ctx.saved_tensors
    dx, dd, db, df = _rotate_bwd_any(x, grad, delta, beta, freqs, positions, ctx.layout,
                                     ctx.needs_input_grad[3])
    return (dx if ctx.needs_input_grad[0] else None,) + _param_grads(ctx, dd, db, df, delta, beta, freqs, 1) \
        + (None, None)


_rotate_op = _ext.KernelOp(
    "euler_rotate", _rotate_body,
    fake=lambda x, delta, *_: x.new_empty((x.shape[0], delta.shape[0], x.shape[2], x.shape[3])),
    setup_context=_rotate_setup, backward=_rotate_grad, double_backward=True, torch_math=_rotate_torch)


def _rotate_qk_body(q: Tensor, k: Tensor, delta: Tensor, beta: Tensor, freqs: Tensor, q_pos: Tensor, k_pos: Tensor,
                    layout: int) -> tuple[Tensor, Tensor]:
    return _rotate_forward_qk(q, k, delta, beta, freqs, q_pos, k_pos, layout=layout)


def rotate_qk_torch(q, k, delta, beta, freqs, q_pos, k_pos, layout):
    return _rotate_torch(q, delta, beta, freqs, q_pos, layout), _rotate_torch(k, delta, None, freqs, k_pos, layout)


def _rotate_qk_fake(q, k, delta, beta, freqs, q_pos, k_pos, layout):
    H = delta.shape[0]
    return (q.new_empty((q.shape[0], H, q.shape[2], q.shape[3])),
            k.new_empty((k.shape[0], H, k.shape[2], k.shape[3])))


def _rotate_qk_setup(ctx, inputs, output):
    q, k, delta, beta, freqs, q_pos, k_pos, layout = inputs
    ctx.save_for_backward(q, k, delta, beta, freqs, q_pos, k_pos)
    ctx.layout = layout


def _rotate_qk_grad(ctx, gq, gk):
    q, k, delta, beta, freqs, q_pos, k_pos = ctx.saved_tensors
    nf = ctx.needs_input_grad[4]
    dq, ddq, db, dfq = _rotate_bwd_any(q, gq, delta, beta, freqs, q_pos, ctx.layout, nf)
    dk, ddk, _, dfk = _rotate_bwd_any(k, gk, delta, None, freqs, k_pos, ctx.layout, nf)
    n = ctx.needs_input_grad
    return ((dq if n[0] else None, dk if n[1] else None)
            + _param_grads(ctx, ddq + ddk, db, dfq + dfk if nf else dfq, delta, beta, freqs, 2)
            + (None, None, None))


# (q~, k~) with autograd, from checked arguments (the "sdpa" attention backend)
rotate_qk = _ext.KernelOp("euler_rotate_qk", _rotate_qk_body, fake=_rotate_qk_fake, setup_context=_rotate_qk_setup,
                          backward=_rotate_qk_grad, double_backward=True, torch_math=rotate_qk_torch)


# ----------------------------------------------------------------------------------------------
# Public API

def _resolve_positions(name, positions, x, xname):
    if positions is None:
        return torch.arange(x.shape[2], device=x.device)[None]
    return check_positions(name, positions, x.shape[0], x.shape[2], x.device, other=xname)


def _check_x(name, x):
    check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=4)
    check_head_dim(name, x.shape[-1])


def euler_rotate(x, delta, beta, freqs, *, positions=None, is_query=True, layout="half"):
    """Euler-rotate queries or keys for CMHA (docs/design.md, "CMHA").

    Args:
        x: (B, Hx, L, d) float16 / bfloat16 / float32 / float64; d even. Keys may have fewer heads
            than delta (GQA): Hx must divide H, and the output has H heads, kv head i // (H/Hx)
            rotated with query head i's parameters.
        delta: (H, h) semantic-angle scale, h = d/2.
        beta: (H, h) phase bias, added for queries only (``is_query=False`` ignores it; may be None).
        freqs: (h,) shared or (H, h) per-head positional frequencies (learnable if it requires grad).
        positions: (L,) or (B, L) int32/int64 token positions, within the int32 range; default
            ``arange(L)``.
        is_query: add beta (queries) or not (keys).
        layout: "half" (re = x[:h], im = x[h:]) or "interleaved" (re = x[0::2], im = x[1::2]).

    Returns:
        (B, H, L, d) in x's dtype. The math runs in float32 (float64 for float64 inputs).
        Differentiable with respect to x, delta, beta and freqs.
    """
    lid = check_layout(layout)
    is_query = check_bool("is_query", is_query)
    _check_x("x", x)
    H = check_angles(delta, beta if is_query else None, freqs, x.shape[-1] // 2, x.device, is_query=is_query)
    check_heads("x", x.shape[1], H)
    pos = _resolve_positions("positions", positions, x, "x")
    return _rotate_op(x, delta, beta if is_query else None, freqs, pos, lid)


def rotate_partial(rotate, q, k, rot):
    """``rotate(q, k)`` -> (q~, k~ with H heads) of the first ``rot`` features. With partial rotary
    (rot < d, HF's partial_rotary_factor, the pairs laid out within those features) the other
    features pass through unrotated, k's repeated per query head like the rotated part."""
    if rot == q.shape[-1]:
        return rotate(q, k)
    qr, kr = rotate(q[..., :rot].contiguous(), k[..., :rot].contiguous())
    groups = kr.shape[1] // k.shape[1]
    kp = k[..., rot:].repeat_interleave(groups, dim=1) if groups > 1 else k[..., rot:]
    return torch.cat([qr, q[..., rot:].to(qr.dtype)], -1), torch.cat([kr, kp.to(kr.dtype)], -1)


def euler_rotate_qk(q, k, delta, beta, freqs, *, q_positions=None, k_positions=None, layout="half", rotary_dim=None):
    """Rotate queries (with beta) and keys (without) together: one kernel launch on CUDA.

    q (B, H or a divisor, Lq, d), k (B, Hkv, Lk, d) -> (q~ (B, H, Lq, d), k~ (B, H, Lk, d)): the
    keys per query head, as a cache of rotated keys holds them (``complexformer.hf``'s serving
    mode). ``rotary_dim``: rotate only the first rotary_dim features (freqs has rotary_dim/2
    columns), the rest pass through. Differentiable like ``euler_rotate``."""
    lid = check_layout(layout)
    _check_x("q", q)
    _check_x("k", k)
    if k.shape[-1] != q.shape[-1] or k.shape[0] != q.shape[0]:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dimension")
    if k.device != q.device:
        raise ValueError(f"k: on {k.device}, but q is on {q.device}")
    rot = check_rotary_dim(rotary_dim, q.shape[-1])
    H = check_angles(delta, beta, freqs, rot // 2, q.device)
    check_heads("q", q.shape[1], H)
    check_heads("k", k.shape[1], H)
    qp = _resolve_positions("q_positions", q_positions, q, "q")
    kp = _resolve_positions("k_positions", k_positions, k, "k")
    return rotate_partial(lambda q, k: rotate_qk(q, k, delta, beta, freqs, qp, kp, lid), q, k, rot)


# ----------------------------------------------------------------------------------------------
# Self-check for `python -m complexformer.info`

@selfcheck("euler_rotate fwd+bwd (fp32)", 1e-5)
def _selfcheck_rotate(device):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 2, 4, 2, 37, 32
    x = torch.randn(B, Hkv, L, d, generator=g, dtype=torch.float64)
    delta = torch.randn(H, d // 2, generator=g, dtype=torch.float64) / math.sqrt(d // 2)
    beta = 0.1 * torch.randn(H, d // 2, generator=g, dtype=torch.float64)
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(L)[None] + 5
    gy = torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
    ref = rotate_reference(x, delta, beta, freqs, pos, layout="half")
    rdx, rdd, rdb, _ = rotate_backward_reference(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=False)
    dev = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    out = _rotate_forward(dev(x), dev(delta), dev(beta), dev(freqs), pos.to(device), layout="half")
    dx, dd, db, _ = _rotate_backward(dev(x), dev(gy), dev(delta), dev(beta), dev(freqs), pos.to(device),
                                     layout="half", need_freqs_grad=False)
    errs = [(a.double().cpu() - b).abs().max().item() / max(1.0, b.abs().max().item())
            for a, b in ((out, ref), (dx, rdx), (dd, rdd), (db, rdb))]
    return max(errs)
