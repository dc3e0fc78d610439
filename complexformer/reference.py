"""Plain float64 PyTorch evaluations of the formulas of docs/design.md, for tests and self-checks.

`cmha_attention_pairwise` evaluates every score pair by pair from the polar form,

    s_mn = scale * sum_j r^q_mj r^k_nj cos(delta_ij (theta^q_mj - theta^k_nj) + beta_ij + omega_ij (p_m - p_n)),

never through the factorized rotation that the kernels implement, so it can catch a wrong
factorization. It materialises (Lq, Lk, h) per head: small sizes only.
"""
import math

import torch

EPS_R = 1e-9


def split_pairs(x, layout):
    """(..., d) -> (re, im), each (..., d/2), for layout "half" or "interleaved"."""
    h = x.shape[-1] // 2
    if layout == "half":
        return x[..., :h], x[..., h:]
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    raise ValueError(f"layout: expected 'half' or 'interleaved', got {layout!r}")


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


def visible_mask(B, Lq, Lk, *, causal, q_offset=None, key_padding_mask=None, cu_seqlens=None, device=None):
    """bool (B, 1, Lq, Lk): key n visible to query m (docs/design.md, "Masks and positions")."""
    if q_offset is None:
        q_offset = Lk - Lq
    m = torch.arange(Lq, device=device)[:, None]
    n = torch.arange(Lk, device=device)[None, :]
    vis = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if cu_seqlens is not None:
        _, sq = seq_positions(cu_seqlens.to(device), Lq)
        _, sk = seq_positions(cu_seqlens.to(device), Lk)
        vis = vis & (sq[:, None] == sk[None, :])
        if causal:
            vis = vis & (n <= m)
    elif causal:
        vis = vis & (n <= m + q_offset)
    vis = vis[None, None].expand(B, 1, Lq, Lk)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return vis


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
