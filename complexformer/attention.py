"""cmha_attention: Complex Multi-Head Attention (docs/design.md, "CMHA") and its backends.

CMHA = an Euler rotation of q and k (exact factorisation of the polar score), then ordinary
softmax attention on (q~, k~, v). The backends differ only in how they do that:

- "fused":     the project's attention kernel (_C.attn_fwd / _C.attn_bwd), keys rotated per
               *query* head: the CPU kernel rotates tiles on load; the CUDA kernels pre-rotate q
               and k into workspaces, except in a GQA forward, which rotates key tiles on load so
               it never builds a (B, H, Lk, d) K (docs/design.md, "Memory"). A registered op
               (complexformer::cmha_fused) with autograd; its backward returns gradients w.r.t.
               the rotated q~, k~ and the glue maps them back through the rotation.
- "sdpa":      the project's rotation kernel (euler_rotate) then torch's scaled_dot_product_attention.
- "reference": plain PyTorch math, differentiable by autograd; for tests and as the last fallback.
- "auto":      the fastest correct path for the device, dtype and shape (rule in `_auto_backend`).

Masks are by index, positions only enter the rotation (docs/design.md, "Masks and positions"); a
dense attn_mask (bool or additive) and partial rotary (rotary_dim) are served by "sdpa" and
"reference". A
query row with no visible key outputs 0 (never NaN) in every backend, and its gradients are 0. A
NaN or Inf in q, k, v or the parameters gives NaN rows wherever the reference math does (every
backend). Forward-mode AD and torch.func transforms run the "reference" math; the fused backend
refuses double backward.

return_lse=True also returns each row's log-sum-exp of the scaled scores (docs/design.md,
"Log-sum-exp"), differentiable on every backend: the fused kernels produce it anyway and take its
gradient in the backward (dS = P (dP - D + dlse)); "sdpa" has to recompute the scores for it.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext
from ._selfcheck import selfcheck
from .checks import (FLOAT_DTYPES, LAYOUTS, POS_MAX, POS_MIN, check_angles, check_backend, check_bool, check_head_dim,
                     check_heads, check_int, check_key_padding_mask, check_layout, check_positions, check_real,
                     check_rotary_dim, check_tensor)
from .checks import compute_dtype as _acc_dtype
from .reference import seq_positions, visible
from .rotate import rotate_bwd, rotate_partial, rotate_qk, rotate_qk_torch


# --------------------------------------------------------------------------------------------
# Input validation: everything the public function accepts is checked here, once, with messages
# that name the argument. The result is a small plan shared by all backends.
# --------------------------------------------------------------------------------------------
class _Plan:
    __slots__ = ("B", "H", "Hkv", "Lq", "Lk", "d", "dv", "causal", "scale", "q_offset", "layout",
                 "kpm", "cu", "mask", "q_pos", "k_pos", "pdtype", "rot", "softcap")


def _validate(q, k, v, delta, beta, freqs, causal, scale, q_offset, key_padding_mask, cu_seqlens,
              layout, backend, positions, rotary_dim=None):
    check_backend(backend)
    check_layout(layout)
    causal = check_bool("causal", causal)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    dev = q.device
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=4, device=dev)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: must have the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    B, H, Lq, d = q.shape
    Bk, Hkv, Lk, dk = k.shape
    check_head_dim("q", d)
    if dk != d:
        raise ValueError(f"k: head dim {dk} does not match q's head dim {d}")
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"k, v: batch size must match q's ({B}), got k {Bk}, v {v.shape[0]}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"v: expected shape ({B}, {Hkv}, {Lk}, dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_heads("k", Hkv, H)
    rot = check_rotary_dim(rotary_dim, d)
    check_angles(delta, beta, freqs, rot // 2, dev, H=H)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not math.isfinite(check_real("scale", scale, "a finite float or None")):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    if q_offset is not None:
        # the default query positions q_offset + arange(Lq) stay within the positions' range
        q_offset = check_int("q_offset", q_offset, lo=POS_MIN, hi=POS_MAX - max(Lq - 1, 0), what="an int or None")
    if key_padding_mask is not None:
        key_padding_mask = check_key_padding_mask("key_padding_mask", key_padding_mask, B, Lk, dev)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, device=dev)
        cu_seqlens = cu_seqlens.contiguous()  # like every other argument: strides are ours to fix
        if q_offset is not None:
            raise ValueError("cu_seqlens: cannot be combined with q_offset (each packed sequence is its own square block)")
        if B != 1 or Lq != Lk:
            raise ValueError(f"cu_seqlens: packed sequences need B == 1 and Lq == Lk, got B={B}, Lq={Lq}, Lk={Lk}")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens: expected (num_seqs + 1,) boundaries, at least 2 entries")
        # Data-dependent checks (a host sync): skipped while torch.compile traces or a CUDA graph
        # is being captured (the kernels then treat out-of-range boundaries as empty sequences).
        capturing = cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing:
            cu = cu_seqlens.cpu()
            if int(cu[0]) != 0 or int(cu[-1]) != Lq:
                raise ValueError(f"cu_seqlens: must start at 0 and end at the total length {Lq}, got {cu[0]}..{cu[-1]}")
            if bool((cu[1:] < cu[:-1]).any()):
                raise ValueError("cu_seqlens: must be non-decreasing")
    p = _plan(q, k, v, causal, scale, q_offset, key_padding_mask, cu_seqlens, layout, rot)
    if positions is None:
        if cu_seqlens is not None:
            p.q_pos = seq_positions(cu_seqlens, Lq)[0][None]
            p.k_pos = p.q_pos
        else:
            p.q_pos = (p.q_offset + torch.arange(Lq, device=dev))[None]
            p.k_pos = torch.arange(Lk, device=dev)[None]
    else:
        if not isinstance(positions, (tuple, list)) or len(positions) != 2:
            raise TypeError("positions: expected a pair (q_positions, k_positions) of integer tensors, or None")
        _set_positions(p, check_positions("positions[0] (query positions)", positions[0], B, Lq, dev),
                       check_positions("positions[1] (key positions)", positions[1], B, Lk, dev))
    return p


def _plan(q, k, v, causal, scale, q_offset, key_padding_mask, cu_seqlens, layout, rot):
    """The plan of checked arguments (scale None = 1/sqrt(d)); positions are set by the caller."""
    p = _Plan()
    (p.B, p.H, p.Lq, p.d), p.Hkv, p.Lk, p.dv = q.shape, k.shape[1], k.shape[2], v.shape[3]
    p.causal, p.scale, p.layout = causal, 1.0 / math.sqrt(p.d) if scale is None else float(scale), layout
    p.kpm, p.cu, p.mask, p.rot, p.softcap = key_padding_mask, cu_seqlens, None, rot, None
    p.q_offset = (p.Lk - p.Lq if q_offset is None else q_offset) if cu_seqlens is None else 0
    p.pdtype = _acc_dtype(q.dtype)
    return p


def _set_positions(p, q_pos, k_pos):
    """(Bp, L) int64 positions; the kernels take both per batch or both shared."""
    if q_pos.shape[0] != k_pos.shape[0]:
        q_pos, k_pos = q_pos.expand(p.B, p.Lq).contiguous(), k_pos.expand(p.B, p.Lk).contiguous()
    p.q_pos, p.k_pos = q_pos, k_pos


def _check_attn_mask(attn_mask, p, device):
    """attn_mask (bool: True = attend; floating point: added to the scaled scores, -inf hides a key)
    as a 4-D view, after checking dtype, device and that it broadcasts to (B, H, Lq, Lk)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a bool or floating-point tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask: expected a bool (True = attend) or floating-point (additive) tensor, got "
                        f"{attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask: on {attn_mask.device}, but q is on {device}")
    full = (p.B, p.H, p.Lq, p.Lk)
    try:
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = {full}")
    return attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))  # 4-D, as SDPA wants it


