"""Kernel-level tests of the CPU fused CMHA attention (_C.attn_fwd / _C.attn_bwd on CPU tensors).

Forward: against the pair-by-pair float64 reference (complexformer.reference), which never uses the
factorized rotation the kernel implements. Backward: against float64 autograd through an explicit
rotate-then-attention (the gradients with respect to the rotated q~, k~ per query head and v per
query head, as docs/design.md, "Attention", defines them). float32: the FlashAttention rule, i.e. the kernel's
error against float64 is at most 2x that of the same math done by PyTorch in float32, plus a floor.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from complexformer import _C
from complexformer._ext import dl, dl_opt
from complexformer.reference import cmha_attention_pairwise, default_positions, split_pairs, visible_mask
from oracles import assert_fa_rule, attention_ref, attn_inputs, rotate_ref

LAYOUTS = {"half": 0, "interleaved": 1}


# ------------------------------------------------------------------------------------------------
# calling the kernels

def _resolve(q, k, *, causal, scale, q_offset, cu_seqlens, q_pos, k_pos):
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_offset = Lk - Lq if q_offset is None else q_offset
    dq_pos, dk_pos = default_positions(B, Lq, Lk, q_offset=q_offset, cu_seqlens=cu_seqlens)
    q_pos = dq_pos if q_pos is None else q_pos
    k_pos = dk_pos if k_pos is None else k_pos
    return scale, q_offset, q_pos.contiguous(), k_pos.contiguous()


def kernel_fwd(q, k, v, delta, beta, freqs, *, causal=True, scale=None, q_offset=None, kpm=None,
               cu_seqlens=None, layout="half", q_pos=None, k_pos=None, nthreads=None):
    B, H, Lq, _ = q.shape
    scale, q_offset, q_pos, k_pos = _resolve(q, k, causal=causal, scale=scale, q_offset=q_offset,
                                             cu_seqlens=cu_seqlens, q_pos=q_pos, k_pos=k_pos)
    out = torch.empty(B, H, Lq, v.shape[3], dtype=q.dtype)
    lse = torch.empty(B, H, Lq, dtype=q.dtype)
    _C.attn_fwd(dl(q), dl(k), dl(v), dl(delta), dl(beta), dl(freqs), dl(q_pos), dl(k_pos),
                dl_opt(kpm), dl_opt(cu_seqlens), dl(out), dl(lse), int(causal), float(scale),
                int(q_offset), LAYOUTS[layout], nthreads or torch.get_num_threads(), 0)
    return out, lse


def kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, *, causal=True, scale=None, q_offset=None,
               kpm=None, cu_seqlens=None, layout="half", q_pos=None, k_pos=None, nthreads=None, dlse=None):
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    scale, q_offset, q_pos, k_pos = _resolve(q, k, causal=causal, scale=scale, q_offset=q_offset,
                                             cu_seqlens=cu_seqlens, q_pos=q_pos, k_pos=k_pos)
    dq = torch.full((B, H, Lq, d), float("nan"), dtype=q.dtype)
    dk = torch.full((B, H, Lk, d), float("nan"), dtype=q.dtype)
    dvf = torch.full((B, H, Lk, v.shape[3]), float("nan"), dtype=q.dtype)
    _C.attn_bwd(dl(q), dl(k), dl(v), dl(delta), dl(beta), dl(freqs), dl(q_pos), dl(k_pos),
                dl_opt(kpm), dl_opt(cu_seqlens), dl(out), dl(dout), dl(lse), dl_opt(dlse), dl(dq), dl(dk), dl(dvf),
                int(causal), float(scale), int(q_offset), LAYOUTS[layout],
                nthreads or torch.get_num_threads(), 0)
    return dq, dk, dvf


# ------------------------------------------------------------------------------------------------
# references

def ref_grads(q, k, v, delta, beta, freqs, dout, *, causal, scale, q_offset, kpm, cu_seqlens, layout,
              q_pos, k_pos):
    """float64 (dq_rot, dk_rot, dv_full) by autograd through rotate-then-attention."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    G = H // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    delta, beta, freqs = delta.double(), beta.double(), freqs.double()
    qr = rotate_ref(q, delta, beta, freqs, q_pos.expand(B, Lq), layout).detach().requires_grad_()
    kr = rotate_ref(k.repeat_interleave(G, 1), delta, None, freqs, k_pos.expand(B, Lk), layout)
    kr = kr.detach().requires_grad_()
    vf = v.repeat_interleave(G, 1).detach().requires_grad_()
    vis = visible_mask(B, Lq, Lk, causal=causal, q_offset=q_offset, key_padding_mask=kpm,
                       cu_seqlens=cu_seqlens)
    out = attention_ref(qr, kr, vf, vis, scale)
    out.backward(dout.double())
    return qr.grad, kr.grad, vf.grad


