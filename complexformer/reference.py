"""Plain-PyTorch evaluations of the formulas of docs/design.md: the references of the tests, the
self-checks and the benchmarks, and the math the ops fall back to where no kernel serves (forward-mode
AD, torch.func transforms, double backward, float64 on CUDA). No kernels, no checks: callers pass
checked arguments.

- CMHA: `cmha_attention_pairwise` evaluates every score pair by pair from the polar form,

      s_mn = scale * sum_j r^q_mj r^k_nj cos(delta_ij (theta^q_mj - theta^k_nj) + beta_ij + omega_ij (p_m - p_n)),

  never through the factorized rotation that the kernels implement, so it can catch a wrong
  factorization. It materialises (Lq, Lk, h) per head: small sizes only.
- The rotation: `rotate_reference` (forward) and `rotate_backward_reference` (the kernels' bounded
  backward, docs/design.md, "Deviations"), in any float dtype.
- The masks and default positions every backend uses: `visible`, `visible_mask`, `default_positions`.
- PDL: `reference_pdl_loss`.
"""
import math

import torch

from .checks import compute_dtype, layout_id

EPS_R = 1e-9


def split_pairs(x, layout):
    """(..., d) -> (re, im), each (..., d/2), for layout "half" or "interleaved" (or its kernel id)."""
    h = x.shape[-1] // 2
    if layout_id(layout) == 0:
        return x[..., :h], x[..., h:]
    return x[..., 0::2], x[..., 1::2]


def merge_pairs(re, im, layout):
    """The inverse of `split_pairs`."""
    return torch.cat([re, im], -1) if layout_id(layout) == 0 else torch.stack([re, im], -1).flatten(-2)


def default_freqs(d, base=10000.0, dtype=torch.float32, device=None):
    """omega_j = base^(-2j/d), j < d/2."""
    j = torch.arange(d // 2, dtype=torch.float64, device=device)
    return (base ** (-2.0 * j / d)).to(dtype)


def seq_positions(cu_seqlens, total):
    """Positions restarting at 0 in every packed sequence: (total,) int64."""
    cu = cu_seqlens.to(torch.int64)
    idx = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], idx, right=True)
    return idx - cu[seq], seq


def visible(Lq, Lk, *, causal, q_offset=None, key_padding_mask=None, cu_seqlens=None, device=None):
    """bool, broadcastable to (B, 1, Lq, Lk): key n visible to query m (docs/design.md, "Masks and
    positions"); None when every key is visible to every query."""
    if q_offset is None:
        q_offset = Lk - Lq
    vis = None
    if cu_seqlens is None and q_offset >= Lk - 1:
        causal = False  # the first query already sees every key (decoding with a cache)
    if cu_seqlens is not None or causal:
        m = torch.arange(Lq, device=device)[:, None]
        n = torch.arange(Lk, device=device)[None, :]
    if cu_seqlens is not None:
        _, sq = seq_positions(cu_seqlens.to(device), Lq)
        _, sk = seq_positions(cu_seqlens.to(device), Lk)
        vis = sq[:, None] == sk[None, :]
        if causal:
            vis = vis & (n <= m)
    elif causal:
        vis = n <= m + q_offset
    if vis is not None:
        vis = vis[None, None]
    if key_padding_mask is not None:
        kv = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        vis = kv if vis is None else vis & kv
    return vis


def visible_mask(B, Lq, Lk, *, causal, q_offset=None, key_padding_mask=None, cu_seqlens=None, device=None):
    """bool (B, 1, Lq, Lk): `visible`, expanded."""
    vis = visible(Lq, Lk, causal=causal, q_offset=q_offset, key_padding_mask=key_padding_mask,
                  cu_seqlens=cu_seqlens, device=device)
    if vis is None:
        vis = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=device)
    return vis.expand(B, 1, Lq, Lk)