# --------------------------------------------------------------------------------------------
# "reference": plain PyTorch math.
# --------------------------------------------------------------------------------------------
def _visible(p, device):
    """bool, broadcastable to (B, H, Lq, Lk): key n visible to query m (masks by index, docs/design.md,
    and attn_mask: True, or an additive value other than -inf); None = all."""
    vis = visible(p.Lq, p.Lk, causal=p.causal, q_offset=p.q_offset, key_padding_mask=p.kpm, cu_seqlens=p.cu,
                  device=device)
    if p.mask is None:
        return vis
    keep = p.mask if p.mask.dtype == torch.bool else p.mask != float("-inf")
    return keep if vis is None else vis & keep


def _with_bias(s, p):
    """The scaled scores plus an additive (floating-point) attn_mask."""
    return s if p.mask is None or p.mask.dtype == torch.bool else s + p.mask.to(s.dtype)


def _masked_scores(s, vis):
    """(s, vis, row_ok): scores with invisible keys at -inf, except on rows with no visible key,
    which become a row of zeros (finite, so softmax and logsumexp stay NaN-free there and their
    gradients are 0); vis and row_ok are None when every key is visible."""
    if vis is None and s.shape[-1] > 0:
        return s, None, None
    if vis is None:
        vis = torch.ones(1, 1, s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device)
    row_ok = vis.any(-1, keepdim=True)
    return s.masked_fill(~vis, float("-inf")).masked_fill(~row_ok, 0.0), vis, row_ok


def _masked_lse(sm, row_ok):
    """(B, H, Lq) log-sum-exp of scores masked by _masked_scores, in sm's dtype; -inf on a row with
    no visible key (row_ok False), with a zero gradient."""
    lse = torch.logsumexp(sm, -1)
    return lse if row_ok is None else lse.masked_fill(~row_ok[..., 0], float("-inf"))