# ------------------------------------------------------------------------------------------------
# the test cases: (name, attn_inputs kwargs, mask kwargs)

CASES = [
    ("L1", dict(B=1, H=1, Hkv=1, Lq=1, Lk=1, d=32), dict(causal=True)),
    ("L17_gqa", dict(B=3, H=4, Hkv=2, Lq=17, Lk=17, d=64), dict(causal=True)),
    ("L127_mqa_nc", dict(B=1, H=8, Hkv=1, Lq=127, Lk=127, d=32), dict(causal=False)),
    ("L129_d128", dict(B=1, H=2, Hkv=2, Lq=129, Lk=129, d=128), dict(causal=True)),
    ("L300", dict(B=1, H=2, Hkv=1, Lq=300, Lk=300, d=32, per_head_freqs=True), dict(causal=True)),
    ("d6_odd_dv", dict(B=3, H=2, Hkv=1, Lq=70, Lk=70, d=6, dv=5), dict(causal=True)),
    ("interleaved", dict(B=1, H=4, Hkv=2, Lq=65, Lk=65, d=16), dict(causal=True, layout="interleaved")),
    ("decode", dict(B=2, H=4, Hkv=2, Lq=1, Lk=100, d=32), dict(causal=True)),
    ("chunked_prefill", dict(B=1, H=2, Hkv=1, Lq=40, Lk=150, d=32), dict(causal=True)),
    ("q_offset_neg", dict(B=1, H=2, Hkv=1, Lq=70, Lk=70, d=16), dict(causal=True, q_offset=-5)),
    ("q_offset_big", dict(B=1, H=2, Hkv=2, Lq=20, Lk=90, d=16), dict(causal=True, q_offset=100)),
    ("lq_gt_lk_nc", dict(B=2, H=2, Hkv=1, Lq=90, Lk=33, d=16), dict(causal=False)),
    ("kpm", dict(B=3, H=2, Hkv=1, Lq=80, Lk=80, d=16), dict(causal=True, kpm=True)),
    ("kpm_nc", dict(B=3, H=4, Hkv=4, Lq=80, Lk=130, d=16), dict(causal=False, kpm=True)),
    ("varlen", dict(B=1, H=4, Hkv=2, Lq=150, Lk=150, d=16), dict(causal=True, cu=[0, 5, 5, 70, 71, 150])),
    ("varlen_nc", dict(B=1, H=2, Hkv=1, Lq=150, Lk=150, d=16), dict(causal=False, cu=[0, 64, 100, 150])),
    ("strided", dict(B=2, H=4, Hkv=2, Lq=67, Lk=67, d=32, strided=True), dict(causal=True)),
    ("scale1", dict(B=1, H=2, Hkv=1, Lq=33, Lk=33, d=16), dict(causal=True, scale=1.0)),
]