def default_positions(B, Lq, Lk, *, q_offset=None, cu_seqlens=None, device=None):
    """(q_pos (1, Lq), k_pos (1, Lk)) int64, as the kernels see them."""
    if cu_seqlens is not None:
        p, _ = seq_positions(cu_seqlens.to(device), Lq)
        return p[None], p[None].clone()
    if q_offset is None:
        q_offset = Lk - Lq
    return (q_offset + torch.arange(Lq, device=device))[None], torch.arange(Lk, device=device)[None]


def _per_head_freqs(freqs, H):
    return freqs.expand(H, freqs.shape[-1]) if freqs.dim() == 1 else freqs


def cmha_scores_pairwise(q, k, delta, beta, freqs, q_pos, k_pos, *, scale, layout="half"):
    """float64 (B, H, Lq, Lk) scores, evaluated pair by pair in polar form."""
    q, k = q.double(), k.double()
    B, H, Lq, d = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    omega = _per_head_freqs(freqs.double(), H)
    q_pos = q_pos.to(q.device).double().expand(B, Lq)
    k_pos = k_pos.to(q.device).double().expand(B, k.shape[2])
    qre, qim = split_pairs(q, layout)
    kre, kim = split_pairs(k, layout)
    rq, tq = torch.sqrt(qre**2 + qim**2 + EPS_R), torch.atan2(qim, qre)  # (B, H, Lq, h)
    rk, tk = torch.sqrt(kre**2 + kim**2 + EPS_R), torch.atan2(kim, kre)  # (B, Hkv, Lk, h)
    dp = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Lq, Lk)
    out = []
    for i in range(H):
        kv = i // G
        ang = (delta[i].double() * (tq[:, i, :, None, :] - tk[:, kv, None, :, :])
               + beta[i].double() + omega[i] * dp[..., None])  # (B, Lq, Lk, h)
        out.append((rq[:, i, :, None, :] * rk[:, kv, None, :, :] * torch.cos(ang)).sum(-1))
    return scale * torch.stack(out, 1)