def _attention_reference(q, k, v, delta, beta, freqs, p, want_lse=False, want_probs=False):
    qr, kr = rotate_partial(lambda q, k: rotate_qk_torch(q, k, delta, beta, freqs, p.q_pos, p.k_pos, p.layout), q, k, p.rot)
    return _attend_rotated(qr, kr, v, p, want_lse, want_probs)


def _attend_rotated(qr, kr, v, p, want_lse=False, want_probs=False):
    """Softmax attention of rotated q~ (B, H, Lq, d) and k~ (B, H, Lk, d) (keys per query head) on
    v (B, Hkv, Lk, dv), with the plan's masks, softcap and empty-row rule: the reference math."""
    s = (qr @ kr.transpose(-1, -2)) * p.scale  # (B, H, Lq, Lk)
    if p.softcap is not None:  # attention logit softcapping (Gemma 2): before the mask, in the compute dtype
        s = p.softcap * torch.tanh(s.to(p.pdtype) / p.softcap)
    sm, vis_all, row_ok = _masked_scores(_with_bias(s, p), _visible(p, qr.device))
    prob = torch.softmax(sm, -1)
    if vis_all is not None:  # a row with no visible key: softmax of zeros, zeroed here
        prob = prob.masked_fill(~vis_all, 0.0)
    # query head i reads kv head i // G: the G heads of a group are one (G * Lq)-row matmul on their
    # kv head (no (B, H, Lk, dv) copy of v)
    B, H, Lq, Lk = prob.shape
    out = (prob.to(v.dtype).reshape(B, p.Hkv, H // p.Hkv * Lq, Lk) @ v).view(B, H, Lq, v.shape[-1])
    if want_probs:
        return out, prob.to(qr.dtype)
    return out, (_masked_lse(sm.to(p.pdtype), row_ok) if want_lse else None)


def attention_rotated_keys(q, k, v, delta, beta, freqs, k_rotated, n_rotated, *, positions, causal=True, scale=None,
                           key_padding_mask=None, attn_mask=None, layout="half", rotary_dim=None, softcap=None,
                           return_probs=False):
    """:func:`cmha_attention` for a cache of rotated keys (decoding): the same result, masks,
    empty-row and NaN rules (the "reference" math), with each key rotated once, when it enters the
    cache, instead of at every call.

    ``k_rotated`` (B, H, Lk, d), in q's dtype and device, is the caller's buffer of k's rotation per
    query head (:func:`complexformer.rotate.euler_rotate_qk` at the key positions): its first
    ``n_rotated`` keys must already hold it (they are trusted, not recomputed); this call rotates
    the other keys into it, in place, and q, then attends: on the CPU (float32 / float64, no
    attn_mask, softcap or partial rotary) in one call of the fused kernel, which scores the keys
    straight from the buffer; elsewhere by the reference math. Everything else is checked as by
    cmha_attention. Inference only (grad mode off): no gradient flows through a rotation done by an
    earlier call. Returns out (B, H, Lq, dv), or (out, probabilities) with ``return_probs``."""
    if torch.is_grad_enabled():
        raise RuntimeError("attention_rotated_keys: inference only (no gradient flows through the keys rotated by "
                           "earlier calls); call it under torch.no_grad() or use cmha_attention")
    p, delta, beta, freqs = _prepare(q, k, v, delta, beta, freqs, causal, scale, None, key_padding_mask, None, layout,
                                     "reference", positions, attn_mask, rotary_dim)
    p.softcap = _check_softcap(softcap)
    n = check_int("n_rotated", n_rotated, lo=0, hi=p.Lk, what="an int in [0, Lk]")
    check_tensor("k_rotated", k_rotated, dtypes=(q.dtype,), ndim=4, device=q.device)
    if tuple(k_rotated.shape) != (p.B, p.H, p.Lk, p.d):
        raise ValueError(f"k_rotated: expected shape {(p.B, p.H, p.Lk, p.d)}, got {tuple(k_rotated.shape)}")
    return decoding_attention(p, q, k, v, delta, beta, freqs, k_rotated, n, return_probs)


def decoding_plan(q, k, v, q_pos, k_pos, *, causal, scale, key_padding_mask, attn_mask, layout, rotary_dim, softcap):
    """The plan of :func:`attention_rotated_keys` for arguments its caller has already checked and
    shaped (the Hugging Face decoding path, hf/rotated_keys.py: q, k, v from the module's own
    projections and cache, positions (Bp, L) int64 checked when they entered, a bool (B, Lk) key
    padding mask, a 4-D attn_mask of the query / key shape, ``rotary_dim`` the rotated features
    (d for whole heads)). Use with
    :func:`decoding_attention`; user-facing calls go through attention_rotated_keys."""
    p = _plan(q, k, v, causal, scale, None, key_padding_mask, None, layout, rotary_dim)
    p.mask, p.softcap = attn_mask, softcap
    _set_positions(p, q_pos, k_pos)
    return p


def decoding_attention(p, q, k, v, delta, beta, freqs, k_rotated, n, return_probs=False):
    """attention_rotated_keys after its checks: the plan ``p``, angles in the compute dtype."""
    if (q.device.type == "cpu" and p.softcap is None and not return_probs and _fused_unsupported(q, p) is None
            and k_rotated.stride(-1) == 1):
        # the fused CPU kernel: rotates keys [n, Lk) into the buffer, reads every key from it
        q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
        out = torch.empty(p.B, p.H, p.Lq, p.dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(p.B, p.H, p.Lq, dtype=p.pdtype, device=q.device)
        _ext.launch("attn_fwd", q, k, v, delta.contiguous(), beta.contiguous(), freqs.contiguous(), p.q_pos, p.k_pos,
                    p.kpm.contiguous() if p.kpm is not None else None, None, out, lse, int(p.causal), p.scale,
                    int(p.q_offset), LAYOUTS[p.layout], _ext.num_threads(), 0, None, None, k_rotated, n)
        return out
    k_pos = p.k_pos[:, n:].contiguous()
    qr, kr = rotate_partial(lambda q, k: rotate_qk(q, k, delta, beta, freqs, p.q_pos, k_pos, LAYOUTS[p.layout]),
                            q, k[:, :, n:], p.rot)
    k_rotated[:, :, n:] = kr
    out, probs = _attend_rotated(qr, k_rotated, v, p, want_probs=return_probs)
    return (out, probs) if return_probs else out


# --------------------------------------------------------------------------------------------
# "sdpa": rotation kernel + torch SDPA.
# --------------------------------------------------------------------------------------------
def _sdpa_mask(p, device, dtype):
    """(attn_mask, is_causal, row_ok) for F.scaled_dot_product_attention (scores in ``dtype``).

    SDPA's is_causal is TOP-LEFT aligned (n <= m); ours is n <= m + q_offset. So is_causal is
    used only for the square case q_offset == 0, Lq == Lk (where every SDPA kernel agrees on the
    alignment); q_offset >= Lk - 1 means every key is visible (decoding); anything else gets an
    explicit boolean mask. SDPA returns NaN on a row with no visible key: such rows (only
    possible with a key padding mask or q_offset < 0) are unmasked before the call and zeroed
    after it (row_ok), which also zeroes their gradients. is_causal needs scale > 0: torch's CPU
    kernel gives NaN rows for a causal mask with scale <= 0, so those get the explicit mask. An
    attn_mask always gives an explicit mask: boolean, or for an additive one the bias with -inf on
    keys the index masks hide."""
    if p.mask is not None:
        vis = _visible(p, device)
        row_ok = vis.any(-1, keepdim=True)
        if p.mask.dtype == torch.bool:
            return vis | ~row_ok, False, row_ok
        bias = torch.where(vis, p.mask.to(dtype), float("-inf"))
        return torch.where(row_ok, bias, 0.0), False, row_ok
    if p.kpm is None and p.cu is None:
        if not p.causal or p.q_offset >= p.Lk - 1:
            return None, False, None
        if p.q_offset == 0 and p.Lq == p.Lk and p.scale > 0:
            return None, True, None
    vis = _visible(p, device)
    if p.kpm is None and p.q_offset >= 0:
        return vis, False, None
    row_ok = vis.any(-1, keepdim=True)
    return vis | ~row_ok, False, row_ok


def _attention_sdpa(q, k, v, delta, beta, freqs, p, want_lse=False):
    G = p.H // p.Hkv
    # q with beta, k without; keys rotate with the *query* head's delta: (B, Hkv, Lk, d) -> (B, H, Lk, d)
    # the registered op directly: every argument was checked once, in _validate
    qr, kr = rotate_partial(lambda q, k: rotate_qk(q, k, delta, beta, freqs, p.q_pos, p.k_pos, LAYOUTS[p.layout]), q, k,
                            p.rot)
    vv = v.repeat_interleave(G, dim=1) if G > 1 else v
    mask, is_causal, row_ok = _sdpa_mask(p, q.device, qr.dtype)
    # an explicit mask (boolean too: SDPA adds -inf to hidden scores) does not hide a NaN score
    # (NaN - inf is NaN): NaN keys become 0 for the call, and _sdpa_nan_rows gives NaN to exactly
    # the rows that see one
    kc = kr.nan_to_num(0.0, float("inf"), float("-inf")) if mask is not None else kr
    out = F.scaled_dot_product_attention(qr, kc, vv, attn_mask=mask, is_causal=is_causal, scale=p.scale)
    out = out.masked_fill(_sdpa_nan_rows(qr, kr, mask, p), float("nan"))
    if row_ok is not None:
        out = out.masked_fill(~row_ok, 0.0)
    if not want_lse:
        return out, None
    # SDPA does not return it: the scores are recomputed (memory B * H * Lq * Lk in the compute dtype)
    s = _with_bias((qr.to(p.pdtype) @ kr.to(p.pdtype).transpose(-1, -2)) * p.scale, p)
    sm, _, row_ok = _masked_scores(s, _visible(p, q.device))
    return out, _masked_lse(sm, row_ok)


def _sdpa_nan_rows(qr, kr, mask, p):
    """(B, H, Lq, 1) bool: rows the reference makes NaN but torch's flash kernels may return as 0
    (they treat a row whose every score is NaN like a fully masked one): a query with a NaN or
    infinite entry, a query that sees a NaN key, or (additive attn_mask) a NaN bias on a key it
    sees. No host sync; O(B H L d) next to the attention."""
    bad = ~torch.isfinite(qr).all(-1)  # (B, H, Lq)
    kbad = torch.isnan(kr).any(-1)  # (B, H, Lk)
    if mask is not None and mask.dtype != torch.bool:
        bad = bad | torch.isnan(mask).any(-1)
        mask = mask != float("-inf")
    if mask is not None:
        sees = (mask & kbad[:, :, None, :]).any(-1)
    elif p.causal:  # key n visible to query m iff n <= m + q_offset
        first = kbad.int().argmax(-1, keepdim=True)  # (B, H, 1): the first NaN key, if any
        sees = kbad.any(-1, keepdim=True) & (first <= torch.arange(p.Lq, device=qr.device) + p.q_offset)
    else:
        sees = kbad.any(-1, keepdim=True).expand_as(bad)
    return (bad | sees)[..., None]


# --------------------------------------------------------------------------------------------
# "fused": registered ops around _C.attn_fwd / _C.attn_bwd.
# --------------------------------------------------------------------------------------------
_FUSED_CPU_DTYPES = (torch.float32, torch.float64)
_FUSED_CPU_MAX_D = 256


@torch.compiler.assume_constant_result  # a C call dynamo cannot trace; its answer is fixed per build
def _fused_cuda_supported(dtype, d, dv):
    """The CUDA kernel's own answer (tensor cores: float16/bfloat16, d == dv in {64, 128})."""
    return bool(_ext.launch("attn_cuda_supported", str(dtype).replace("torch.", ""), d, dv))


def _fused_unsupported(q, p):
    """None when the fused kernel serves this case, else the reason (for errors and for auto)."""
    if p.mask is not None:
        return "attn_mask: the fused kernel takes no dense mask (causal, key_padding_mask and cu_seqlens only)"
    if p.rot != p.d:
        return f"rotary_dim: the fused kernel rotates whole heads (rotary_dim={p.rot} < d={p.d})"
    dev = q.device.type
    if dev == "cuda" and not _ext.HAS_CUDA_KERNELS:
        return "this build of complexformer._C has no CUDA kernels"
    if dev == "cuda":
        if not _fused_cuda_supported(q.dtype, p.d, p.dv):
            return (f"dtype {str(q.dtype).replace('torch.', '')} with head dims d={p.d}, dv={p.dv} is not supported "
                    "by the fused CUDA kernel (float16/bfloat16, d == dv in {64, 128})")
        return None
    if q.dtype not in _FUSED_CPU_DTYPES:
        return f"q: dtype {q.dtype} not supported by the fused CPU kernel (float32, float64)"
    if p.d > _FUSED_CPU_MAX_D or p.dv > _FUSED_CPU_MAX_D:
        return f"q, v: head dims d={p.d}, dv={p.dv} exceed the fused CPU kernel's limit {_FUSED_CPU_MAX_D}"
    return None


def _last_dim_contig(t):
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _rotation_workspaces(q, k, kind):
    """() or (q_ws, k_ws) for the CUDA kernels: torch-allocated (B, H, L, d) buffers that a pre-pass
    fills with the rotated q~ and k~ (k per query head), so the attention kernels copy plain tiles.
    The backward always takes them (its outputs are that size anyway); the forward only when
    H == Hkv: a GQA forward rotates each key tile on load and never holds a (B, H, Lk, d) K
    (docs/design.md, "Memory")."""
    if q.device.type != "cuda":
        return ()
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    if (kind == "FWD" and k.shape[1] != H) or B * H * Lq * Lk * d == 0:  # empty: the forward rotates on load
        return ()
    return (torch.empty(B, H, Lq, d, dtype=q.dtype, device=q.device),
            torch.empty(B, H, Lk, d, dtype=q.dtype, device=q.device))


def _fused_fwd_body(q: Tensor, k: Tensor, v: Tensor, delta: Tensor, beta: Tensor, freqs: Tensor, q_pos: Tensor,
                    k_pos: Tensor, kpm: Optional[Tensor], cu_seqlens: Optional[Tensor], causal: bool, scale: float,
                    q_offset: int, layout: int) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    out = torch.empty(B, H, Lq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=_acc_dtype(q.dtype), device=q.device)
    _ext.launch("attn_fwd", q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, lse, int(causal),
                float(scale), int(q_offset), int(layout), _ext.num_threads(), _ext.stream(q),
                *_rotation_workspaces(q, k, "FWD"))
    return out, lse


def _fused_fwd_fake(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, causal, scale, q_offset, layout):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[3]), q.new_empty(B, H, Lq, dtype=_acc_dtype(q.dtype))


def _fused_bwd_body(q: Tensor, k: Tensor, v: Tensor, delta: Tensor, beta: Tensor, freqs: Tensor, q_pos: Tensor,
                    k_pos: Tensor, kpm: Optional[Tensor], cu_seqlens: Optional[Tensor], out: Tensor, dout: Tensor,
                    lse: Tensor, dlse: Optional[Tensor], causal: bool, scale: float, q_offset: int,
                    layout: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. the ROTATED q~ and k~ (per query head) and v (per query head), from the
    gradients of out and (None: 0) of lse."""
    B, H, Lq, d = q.shape
    Lk, dv = k.shape[2], v.shape[3]
    acc = _acc_dtype(q.dtype)
    dq_rot = torch.empty(B, H, Lq, d, dtype=acc, device=q.device)
    dk_rot = torch.empty(B, H, Lk, d, dtype=acc, device=q.device)
    dv_full = torch.empty(B, H, Lk, dv, dtype=acc, device=q.device)
    _ext.launch("attn_bwd", q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, dout, lse, dlse, dq_rot,
                dk_rot, dv_full, int(causal), float(scale), int(q_offset), int(layout), _ext.num_threads(),
                _ext.stream(q), *_rotation_workspaces(q, k, "BWD"))
    return dq_rot, dk_rot, dv_full


def _fused_bwd_fake(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, dout, lse, dlse, causal, scale,
                    q_offset, layout):
    B, H, Lq, d = q.shape
    acc = _acc_dtype(q.dtype)
    return (q.new_empty(B, H, Lq, d, dtype=acc), q.new_empty(B, H, k.shape[2], d, dtype=acc),
            q.new_empty(B, H, k.shape[2], v.shape[3], dtype=acc))


_cmha_fused_bwd = _ext.KernelOp("cmha_fused_bwd", _fused_bwd_body, fake=_fused_bwd_fake)


def _fused_setup_context(ctx, inputs, output):
    q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu, causal, scale, q_offset, layout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu, out, lse)
    ctx.args = (causal, scale, q_offset, layout)
    ctx.set_materialize_grads(False)  # an unused lse (or out) sends None: no zero tensor to read


def _rotate_bwd(x, grad, delta, beta, freqs, pos, layout, need_freqs):
    """(dx, ddelta, dbeta | None, dfreqs | None) through the rotation's backward (its registered op
    when traced by torch.compile)."""
    dx, dd, db, df = rotate_bwd(x, grad, delta, beta, freqs, pos, layout, need_freqs)
    return dx, dd, (db if beta is not None else None), (df if need_freqs else None)


def _fused_backward(ctx, dout, dlse):
    q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu, out, lse = ctx.saved_tensors
    causal, scale, q_offset, layout = ctx.args
    if dout is None and dlse is None:
        return (None,) * 14
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    if dlse is not None:
        dlse = dlse.to(lse.dtype).contiguous()
    dq_rot, dk_rot, dv_full = _cmha_fused_bwd(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu, out, dout, lse, dlse,
                                              causal, scale, q_offset, layout)
    B, H, Lk, dv = dv_full.shape
    Hkv = k.shape[1]
    # fixed-order sum over the G query heads of each kv head (deterministic)
    dvv = dv_full.view(B, Hkv, H // Hkv, Lk, dv).sum(2).to(v.dtype)
    need_freqs = ctx.needs_input_grad[5]
    dq, ddq, dbeta, dfq = _rotate_bwd(q, dq_rot, delta, beta, freqs, q_pos, layout, need_freqs)
    dk, ddk, _, dfk = _rotate_bwd(k, dk_rot, delta, None, freqs, k_pos, layout, need_freqs)
    dfreqs = dfq + dfk if need_freqs else None
    return dq, dk, dvv, ddq + ddk, dbeta, dfreqs, None, None, None, None, None, None, None, None


_cmha_fused = _ext.KernelOp(
    "cmha_fused", _fused_fwd_body, fake=_fused_fwd_fake, setup_context=_fused_setup_context,
    backward=_fused_backward, torch_math=_ext.UNSUPPORTED, label="cmha_attention(backend='fused')",
    hint="; use backend='reference' for higher-order gradients")


def _attention_fused(q, k, v, delta, beta, freqs, p, want_lse=False):
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    args = (q, k, v, delta.contiguous(), beta.contiguous(), freqs.contiguous(), p.q_pos, p.k_pos,
            p.kpm.contiguous() if p.kpm is not None else None, p.cu, p.causal, p.scale, p.q_offset, LAYOUTS[p.layout])
    out, lse = _cmha_fused(*args)
    return out, (lse if want_lse else None)


# --------------------------------------------------------------------------------------------
# "auto": THE place to adjust backend choice.
# --------------------------------------------------------------------------------------------
# CPU: fused; it beats rotate + SDPA at every length and in decoding (benchmarks/RESULTS.md, "CPU:
#   choice of the auto backend"; rerun benchmarks/cmha_backends.py before changing this).
# CUDA: sdpa by default (torch's flash kernel), until the GPU measurements say the fused kernel wins
#   (then set _AUTO_FUSED_ON_CUDA = True, or narrow by shape in _auto_backend). With a key padding
#   mask or cu_seqlens the fused kernel is taken whenever it serves the case: SDPA would then need
#   a dense (B, 1, Lq, Lk) boolean mask and lose its flash path.
_AUTO_FUSED_ON_CPU = True
_AUTO_FUSED_ON_CUDA = False


def _auto_backend(q, p, want_lse=False):
    """The backend "auto" runs for this (validated) case. return_lse prefers the fused kernel, which
    produces the log-sum-exp anyway, where "sdpa" would recompute the (B, H, Lq, Lk) scores."""
    if q.device.type == "cuda":
        use_fused = _AUTO_FUSED_ON_CUDA or want_lse or p.kpm is not None or p.cu is not None
    else:
        use_fused = _AUTO_FUSED_ON_CPU
    return "fused" if use_fused and _fused_unsupported(q, p) is None else "sdpa"


_IMPL = {"fused": _attention_fused, "sdpa": _attention_sdpa, "reference": _attention_reference}


def cmha_attention(q, k, v, delta, beta, freqs, *, causal=True, scale=None, q_offset=None, key_padding_mask=None,
                   cu_seqlens=None, layout="half", backend="auto", positions=None, return_lse=False, attn_mask=None,
                   rotary_dim=None):
    """Complex Multi-Head Attention (docs/design.md, "CMHA"): out (B, H, Lq, dv), or (out, lse) with
    return_lse=True.

    Args:
        q: (B, H, Lq, d) queries; k: (B, Hkv, Lk, d) keys; v: (B, Hkv, Lk, dv) values. Same dtype
            and device; d even; H % Hkv == 0 (GQA/MQA: query head i reads kv head i // (H // Hkv)).
        delta, beta: (H, d/2) semantic-angle scale and phase bias. freqs: (d/2,) shared or
            (H, d/2) per head. Computed in float64 for float64 q, else float32 (gradients flow back
            in the parameters' own dtype, to all of q, k, v, delta, beta and freqs).
        causal: key n visible to query m iff n <= m + q_offset.
        scale: score scale, default 1/sqrt(d) (``scale=1.0`` reproduces the authors' code).
        q_offset: position of query 0 relative to key 0, default Lk - Lq (bottom-right aligned:
            decoding with a KV cache, chunked prefill). Enters the causal mask and the default
            query positions.
        key_padding_mask: (B, Lk) bool, True = attend. A query with no visible key outputs 0.
        attn_mask: a dense mask broadcastable to (B, H, Lq, Lk): bool (True = attend) or floating
            point (added to the scaled scores; -inf hides a key, other values, however negative,
            are ordinary biases, as in torch's SDPA). It combines with causal, key_padding_mask
            and cu_seqlens (a key is visible only if every mask lets it through); empty and NaN
            rows follow the same rules. Served by "sdpa" and "reference" ("auto" picks "sdpa",
            "fused" raises); gradients flow to a floating-point mask.
        cu_seqlens: (S+1,) int32 packed-sequence boundaries (0 = cu[0] <= ... <= cu[S] = Lq);
            needs B == 1 and Lq == Lk, excludes q_offset. No attention across sequences; positions
            restart at 0 in each sequence.
        layout: "half" (re = x[:d/2], im = x[d/2:], the authors' layout) or "interleaved".
        backend: "auto", "fused", "sdpa" or "reference" (see the module docstring). "auto": on
            CPU "fused" when its kernel serves the case (no attn_mask) (float32/float64, d, dv <= 256), else
            "sdpa"; on CUDA "fused" when the fused kernel serves the case (float16/bfloat16,
            d == dv in {64, 128}) and a key padding mask or cu_seqlens is given, else "sdpa"
            (measurements: benchmarks/RESULTS.md). "fused" raises a RuntimeError for a case its
            kernel cannot serve.
        positions: optional (q_positions, k_positions), each (L,) or (B, L) integer tensors, the
            absolute positions used by the rotation (e.g. a module's position_ids and KV-cache key
            positions). Masks stay index-based (causal by index with q_offset, padding,
            cu_seqlens); positions replace only the defaults q_offset + arange(Lq) / arange(Lk).
        return_lse: also return lse (B, H, Lq), float32 (float64 for float64 q): each row's
            natural log-sum-exp of the scaled scores over its visible keys, -inf on a row with no
            visible key. Differentiable. Partial attentions over disjoint key sets merge exactly
            with `merge_attention` (ring / context-parallel attention, split-KV decoding).
            "sdpa" recomputes the scores for it (memory B * H * Lq * Lk); "auto" then takes the
            fused kernel wherever it serves the case, on CUDA too.
        rotary_dim: partial rotary (HF's partial_rotary_factor): only the first rotary_dim (even)
            features of each head are rotated, with pairs laid out within them, and delta, beta,
            freqs have rotary_dim/2 columns; the other features enter the scores unrotated.
            Default d. Served by "sdpa" and "reference" ("auto" picks "sdpa", "fused" raises).
    """
    p, delta, beta, freqs = _prepare(q, k, v, delta, beta, freqs, causal, scale, q_offset, key_padding_mask,
                                     cu_seqlens, layout, backend, positions, attn_mask, rotary_dim)
    return_lse = check_bool("return_lse", return_lse)
    if p.Lq == 0 or p.Lk == 0 or p.dv == 0:
        # Nothing to attend to (or nobody asking): the reference math gives the empty / zero
        # result, still attached to the graph so .backward() works and yields zero gradients.
        impl = _attention_reference
    elif _ext.needs_torch_math(q, k, v, delta, beta, freqs):
        # forward-mode AD or a torch.func transform: the kernels' autograd is reverse mode only
        impl = _attention_reference
    else:
        if backend == "auto":
            backend = _auto_backend(q, p, return_lse)
        elif backend == "fused":
            why = _fused_unsupported(q, p)
            if why is not None:
                raise RuntimeError(f"cmha_attention(backend='fused'): {why}; use backend='auto' or 'sdpa'")
        impl = _IMPL[backend]
    out, lse = impl(q, k, v, delta, beta, freqs, p, return_lse)
    return (out, lse) if return_lse else out


def _prepare(q, k, v, delta, beta, freqs, causal, scale, q_offset, key_padding_mask, cu_seqlens, layout, backend,
             positions, attn_mask, rotary_dim):
    """(plan, delta, beta, freqs in the compute dtype): every argument checked."""
    p = _validate(q, k, v, delta, beta, freqs, causal, scale, q_offset, key_padding_mask, cu_seqlens,
                  layout, backend, positions, rotary_dim)
    if attn_mask is not None:
        p.mask = _check_attn_mask(attn_mask, p, q.device)
    return p, delta.to(p.pdtype), beta.to(p.pdtype), freqs.to(p.pdtype)


def attention_probs(q, k, v, delta, beta, freqs, *, softcap=None, causal=True, scale=None, key_padding_mask=None,
                    cu_seqlens=None, layout="half", positions=None, attn_mask=None, rotary_dim=None):
    """(out, probabilities (B, H, Lq, Lk) in q's dtype) by the "reference" math of
    :func:`cmha_attention` (same arguments, same masks, empty-row and NaN-row rules), for callers
    that need the probabilities (``output_attentions``) or attention logit softcapping: with
    ``softcap``, scores become softcap * tanh(scores / softcap) before any mask (Gemma 2)."""
    p, delta, beta, freqs = _prepare(q, k, v, delta, beta, freqs, causal, scale, None, key_padding_mask, cu_seqlens,
                                     layout, "reference", positions, attn_mask, rotary_dim)
    p.softcap = _check_softcap(softcap)
    return _attention_reference(q, k, v, delta, beta, freqs, p, want_probs=True)


def _check_softcap(softcap):
    if softcap is None:
        return None
    softcap = check_real("softcap", softcap, "None or a positive number")
    if not softcap > 0:
        raise ValueError(f"softcap: expected None or a positive number, got {softcap!r}")
    return softcap


# --------------------------------------------------------------------------------------------
# Self-check for `python -m complexformer.info`: every backend on every device, against the
# pair-by-pair float64 reference.
# --------------------------------------------------------------------------------------------
def _selfcheck_backend(backend):
    def check(device):
        from .reference import cmha_attention_pairwise, default_freqs

        g = torch.Generator().manual_seed(0)
        B, H, Hkv, Lq, Lk, d = 2, 4, 2, 5, 9, 64
        # float32 on CPU; float16 on CUDA (the fused CUDA kernel is tensor-core only): tol 5e-3
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        q = torch.randn(B, H, Lq, d, generator=g)
        k = torch.randn(B, Hkv, Lk, d, generator=g)
        v = torch.randn(B, Hkv, Lk, d, generator=g)
        delta = torch.randn(H, d // 2, generator=g) / math.sqrt(d // 2)
        beta = 0.3 * torch.randn(H, d // 2, generator=g)
        freqs = default_freqs(d)
        kpm = torch.rand(B, Lk, generator=g) > 0.2
        ref, _ = cmha_attention_pairwise(q, k, v, delta, beta, freqs, key_padding_mask=kpm)
        args = [t.to(device=device, dtype=dtype if i < 3 else torch.float32)
                for i, t in enumerate((q, k, v, delta, beta, freqs))]
        out = cmha_attention(*args, key_padding_mask=kpm.to(device), backend=backend)
        return (out.double().cpu() - ref).abs().max().item()

    return check


for _b in ("reference", "auto", "sdpa", "fused"):
    selfcheck(f"cmha_attention[{_b}]", 5e-3)(_selfcheck_backend(_b))