def _mask_args(B, Lq, Lk, mask, seed=0):
    kw = dict(causal=mask["causal"], scale=mask.get("scale"), q_offset=mask.get("q_offset"),
              layout=mask.get("layout", "half"))
    kw["kpm"] = None
    kw["cu_seqlens"] = None
    if mask.get("kpm"):
        g = torch.Generator().manual_seed(seed + 1)
        kpm = torch.rand(B, Lk, generator=g) > 0.3
        kpm[0, :] = False            # a batch row with nothing visible: out 0, lse -inf
        kpm[-1, : Lk // 2] = False    # causal rows of the first half see nothing
        kw["kpm"] = kpm
    if "cu" in mask:
        kw["cu_seqlens"] = torch.tensor(mask["cu"], dtype=torch.int32)
    return kw


@pytest.mark.parametrize("name,shape,mask", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_float64(name, shape, mask):
    q, k, v, delta, beta, freqs = attn_inputs(**shape)
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    kw = _mask_args(B, Lq, Lk, mask)
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, **kw)
    ref_out, ref_lse = cmha_attention_pairwise(q, k, v, delta, beta, freqs, causal=kw["causal"],
                                               scale=kw["scale"], q_offset=kw["q_offset"],
                                               key_padding_mask=kw["kpm"], cu_seqlens=kw["cu_seqlens"],
                                               layout=kw["layout"])
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-9)  # -inf where nothing is visible

    dout = torch.randn(B, H, Lq, v.shape[3], dtype=torch.float64)
    dq, dk, dvf = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, **kw)
    scale, q_offset, q_pos, k_pos = _resolve(q, k, causal=kw["causal"], scale=kw["scale"],
                                             q_offset=kw["q_offset"], cu_seqlens=kw["cu_seqlens"],
                                             q_pos=None, k_pos=None)
    rdq, rdk, rdv = ref_grads(q, k, v, delta, beta, freqs, dout, causal=kw["causal"], scale=scale,
                              q_offset=q_offset, kpm=kw["kpm"], cu_seqlens=kw["cu_seqlens"],
                              layout=kw["layout"], q_pos=q_pos, k_pos=k_pos)
    torch.testing.assert_close(dq, rdq, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(dk, rdk, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(dvf, rdv, atol=1e-10, rtol=1e-9)


FLOAT32_CASES = ["L17_gqa", "L129_d128", "L300", "kpm", "varlen", "strided", "decode", "d6_odd_dv"]


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_flash_rule(name):
    shape, mask = next((s, m) for n, s, m in CASES if n == name)
    q, k, v, delta, beta, freqs = attn_inputs(**shape, dtype=torch.float32)
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    G = H // k.shape[1]
    kw = _mask_args(B, Lq, Lk, mask)
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    dout = torch.randn(B, H, Lq, v.shape[3])
    dq, dk, dvf = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, **kw)

    scale, q_offset, q_pos, k_pos = _resolve(q, k, causal=kw["causal"], scale=kw["scale"],
                                             q_offset=kw["q_offset"], cu_seqlens=kw["cu_seqlens"],
                                             q_pos=None, k_pos=None)
    vis = visible_mask(B, Lq, Lk, causal=kw["causal"], q_offset=q_offset, key_padding_mask=kw["kpm"],
                       cu_seqlens=kw["cu_seqlens"])

    def torch_math(dtype):
        """rotate-then-attention in `dtype` with autograd: (out, dq_rot, dk_rot, dv_full)."""
        qr = rotate_ref(q.to(dtype), delta.to(dtype), beta.to(dtype), freqs.to(dtype),
                        q_pos.expand(B, Lq), kw["layout"]).detach().requires_grad_()
        kr = rotate_ref(k.to(dtype).repeat_interleave(G, 1), delta.to(dtype), None, freqs.to(dtype),
                        k_pos.expand(B, Lk), kw["layout"]).detach().requires_grad_()
        vf = v.to(dtype).repeat_interleave(G, 1).detach().requires_grad_()
        o = attention_ref(qr, kr, vf, vis, scale)
        o.backward(dout.to(dtype))
        return o.detach(), qr.grad, kr.grad, vf.grad

    ref = torch_math(torch.float64)
    low = torch_math(torch.float32)
    for name_, got, r, l in zip(["out", "dq_rot", "dk_rot", "dv_full"], (out, dq, dk, dvf), ref, low):
        assert_fa_rule(got, l, r, floor=1e-5, what=name_)
    assert torch.equal(torch.isfinite(lse), vis.expand(B, H, Lq, Lk).any(-1))


@given(B=st.integers(1, 3), Hkv=st.integers(1, 2), G=st.integers(1, 3), Lq=st.integers(1, 80),
       extra=st.integers(0, 70), h=st.integers(1, 20), dv=st.integers(1, 40), causal=st.booleans(),
       q_offset=st.one_of(st.none(), st.integers(-100, 100)), layout=st.sampled_from(["half", "interleaved"]),
       strided=st.booleans(), use_kpm=st.booleans(), nthreads=st.integers(1, 3))
def test_property_float64(B, Hkv, G, Lq, extra, h, dv, causal, q_offset, layout, strided, use_kpm, nthreads):
    """Random shapes / masks / layouts: forward vs the pair-by-pair reference, backward vs autograd."""
    Lk = Lq + extra
    q, k, v, delta, beta, freqs = attn_inputs(B=B, H=Hkv * G, Hkv=Hkv, Lq=Lq, Lk=Lk, d=2 * h, dv=dv,
                                              strided=strided, seed=Lq * 131 + Lk)
    kpm = (torch.arange(Lk)[None, :] % (B + 2) != torch.arange(B)[:, None]) if use_kpm else None
    kw = dict(causal=causal, scale=None, q_offset=q_offset, kpm=kpm, cu_seqlens=None, layout=layout)
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, nthreads=nthreads, **kw)
    ref_out, ref_lse = cmha_attention_pairwise(q, k, v, delta, beta, freqs, causal=causal, q_offset=q_offset,
                                               key_padding_mask=kpm, layout=layout)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-9)
    dout = torch.randn(out.shape, dtype=torch.float64)
    got = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, nthreads=nthreads, **kw)
    scale, q_off, q_pos, k_pos = _resolve(q, k, causal=causal, scale=None, q_offset=q_offset, cu_seqlens=None,
                                          q_pos=None, k_pos=None)
    ref = ref_grads(q, k, v, delta, beta, freqs, dout, causal=causal, scale=scale, q_offset=q_off, kpm=kpm,
                    cu_seqlens=None, layout=layout, q_pos=q_pos, k_pos=k_pos)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_extreme_q_offset():
    """q_offset near the int64 limits: everything visible / nothing visible, no overflow."""
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=2, Hkv=1, Lq=5, Lk=7, d=8)
    pos = (torch.arange(5)[None], torch.arange(7)[None])
    for off in (2**62, -(2**62)):
        out, lse = kernel_fwd(q, k, v, delta, beta, freqs, causal=True, q_offset=off, q_pos=pos[0], k_pos=pos[1])
        ref_out, ref_lse = cmha_attention_pairwise(q, k, v, delta, beta, freqs, causal=False, q_pos=pos[0],
                                                   k_pos=pos[1])
        if off > 0:
            torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
        else:
            assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_per_head_freqs_and_explicit_positions():
    """Per-head freqs and arbitrary (per-batch) position tensors enter the rotation only."""
    q, k, v, delta, beta, freqs = attn_inputs(B=2, H=4, Hkv=2, Lq=30, Lk=50, d=16, per_head_freqs=True)
    q_pos = torch.stack([torch.arange(30) + 7, torch.arange(30) * 3])
    k_pos = torch.stack([torch.arange(50), torch.arange(50) * 2 + 1])
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, causal=True, q_pos=q_pos, k_pos=k_pos)
    ref_out, ref_lse = cmha_attention_pairwise(q, k, v, delta, beta, freqs, causal=True, q_pos=q_pos,
                                               k_pos=k_pos)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-9)