def cmha_attention_pairwise(q, k, v, delta, beta, freqs, *, causal=True, scale=None, q_offset=None,
                            key_padding_mask=None, cu_seqlens=None, layout="half", q_pos=None, k_pos=None):
    """float64 (out (B, H, Lq, dv), lse (B, H, Lq)); rows with no visible key give 0 and -inf."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    G = H // k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    dq_pos, dk_pos = default_positions(B, Lq, Lk, q_offset=q_offset, cu_seqlens=cu_seqlens, device=q.device)
    q_pos = dq_pos if q_pos is None else q_pos
    k_pos = dk_pos if k_pos is None else k_pos
    s = cmha_scores_pairwise(q, k, delta, beta, freqs, q_pos, k_pos, scale=scale, layout=layout)
    vis = visible_mask(B, Lq, Lk, causal=causal, q_offset=q_offset, key_padding_mask=key_padding_mask,
                       cu_seqlens=cu_seqlens, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float64).min))
    p = torch.where(vis, p, torch.zeros_like(p))
    vv = v.double().repeat_interleave(G, dim=1)
    return p @ vv, lse


# ----------------------------------------------------------------------------------------------
# The rotation (docs/design.md, "CMHA"), as the kernels compute it
# ----------------------------------------------------------------------------------------------

def as_positions(pos, device):
    """(L,) or (Bp, L) integer positions -> (Bp, L) int64 on ``device``, no checks."""
    pos = pos.detach()
    if pos.dim() == 1:
        pos = pos[None]
    return pos.to(device=device, dtype=torch.int64).contiguous()


def _pos_angle(freqs, pos):
    """omega * p reduced to [-pi, pi] in float64: (Bp, H or 1, L, h), as the kernels' cf_pos_angle,
    so long positions keep float32 phase accuracy."""
    f = freqs.double()
    f = f[None, None] if f.dim() == 1 else f[None]  # (1, H|1, h)
    p = pos.double()
    p = p.masked_fill((p < -2.0**31) | (p > 2.0**31 - 1), float("nan"))  # out of range: NaN, as the kernels
    a = f[:, :, None, :] * p[:, None, :, None]
    return a - 2 * math.pi * torch.round(a / (2 * math.pi))


def _phase_offset(freqs, beta, pos):
    """omega * p (+ beta for queries) in float64: (Bp, H or 1, L, h)."""
    off = _pos_angle(freqs, pos)
    if beta is not None:
        off = off + beta.double()[None, :, None, :]
    return off


def rotate_reference(x, delta, beta, freqs, pos, *, layout="half", dtype=None):
    """The rotation in plain PyTorch (math in ``dtype``, default the kernels' compute dtype),
    differentiable by autograd and every torch.func transform.

    x (B, Hx, L, d) with Hx | H; delta (H, h); beta (H, h), or None for keys; freqs (h,) or (H, h);
    pos (L,) or (Bp, L) integer. Returns (B, H, L, d) in ``dtype``."""
    dt = dtype or compute_dtype(x.dtype)
    H = delta.shape[0]
    xe = x.to(dt).repeat_interleave(H // x.shape[1], 1)
    re, im = split_pairs(xe, layout)
    r = torch.sqrt(re * re + im * im + EPS_R)
    off = _phase_offset(freqs, beta, as_positions(pos, x.device))
    phi = delta.to(dt)[None, :, None, :] * torch.atan2(im, re) + off.to(dt)
    return merge_pairs(r * torch.cos(phi), r * torch.sin(phi), layout)


def rotate_backward_reference(x, grad, delta, beta, freqs, pos, *, layout, need_freqs_grad):
    """The kernels' bounded backward (csrc/rotate_math.h; docs/design.md, "Deviations") in plain
    PyTorch, differentiable (double backward): (dx in x's dtype, ddelta, dbeta or None, dfreqs or
    None), the parameter gradients in the compute dtype."""
    dt = compute_dtype(x.dtype)
    B, Hx, L, d = x.shape
    H = delta.shape[0]
    pos = as_positions(pos, x.device)
    xe = x.to(dt).repeat_interleave(H // Hx, 1)
    re, im = split_pairs(xe, layout)
    g_re, g_im = split_pairs(grad.to(dt), layout)
    r = torch.sqrt(re * re + im * im + EPS_R)
    c, s, th = re / r, im / r, torch.atan2(im, re)
    dl = delta.to(dt)[None, :, None, :]
    phi = dl * th + _phase_offset(freqs, beta, pos).to(dt)
    sp, cp = torch.sin(phi), torch.cos(phi)
    A = g_re * cp + g_im * sp
    Bq = g_re * sp - g_im * cp
    dx = merge_pairs(c * A + dl * s * Bq, s * A - dl * c * Bq, layout)
    dx = dx.view(B, Hx, H // Hx, L, d).sum(2).to(x.dtype)
    dphi = -r * Bq
    ddelta = (dphi * th).sum((0, 2))
    dbeta = dphi.sum((0, 2)) if beta is not None else None
    dfreqs = None
    if need_freqs_grad:
        dfreqs = (dphi * pos.to(dt)[:, None, :, None]).sum((0, 2))
        if freqs.dim() == 1:
            dfreqs = dfreqs.sum(0)
    return dx, ddelta, dbeta, dfreqs


# ----------------------------------------------------------------------------------------------
# PDL (docs/design.md, "PDL")
# ----------------------------------------------------------------------------------------------

def reference_pdl_loss(logits, targets, weights, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       normalizer=None):
    """The loss in plain PyTorch math (float64 recommended), for tests: the formula of docs/design.md, "PDL".
    Differentiable to any order and traceable by every torch.func transform (no host syncs)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = targets.reshape(-1).long()
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
    if normalizer is not None:
        return rows.sum() / torch.as_tensor(normalizer, dtype=z.dtype, device=z.device)
    # the kernels' rule: a weight sum of exactly 0 (no counted target) gives 0, any other divides
    denom = wy.sum()
    nz = denom != 0
    return torch.where(nz, rows.sum() / torch.where(nz, denom, torch.ones_like(denom)), torch.zeros_like(denom))