def test_strided_positions_and_out():
    """The kernels read positions (forward) and out, dout (backward) through their strides: the
    results equal those of contiguous copies bit for bit."""
    q, k, v, delta, beta, freqs = attn_inputs(B=2, H=4, Hkv=2, Lq=12, Lk=12, d=16)
    pos = torch.stack([torch.arange(12) + 3, torch.arange(12) * 2]).repeat_interleave(2, dim=1)
    pos_s, pos_c = pos[:, ::2], pos[:, ::2].contiguous()
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, q_pos=pos_c, k_pos=pos_c, nthreads=1)
    out_s, lse_s = torch.empty_like(out), torch.empty_like(lse)
    _C.attn_fwd(dl(q), dl(k), dl(v), dl(delta), dl(beta), dl(freqs), dl(pos_s), dl(pos_s), None, None,
                dl(out_s), dl(lse_s), 1, 0.25, 0, 0, 1, 0)
    assert torch.equal(out_s, out) and torch.equal(lse_s, lse)
    dout = torch.randn_like(out)
    ref = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, q_pos=pos_c, k_pos=pos_c)
    wide = lambda t: torch.cat([t, torch.full_like(t, float("nan"))], dim=-1)[..., :t.shape[-1]]  # noqa: E731
    got = kernel_bwd(q, k, v, delta, beta, freqs, wide(out), wide(dout), lse, q_pos=pos_c, k_pos=pos_c)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_float32_special_pairs(layout):
    """Pairs on the branch cut (negative re, +-0 im), at the origin, signed zeros and large norms:
    the float32 tile loader's atan2 / sincos must follow the libm conventions of the reference."""
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=2, Hkv=1, Lq=24, Lk=24, d=8, dtype=torch.float32)
    special = torch.tensor([[-1.0, 0.0], [-1.0, -0.0], [0.0, 0.0], [-0.0, 0.0], [-0.0, -0.0], [0.0, -0.0],
                            [3.0, -2.0], [-1e-20, 1e-20], [0.5, -0.0], [-2.0, 1e-30], [-2.0, -1e-30], [1.0, 1.0]])
    for x in (q, k):
        re, im = split_pairs(x, layout)  # views into x
        n = min(re.shape[2], special.shape[0])
        re[:, :, :n, 0] = special[:n, 0]
        im[:, :, :n, 0] = special[:n, 1]
        re[:, :, :n, 2] = special[:n, 0].flip(0)
        im[:, :, :n, 2] = special[:n, 1].flip(0)
    q64 = [t.double() for t in (q, k, v, delta, beta, freqs)]
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, causal=True, layout=layout)
    ref_out, ref_lse = cmha_attention_pairwise(*q64, causal=True, layout=layout)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    out64, lse64 = kernel_fwd(*q64, causal=True, layout=layout)
    torch.testing.assert_close(out64, ref_out, atol=1e-10, rtol=1e-9)


def test_long_positions_float32_phase():
    """Positions ~1e6: the positional angle is reduced in double, so float32 keeps its accuracy."""
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=2, Hkv=1, Lq=20, Lk=20, d=16, dtype=torch.float32)
    q_pos = (torch.arange(20) + 1_000_000)[None]
    k_pos = q_pos.clone()
    out, _ = kernel_fwd(q, k, v, delta, beta, freqs, causal=True, q_pos=q_pos, k_pos=k_pos)
    ref_out, _ = cmha_attention_pairwise(q.double(), k.double(), v.double(), delta.double(), beta.double(),
                                         freqs.double(), causal=True, q_pos=q_pos, k_pos=k_pos)
    assert (out.double() - ref_out).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout,per_head,kpm", [("half", False, False), ("interleaved", True, True)])
def test_few_query_forward_same_bits(dtype, layout, per_head, kpm):
    """A forward with one query tile (decoding) takes the keys' head-independent polar forms from
    a per-call precomputation; a longer forward rotates them per item. The last query of a 65-row
    call (its own tile, the same visible keys) must get the decode call's bits exactly."""
    B, H, Hkv, Lk, d = 2, 6, 2, 150, 32
    q, k, v, delta, beta, freqs = attn_inputs(B=B, H=H, Hkv=Hkv, Lq=65, Lk=Lk, d=d, dtype=dtype,
                                              per_head_freqs=per_head)
    k[0, 1, 7, 3] = float("nan")  # a NaN key: every query of batch row 0, kv head 1 sees it
    pos = torch.randint(0, 100_000, (B, Lk), generator=torch.Generator().manual_seed(3))
    mask = (torch.rand(B, Lk, generator=torch.Generator().manual_seed(4)) > 0.3) if kpm else None
    kw = dict(kpm=mask, layout=layout, k_pos=pos, nthreads=2)
    out_all, lse_all = kernel_fwd(q, k, v, delta, beta, freqs, q_pos=pos[:, -65:], **kw)
    out_one, lse_one = kernel_fwd(q[:, :, -1:], k, v, delta, beta, freqs, q_pos=pos[:, -1:], **kw)
    assert out_one.isnan().any() and not out_one.isnan().all()
    assert torch.equal(out_one.nan_to_num(7.0), out_all[:, :, -1:].nan_to_num(7.0))
    assert torch.equal(lse_one.nan_to_num(7.0), lse_all[:, :, -1:].nan_to_num(7.0))
    ref_out, _ = cmha_attention_pairwise(*(t.double() for t in (q[:, :, -1:], k, v, delta, beta, freqs)),
                                         causal=True, key_padding_mask=mask, layout=layout, q_pos=pos[:, -1:],
                                         k_pos=pos)
    torch.testing.assert_close(out_one.double(), ref_out, atol=1e-4 if dtype == torch.float32 else 1e-10,
                               rtol=1e-4 if dtype == torch.float32 else 1e-9, equal_nan=True)


@pytest.mark.parametrize("nthreads", [1, 3])
def test_threads_and_determinism(nthreads):
    """Small B*H splits the work (query chunks forward, key chunks + partial dq backward)."""
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=1, Hkv=1, Lq=300, Lk=300, d=16)
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, nthreads=nthreads)
    ref_out, _ = cmha_attention_pairwise(q, k, v, delta, beta, freqs, causal=True)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    dout = torch.randn_like(out)
    g1 = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, nthreads=nthreads)
    g2 = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, nthreads=nthreads)
    g0 = kernel_bwd(q, k, v, delta, beta, freqs, out, dout, lse, nthreads=1)
    for a, b, c in zip(g1, g2, g0):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)


def test_empty_keys():
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=2, Hkv=1, Lq=5, Lk=0, d=16)
    out, lse = kernel_fwd(q, k, v, delta, beta, freqs, causal=False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()
    dq, dk, dvf = kernel_bwd(q, k, v, delta, beta, freqs, out, torch.randn_like(out), lse, causal=False)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.numel() == 0 and dvf.numel() == 0


def _call_fwd_with(**over):
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=2, Hkv=1, Lq=8, Lk=8, d=16)
    args = dict(q=q, k=k, v=v, delta=delta, beta=beta, freqs=freqs, q_pos=torch.arange(8)[None],
                k_pos=torch.arange(8)[None], kpm=None, cu=None, out=torch.empty(1, 2, 8, 16, dtype=q.dtype),
                lse=torch.empty(1, 2, 8, dtype=q.dtype))
    args.update(over)
    a = args
    _C.attn_fwd(dl(a["q"]), dl(a["k"]), dl(a["v"]), dl(a["delta"]), dl(a["beta"]), dl(a["freqs"]),
                dl(a["q_pos"]), dl(a["k_pos"]), dl_opt(a["kpm"]), dl_opt(a["cu"]), dl(a["out"]),
                dl(a["lse"]), 1, 0.25, 0, over.get("layout", 0), 1, 0)


@pytest.mark.parametrize("over,exc,match", [
    (dict(k=torch.randn(1, 1, 8, 16, dtype=torch.float32)), TypeError, "^k: dtype"),
    (dict(q=torch.randn(1, 2, 8, 7, dtype=torch.float64)), ValueError, "^q: head dim"),
    (dict(k=torch.randn(1, 3, 8, 16, dtype=torch.float64)), ValueError, "^k: 3 kv heads"),
    (dict(v=torch.randn(1, 1, 9, 16, dtype=torch.float64)), ValueError, "^v: expected size"),
    (dict(q=torch.randn(1, 2, 16, 8, dtype=torch.float64).transpose(2, 3)), ValueError, "^q: the last dim"),
    (dict(delta=torch.randn(2, 7, dtype=torch.float64)), ValueError, "^delta"),
    (dict(freqs=torch.randn(3, 8, dtype=torch.float64)), ValueError, "^freqs"),
    (dict(q_pos=torch.arange(8, dtype=torch.int32)[None]), TypeError, "^q_pos"),
    (dict(kpm=torch.ones(1, 8)), TypeError, "^key_padding_mask"),
    (dict(cu=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError, "^cu_seqlens"),
    (dict(out=torch.empty(1, 2, 8, 16, dtype=torch.float64).transpose(1, 2)), ValueError, "^out"),
    (dict(lse=torch.empty(1, 2, 8, dtype=torch.float32)), TypeError, "^lse"),
    (dict(layout=2), ValueError, "^layout"),
])
def test_validation(over, exc, match):
    with pytest.raises(exc, match=match):
        _call_fwd_with(**over)
