"""Adversarial use of the public API: no silent wrong answers.

Each case here once returned a plausible but wrong value (a zero tangent, a dropped second-order
term, a loss of 0, a 0 output row, all-zero rotations) or crashed the process. Every test compares
against plain-PyTorch float64 math or requires a clear exception naming the argument. Ends with
hypothesis fuzz passes over the public functions and a memory-growth check over many calls.
"""
import math
import operator

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import complexformer as cf
from complexformer import _C
from complexformer._ext import dl
from complexformer.reference import cmha_attention_pairwise, default_freqs
from complexformer.rotate import _rotate_forward, euler_rotate_qk, rotate_reference
from oracles import attn_inputs, cmha_ref, rotate_ref

F64 = torch.float64
ATTN_BACKENDS = ["fused", "sdpa", "auto", "reference"]


def pdl_case(N=7, V=5, dtype=F64, negative=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(V, generator=g, dtype=dtype) + 0.1
    if negative:  # one negative class weight that makes the batch's target-weight sum negative
        w[y[0]] = -(w.sum() * N)
    return z, y, w


def attn_case(B=1, H=2, Hkv=1, Lq=5, Lk=5, d=8, dtype=F64, seed=0):
    return attn_inputs(B, H, Hkv, Lq, Lk, d, dtype=dtype, seed=seed)


def rot_case(B=2, H=2, Hx=1, L=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Hx, L, d, generator=g, dtype=F64)
    delta = torch.randn(H, d // 2, generator=g, dtype=F64)
    beta = torch.randn(H, d // 2, generator=g, dtype=F64)
    freqs = torch.rand(d // 2, generator=g, dtype=F64)
    return x, delta, beta, freqs


# ------------------------------------------------------------------ 1. forward-mode AD, torch.func


def test_pdl_loss_forward_ad_matches_cross_entropy():
    z, y, w = pdl_case()
    t = torch.randn_like(z)
    want = torch.func.jvp(lambda z: F.cross_entropy(z, y, weight=w, label_smoothing=0.1), (z,), (t,))[1]
    got = torch.func.jvp(lambda z: cf.pdl_loss(z, y, w, label_smoothing=0.1), (z,), (t,))[1]
    torch.testing.assert_close(got, want)
    with fwAD.dual_level():
        out = cf.pdl_loss(fwAD.make_dual(z, t), y, w, label_smoothing=0.1)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want)


def test_pdl_loss_func_grad_jacrev_hessian():
    z, y, w = pdl_case()
    ce = lambda z: F.cross_entropy(z, y, weight=w)  # noqa: E731
    pdl = lambda z: cf.pdl_loss(z, y, w)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(pdl)(z), torch.func.grad(ce)(z))
    torch.testing.assert_close(torch.func.jacrev(pdl)(z), torch.func.jacrev(ce)(z))
    torch.testing.assert_close(torch.func.hessian(pdl)(z), torch.func.hessian(ce)(z))
    per = torch.func.vmap(pdl)(torch.stack([z, 2 * z]))
    torch.testing.assert_close(per, torch.stack([ce(z), ce(2 * z)]))


@pytest.mark.parametrize("is_query", [True, False])
def test_euler_rotate_forward_ad(is_query):
    x, delta, beta, freqs = rot_case()
    tx, td = torch.randn_like(x), torch.randn_like(delta)
    b = beta if is_query else None
    pos = torch.arange(x.shape[2])[None]
    G = delta.shape[0] // x.shape[1]
    # the oracle: the polar form in plain PyTorch (forward AD of every backend runs rotate_reference)
    want = torch.func.jvp(lambda x, dl: rotate_ref(x.repeat_interleave(G, 1), dl, b, freqs, pos), (x, delta),
                          (tx, td))[1]
    got = torch.func.jvp(lambda x, dl: cf.euler_rotate(x, dl, beta, freqs, is_query=is_query), (x, delta),
                         (tx, td))[1]
    torch.testing.assert_close(got, want)
    with fwAD.dual_level():
        out = cf.euler_rotate(fwAD.make_dual(x, tx), fwAD.make_dual(delta, td), beta, freqs, is_query=is_query)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want)
    jac = torch.func.jacrev(lambda x: cf.euler_rotate(x, delta, beta, freqs, is_query=is_query))(x)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda x: rotate_ref(x.repeat_interleave(G, 1), delta, b, freqs,
                                                                           pos))(x))


def test_euler_rotate_qk_forward_ad():
    x, delta, beta, freqs = rot_case()
    k = torch.randn_like(x)
    t = torch.randn_like(x)
    pos, G = torch.arange(x.shape[2])[None], delta.shape[0] // x.shape[1]
    for i, b in ((0, beta), (1, None)):  # q~ (with beta), k~ (without)
        got = torch.func.jvp(lambda y: euler_rotate_qk(*((y, k) if i == 0 else (x, y)), delta, beta, freqs)[i],
                             (x if i == 0 else k,), (t,))[1]
        want = torch.func.jvp(lambda y: rotate_ref(y.repeat_interleave(G, 1), delta, b, freqs, pos),
                              (x if i == 0 else k,), (t,))[1]
        assert want.abs().max() > 0.1
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_cmha_attention_forward_ad(backend):
    q, k, v, delta, beta, freqs = attn_case()
    tq, tb = torch.randn_like(q), torch.randn_like(beta)

    def f(backend):
        return lambda q, b: cf.cmha_attention(q, k, v, delta, b, freqs, backend=backend)

    # the oracle: CMHA in plain PyTorch (forward AD of every backend runs the package's reference math)
    want = torch.func.jvp(lambda q, b: cmha_ref(q, k, v, delta, b, freqs)[0], (q, beta), (tq, tb))[1]
    torch.testing.assert_close(torch.func.jvp(f(backend), (q, beta), (tq, tb))[1], want)
    with fwAD.dual_level():
        out = cf.cmha_attention(fwAD.make_dual(q, tq), k, v, delta, fwAD.make_dual(beta, tb), freqs, backend=backend)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want)
    g = torch.func.grad(lambda q: f(backend)(q, beta).square().sum())(q)
    torch.testing.assert_close(g, torch.func.grad(lambda q: cmha_ref(q, k, v, delta, beta, freqs)[0].square().sum())(q))


# ------------------------------------------------------------------ 2. double backward


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_pdl_loss_gradient_penalty_matches_cross_entropy(reduction, smoothing):
    z, y, w = pdl_case(N=9, V=6)
    y[2] = -100

    def penalised(fn):
        zz = z.clone().requires_grad_()
        loss = fn(zz, y, weight=w, reduction=reduction, label_smoothing=smoothing).sum()
        (g,) = torch.autograd.grad(loss, zz, create_graph=True)
        assert g.requires_grad
        (loss + 10 * g.square().sum()).backward()
        return zz.grad

    ours = lambda z, y, weight, **kw: cf.pdl_loss(z, y, weight, **kw)  # noqa: E731
    torch.testing.assert_close(penalised(ours), penalised(F.cross_entropy))


def test_pdl_loss_gradgradcheck():
    z, y, w = pdl_case(N=4, V=3)
    y[1] = -100
    z.requires_grad_()
    for kw in ({}, {"normalizer": 3.0}, {"reduction": "none", "label_smoothing": 0.3}):
        torch.autograd.gradgradcheck(lambda z: cf.pdl_loss(z, y, w, **kw), (z,))


def test_euler_rotate_gradgradcheck():
    x, delta, beta, freqs = rot_case(B=1, L=3, d=4)
    ins = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    torch.autograd.gradgradcheck(lambda *a: cf.euler_rotate(*a), ins)
    k = torch.randn(1, 2, 3, 4, dtype=F64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda q, k, dl: euler_rotate_qk(q, k, dl, ins[2], ins[3]),
                                 (ins[0], k, ins[1]))


def test_fused_attention_double_backward_raises_naming_the_op():
    q, k, v, delta, beta, freqs = attn_case()
    q.requires_grad_()
    out = cf.cmha_attention(q, k, v, delta, beta, freqs, backend="fused")
    with pytest.raises(RuntimeError, match=r"cmha_attention\(backend='fused'\): double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


# ------------------------------------------------------------------ 3. negative weights


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", ["one", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_negative_weights_match_cross_entropy(reduction, which, dtype):
    z, y, w = pdl_case(dtype=dtype, negative=which == "one")
    if which == "all":
        w = -w
    zz, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = cf.pdl_loss(zz, y, w, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(zr, y, weight=w, reduction=reduction, label_smoothing=0.1)
    assert float(got.detach().abs().sum()) > 0
    if reduction == "mean":
        assert float(w[y].sum()) < 0
    torch.testing.assert_close(got, want.to(got.dtype))
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(zz.grad, zr.grad)


@pytest.mark.parametrize("which", ["one", "all"])
def test_negative_weights_fused_linear_matches_cross_entropy(which):
    # the mean's rule lives in the shared kernel code (csrc/pdl_math.h), also behind fused_linear
    z, y, w = pdl_case(N=6, V=5, negative=which == "one")
    w = -w.abs() if which == "all" else w
    hidden = torch.randn(6, 4, dtype=F64)
    lm = torch.randn(5, 4, dtype=F64)
    got = cf.fused_linear_pdl_loss(hidden, lm, y, w)
    torch.testing.assert_close(got, F.cross_entropy(hidden @ lm.T, y, weight=w))


def test_zero_weight_sum_still_gives_zero():
    z, y, w = pdl_case()
    assert cf.pdl_loss(z, torch.full_like(y, -100), w).item() == 0.0


# ------------------------------------------------------------------ 4. sdpa: scale <= 0, causal


@pytest.mark.parametrize("scale", [-1.0, -0.25, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sdpa_non_positive_scale_causal(scale, dtype):
    q, k, v, delta, beta, freqs = attn_case(dtype=dtype, Lq=6, Lk=6)
    ref, _ = cmha_attention_pairwise(q, k, v, delta, beta, freqs, scale=scale)
    for backend in ATTN_BACKENDS:
        out = cf.cmha_attention(q, k, v, delta, beta, freqs, scale=scale, backend=backend)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=backend)


# ------------------------------------------------------------------ 5. NaN / Inf propagate; no overflow


def _nan_rows(out):
    return torch.isnan(out).any(-1)


@pytest.mark.parametrize("where", ["q", "k", "k0", "delta", "q_inf", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("causal", [True, False])
def test_nan_and_inf_propagate_like_the_reference(where, dtype, causal):
    q, k, v, delta, beta, freqs = attn_case(dtype=dtype, H=2, Hkv=2, Lq=6, Lk=6)
    if where == "q":
        q[0, 0, 2, 1] = float("nan")
    elif where == "q_inf":
        q[0, 1, 0, 0] = float("inf")  # row 0 sees only key 0 (causal): a lone +-inf score
    elif where == "k":
        k[0, 1, 3, 2] = float("nan")
    elif where == "k0":
        k[0, 0, 0, 0] = float("nan")  # the only key row 0 sees under the causal mask
    elif where == "delta":
        delta[1, 0] = float("nan")
    else:
        v[0, 0, 4, 0] = float("nan")
    ref = cf.cmha_attention(q, k, v, delta, beta, freqs, causal=causal, backend="reference")
    assert _nan_rows(ref).any()
    for backend in ("fused", "sdpa"):
        out = cf.cmha_attention(q, k, v, delta, beta, freqs, causal=causal, backend=backend)
        assert torch.equal(_nan_rows(out), _nan_rows(ref)), backend
        ok = ~_nan_rows(ref)
        torch.testing.assert_close(out[ok], ref[ok], msg=backend)


@pytest.mark.parametrize("backend", ["fused", "sdpa", "reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_nan_key_hidden_by_the_padding_mask_is_never_seen(backend, causal):
    """A NaN key that the key padding mask hides reaches no row (torch's SDPA adds -inf to the
    NaN score of a masked key, which stays NaN; the sdpa backend must not let it through)."""
    q, k, v, delta, beta, freqs = attn_case(dtype=torch.float32, H=2, Hkv=2, Lq=6, Lk=6)
    k[0, 1, 3, 2] = float("nan")
    kpm = torch.ones(k.shape[0], 6, dtype=torch.bool)
    kpm[0, 3] = False
    out = cf.cmha_attention(q, k, v, delta, beta, freqs, causal=causal, key_padding_mask=kpm, backend=backend)
    assert not out.isnan().any()
    want = cf.cmha_attention(q, k.nan_to_num(0.0), v, delta, beta, freqs, causal=causal, key_padding_mask=kpm,
                             backend="reference")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_nan_row_gradients_like_the_reference(backend):
    # the NaN query row's gradient is NaN, and so are those of the values it sees (the keys too:
    # dk = dS^T q~ meets the NaN q~ even where dS is 0); the values it cannot see stay finite
    q, k, v, delta, beta, freqs = attn_case(H=1, Hkv=1, Lq=6, Lk=6)
    q[0, 0, 3, 0] = float("nan")
    grads = {}
    for b in (backend, "reference"):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        cf.cmha_attention(*ins, delta, beta, freqs, backend=b).sum().backward()
        grads[b] = [t.grad for t in ins]
    for got, want in zip(grads[backend], grads["reference"]):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.isnan(grads[backend][0][0, 0, 3]).all() and torch.isfinite(grads[backend][2][0, 0, 4:]).all()


def test_fully_masked_rows_stay_zero():
    q, k, v, delta, beta, freqs = attn_case(H=1, Hkv=1, Lq=4, Lk=4)
    q[0, 0, 1] = float("nan")  # a NaN query that sees nothing: 0, as every backend documents
    kpm = torch.tensor([[True, True, True, True]])
    for backend in ("fused", "sdpa", "reference"):
        out = cf.cmha_attention(q, k, v, delta, beta, freqs, q_offset=-2, key_padding_mask=kpm, backend=backend)
        assert torch.all(out[0, 0, :2] == 0), backend
        assert torch.isnan(out[0, 0, 2:]).sum() == 0, backend


def test_rotation_below_the_documented_limit_is_exact():
    # float32 pairs up to |x| ~ 1e19 (re^2 + im^2 < 3.4e38, the README's limit) rotate exactly
    x, delta, beta, freqs = rot_case()
    big = x * (1e19 / x.abs().max() / 1.5)
    want = rotate_reference(big, delta, beta, freqs, torch.arange(4)[None], dtype=F64)
    got = cf.euler_rotate(big.float(), delta.float(), beta.float(), freqs.float())
    torch.testing.assert_close(got.double() / 1e19, want / 1e19, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "sdpa", "reference"])
def test_attention_beyond_the_limit_is_nan_never_zero(backend):
    # past it re^2 + im^2 overflows float32: every backend must say so (NaN), as the reference
    # does, instead of the all-zero rows it used to return
    q, k, v, delta, beta, freqs = attn_case(dtype=torch.float32)
    q[0, 0, 1] *= 1e20 / q[0, 0, 1].abs().max()
    ref = cf.cmha_attention(q, k, v, delta, beta, freqs, backend="reference")
    out = cf.cmha_attention(q, k, v, delta, beta, freqs, backend=backend)
    assert torch.isnan(out[0, 0, 1]).all() and torch.equal(_nan_rows(out), _nan_rows(ref))


# ------------------------------------------------------------------ 6, 7. the raw extension


def test_bindings_clamp_nthreads():
    ids = torch.randint(0, 50, (10000,))
    counts = [torch.empty(50, dtype=torch.int64) for _ in range(2)]
    for c, nt in zip(counts, (1, 2**31 - 1)):
        _C.pdl_token_counts(dl(ids), dl(c), -100, nt, 0, None)
    assert torch.equal(counts[0], counts[1])
    z, y, w = pdl_case(N=33, V=7, dtype=torch.float32)
    outs = []
    for nt in (1, 10**6):
        row, grad = torch.empty(33), torch.empty(33, 7)
        _C.pdl_loss_fwd(dl(z), dl(y), dl(w), None, dl(row), dl(grad), -100, 2, 0.0, -1.0, 0, nt, 0, None)
        outs.append((row, grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    q, k, v, delta, beta, freqs = attn_case(dtype=torch.float32)
    pos = torch.arange(5)[None]
    res = []
    for nt in (1, 10**6):
        out, lse = torch.empty(1, 2, 5, 8), torch.empty(1, 2, 5)
        _C.attn_fwd(dl(q), dl(k), dl(v), dl(delta), dl(beta), dl(freqs), dl(pos), dl(pos), None, None,
                    dl(out), dl(lse), 1, 0.35, 0, 0, nt, 0)
        rot = torch.empty(1, 2, 5, 8)
        _C.rotate_fwd(dl(q), dl(delta), dl(beta), dl(freqs), dl(pos), dl(rot), 0, nt, 0)
        res.append((out, lse, rot))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def _read_only_capsule(n, dtype):
    arr = np.frombuffer(bytes(n * np.dtype(dtype).itemsize), dtype=dtype)
    assert not arr.flags.writeable
    return arr, arr.__dlpack__(max_version=(1, 0))


def test_bindings_refuse_read_only_outputs():
    arr, cap = _read_only_capsule(10, np.int64)
    with pytest.raises(ValueError, match="counts: is read-only"):
        _C.pdl_token_counts(dl(torch.tensor([1, 2, 3])), cap, -100, 1, 0, None)
    assert not arr.any()  # the immutable bytes were not written
    q, k, v, delta, beta, freqs = attn_case(dtype=torch.float32)
    arr, cap = _read_only_capsule(80, np.float32)
    with pytest.raises(ValueError, match="out: is read-only"):
        _C.rotate_fwd(dl(q[:, :1, :5, :8].contiguous().view(1, 1, 5, 8)), dl(delta[:1]), dl(beta[:1]), dl(freqs),
                      dl(torch.arange(5)[None]), cap, 0, 1, 0)
    assert not arr.any()
    # a writable NumPy output is still fine (DLPack 1.x capsule without the flag)
    out = np.zeros(10, dtype=np.int64)
    _C.pdl_token_counts(dl(torch.tensor([1, 2, 2])), out.__dlpack__(max_version=(1, 0)), -100, 1, 0, None)
    assert out.tolist() == [0, 1, 2] + [0] * 7


# ------------------------------------------------------------------ clear errors


@pytest.mark.parametrize("kw, match", [
    ({"ignore_index": 2**63}, "ignore_index: 9223372036854775808 is out of range"),
    ({"ignore_index": -(2**63) - 1}, "ignore_index: .* is out of range"),
    ({"ignore_index": 1.0}, "ignore_index: expected an int"),
    ({"normalizer": 1e300}, "normalizer: must be positive and finite in float32"),
    ({"normalizer": 1e-320}, "normalizer: must be positive and finite in float32"),
    ({"normalizer": torch.tensor(float("inf"))}, "normalizer: must be positive and finite"),
    ({"normalizer": torch.tensor(1e-320, dtype=F64)}, "normalizer: must be positive and finite in float32"),
    ({"normalizer": torch.tensor(-2.0)}, "normalizer: must be positive"),
    ({"normalizer": float("nan")}, "normalizer: must be positive"),
    ({"normalizer": "3"}, "normalizer: expected a positive number"),
    ({"label_smoothing": np.float64(1.5)}, "label_smoothing"),
])
def test_pdl_loss_clear_errors(kw, match):
    z, y, w = pdl_case(dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        cf.pdl_loss(z, y, w, **kw)


def test_normalizer_float64_range_and_numpy_scalars():
    z, y, w = pdl_case()
    S = float(w[y].sum())
    want = cf.pdl_loss(z, y, w)
    for n in (S, np.float64(S), np.float32(S), torch.tensor(S), torch.tensor(S, dtype=F64)):
        torch.testing.assert_close(cf.pdl_loss(z, y, w, normalizer=n), want, rtol=1e-6, atol=0)
    assert cf.pdl_loss(z, y, w, normalizer=1e300).item() > 0  # representable in float64
    with pytest.raises(ValueError, match="in float64"):
        cf.pdl_loss(z, y, w, normalizer=1e-330)


def test_numpy_integers_are_ints():
    z, y, w = pdl_case()
    y[0] = -100
    want = cf.pdl_loss(z, y, w)
    for ii in (np.int64(-100), np.int32(-100), torch.tensor(-100).item()):
        torch.testing.assert_close(cf.pdl_loss(z, y, w, ignore_index=ii), want)
        assert torch.equal(cf.token_counts(y, np.int64(5), ignore_index=ii), cf.token_counts(y, 5))
    torch.testing.assert_close(cf.PDLLoss(w, ignore_index=np.int64(-100))(z, y), want)
    m = cf.CMHA(np.int64(16), np.int32(2), num_kv_heads=np.int64(1))
    assert (m.embed_dim, m.num_heads, m.num_kv_heads) == (16, 2, 1) and type(m.embed_dim) is int
    q, k, v, delta, beta, freqs = attn_case(Lq=2)
    torch.testing.assert_close(cf.cmha_attention(q, k, v, delta, beta, freqs, q_offset=np.int64(1), scale=np.float32(0.5)),
                               cf.cmha_attention(q, k, v, delta, beta, freqs, q_offset=1, scale=0.5))


@pytest.mark.parametrize("vocab_size, exc", [(2**70, ValueError), (0, ValueError), (True, TypeError), (5.0, TypeError)])
def test_token_counts_vocab_size_errors(vocab_size, exc):
    with pytest.raises(exc, match="vocab_size"):
        cf.token_counts(torch.tensor([1, 2]), vocab_size)
    with pytest.raises(ValueError, match="ignore_index"):
        cf.token_counts(torch.tensor([1, 2]), 5, ignore_index=2**64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pdl_weights_rejects_non_finite_counts(bad):
    with pytest.raises(ValueError, match="counts: must be finite"):
        cf.pdl_weights(torch.tensor([1.0, bad, 3.0]))


def test_strided_cu_seqlens_are_made_contiguous():
    q, k, v, delta, beta, freqs = attn_case(Lq=7, Lk=7)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    strided = torch.tensor([0, -1, 3, -1, 7, -1], dtype=torch.int32)[::2]
    assert not strided.is_contiguous()
    for backend in ATTN_BACKENDS:
        torch.testing.assert_close(cf.cmha_attention(q, k, v, delta, beta, freqs, cu_seqlens=strided, backend=backend),
                                   cf.cmha_attention(q, k, v, delta, beta, freqs, cu_seqlens=cu, backend=backend))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_empty_value_dim(backend):
    q, k, v, delta, beta, freqs = attn_case()
    q.requires_grad_()
    out = cf.cmha_attention(q, k, v[..., :0], delta, beta, freqs, backend=backend)
    assert out.shape == (1, 2, 5, 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_layout_must_be_a_name():
    x, delta, beta, freqs = rot_case()
    q, k, v, dl_, bt, fr = attn_case()
    for bad in (True, 1, 0, None):
        with pytest.raises(ValueError, match="layout"):
            cf.euler_rotate(x, delta, beta, freqs, layout=bad)
        with pytest.raises(ValueError, match="layout"):
            euler_rotate_qk(x, x, delta, beta, freqs, layout=bad)
        with pytest.raises(ValueError, match="layout"):
            cf.cmha_attention(q, k, v, dl_, bt, fr, layout=bad)


def test_cmha_module_key_padding_mask_values():
    m = cf.CMHA(16, 2).double()
    x = torch.randn(2, 3, 16, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    want = m(x, key_padding_mask=mask.bool())
    torch.testing.assert_close(m(x, key_padding_mask=mask), want)  # Hugging Face 0/1 masks
    torch.testing.assert_close(m(x, key_padding_mask=mask.to(torch.uint8)), want)
    for bad in (2, -1):
        with pytest.raises(ValueError, match=f"key_padding_mask: .*found {bad}"):
            m(x, key_padding_mask=torch.tensor([[1, bad, 1], [1, 1, 1]]))


# ------------------------------------------------------------------ issue 17: the op boundary

_LIMIT = 2**31  # positions: the int32 range [-2^31, 2^31 - 1] (docs/design.md, "Masks and positions")


def _shifted_attention(P, dtype, backend):
    q, k, v, delta, beta, freqs = attn_case(H=2, Hkv=1, Lq=5, Lk=7, d=8, dtype=dtype)
    qp, kp = torch.arange(2, 7)[None], torch.arange(7)[None]
    out = cf.cmha_attention(q, k, v, delta, beta, freqs, positions=(qp + P, kp + P), backend=backend)
    # float64, pair by pair, with the exact relative positions (P cancels in p_m - p_n)
    ref, _ = cmha_attention_pairwise(q.double(), k.double(), v.double(), delta.double(), beta.double(),
                                     freqs.double(), q_pos=qp, k_pos=kp)
    return out.double(), ref


# Shifting every position by P must not change the output (an absolute P cancels in p_m - p_n).
# float64: omega * p is rounded in float64 before its reduction mod 2 pi, an absolute phase error
# up to |omega p| 2^-53 = 2.4e-7 rad at the limit: measured output errors 4e-8 there (4e-16 at
# P = 0, 1e-8 at 1e9). float32 is limited by its own rounding, at every P: measured <= 5.2e-7.
# (Within the limit the old code held too; beyond it, the next test.)
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-7), (torch.float32, 1e-6)])
@pytest.mark.parametrize("backend", ["fused", "sdpa", "reference"])
@pytest.mark.parametrize("P", [0, 10**6, 10**9, _LIMIT - 7, -_LIMIT])
def test_positions_shift_invariant_up_to_the_limit(P, backend, dtype, tol):
    out, ref = _shifted_attention(P, dtype, backend)
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("P", [_LIMIT, -_LIMIT - 1, 10**12, 10**18])
def test_positions_beyond_the_limit_raise_naming_them(P):
    q, k, v, delta, beta, freqs = attn_case(Lq=3, Lk=3)
    pos = torch.arange(3)[None] + P
    ok = torch.arange(3)[None]
    x, d_, b_, f_ = rot_case(L=3)
    with pytest.raises(ValueError, match=r"positions: position .* out of range"):
        cf.euler_rotate(x, d_, b_, f_, positions=pos)
    with pytest.raises(ValueError, match=r"q_positions: position .* out of range"):
        euler_rotate_qk(x, x, d_, b_, f_, q_positions=pos)
    for backend in ATTN_BACKENDS:
        with pytest.raises(ValueError, match=r"positions\[1\] \(key positions\): position .* out of range"):
            cf.cmha_attention(q, k, v, delta, beta, freqs, positions=(ok, pos), backend=backend)
    m = cf.CMHA(8, 2).double()
    with pytest.raises(ValueError, match="position_ids: position .* out of range"):
        m(torch.randn(1, 3, 8, dtype=F64), position_ids=pos)
    with pytest.raises(ValueError, match="q_offset: .* out of range"):
        cf.cmha_attention(q, k, v, delta, beta, freqs, q_offset=_LIMIT - 2)  # q_offset + arange(3) passes 2^31 - 1
    # below the checks (CUDA positions are not read on the host): the kernels and the reference NaN them
    bad = ((pos < -_LIMIT) | (pos >= _LIMIT))[0]
    for rot in (_rotate_forward(x, d_, b_, f_, pos, layout=0), rotate_reference(x, d_, b_, f_, pos)):
        assert torch.isnan(rot[:, :, bad]).all() and not torch.isnan(rot[:, :, ~bad]).any()


def test_cache_positions_errors_name_the_cache():
    m = cf.CMHA(8, 2).double()
    x = torch.randn(1, 2, 8, dtype=F64)
    _, cache = m(x, position_ids=torch.tensor([[5, 6]]), use_cache=True)
    for bad, match in ((cache.positions.double(), "past_key_value.positions: dtype float64"),
                       (cache.positions + 10**12, "past_key_value.positions: position .* out of range"),
                       (cache.positions + (_LIMIT - 8), r"past_key_value.positions \(continued by the new tokens\)")):
        with pytest.raises((ValueError, TypeError), match=match):
            m(x, past_key_value=cf.CMHACache(cache.key, cache.value, bad))


def test_negative_bit_tensors_are_read_with_their_sign():
    z, y, w = pdl_case()
    neg = torch._neg_view(-z)  # reads as z, with the negative bit set
    assert neg.is_neg()
    torch.testing.assert_close(cf.pdl_loss(neg, y, w, label_smoothing=0.1),
                               F.cross_entropy(z, y, weight=w, label_smoothing=0.1))
    torch.testing.assert_close(cf.pdl_loss(z, y, torch._neg_view(-w)), F.cross_entropy(z, y, weight=w))
    x, delta, beta, freqs = rot_case()
    want = cf.euler_rotate(x, delta, beta, freqs)
    torch.testing.assert_close(cf.euler_rotate(torch._neg_view(-x), torch._neg_view(-delta), beta, freqs), want)
    q, k, v, delta, beta, freqs = attn_case()
    for backend in ("fused", "sdpa"):
        want = cf.cmha_attention(q, k, v, delta, beta, freqs, backend=backend)
        got = cf.cmha_attention(torch._neg_view(-q), k, torch._neg_view(-v), delta, beta, freqs, backend=backend)
        torch.testing.assert_close(got, want)
    h = torch.randn(6, 4, dtype=F64)
    W = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(cf.fused_linear_pdl_loss(torch._neg_view(-h), W, y[:6], w),
                               F.cross_entropy(h @ W.T, y[:6], weight=w))


def test_weights_and_normalizer_that_require_grad_raise_like_cross_entropy():
    z, y, w = pdl_case()
    wg = w.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.cross_entropy(z, y, weight=wg)
    with pytest.raises(RuntimeError, match="pdl_loss: not differentiable with respect to argument 'weights'"):
        cf.pdl_loss(z.requires_grad_(), y, wg)
    with pytest.raises(RuntimeError, match="argument 'normalizer'"):
        cf.pdl_loss(z, y, w, normalizer=torch.tensor(3.0, requires_grad=True))
    with pytest.raises(RuntimeError, match="argument 'weights'"):
        cf.fused_linear_pdl_loss(torch.randn(7, 4, dtype=F64), torch.randn(5, 4, dtype=F64), y, wg)
    with torch.no_grad():  # nothing is differentiated: fine, as for F.cross_entropy
        torch.testing.assert_close(cf.pdl_loss(z, y, wg), F.cross_entropy(z, y, weight=w))


def test_pdl_weights_refuse_float32_overflow():
    counts = torch.tensor([0, 1, 5])
    for kw in ({"alpha": 6.0}, {"alpha": 1.0, "eps": 1e-40}):
        with pytest.raises(ValueError, match="alpha, eps: .* overflows float32.* max_weight"):
            cf.pdl_weights(counts, **kw)
        w = cf.pdl_weights(counts, **kw, max_weight=1e30)
        assert torch.isfinite(w).all() and w[0] == 1e30
    with pytest.raises(ValueError, match="max_weight=1e\\+300 is beyond it too"):
        cf.pdl_weights(counts, alpha=6.0, max_weight=1e300)
    assert cf.pdl_weights(counts, alpha=5.0).max() == pytest.approx(1e35, rel=1e-6)  # in range: unchanged


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_infinite_weight_with_label_smoothing_is_inf_like_torch(dtype):
    z, y, w = pdl_case(dtype=dtype)
    y[y == 3] = 0  # the infinite-weight class is never a target
    w[3] = float("inf")
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(z, y, weight=w, label_smoothing=0.1, reduction=reduction)
        got = cf.pdl_loss(z, y, w, label_smoothing=0.1, reduction=reduction)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and not torch.isnan(got).any()
        torch.testing.assert_close(got.to(want.dtype), want)


@pytest.mark.parametrize("bad", ["no", None, 1, 0, np.int64(1), torch.tensor(True)])
def test_causal_and_other_flags_take_a_bool_only(bad):
    q, k, v, delta, beta, freqs = attn_case()
    with pytest.raises(TypeError, match="causal: expected a bool"):
        cf.cmha_attention(q, k, v, delta, beta, freqs, causal=bad)
    with pytest.raises(TypeError, match="causal: expected a bool"):
        cf.CMHA(8, 2, causal=bad)
    x, d_, b_, f_ = rot_case()
    with pytest.raises(TypeError, match="is_query: expected a bool"):
        cf.euler_rotate(x, d_, b_, f_, is_query=bad)
    with pytest.raises(TypeError, match="return_lse: expected a bool"):
        cf.cmha_attention(q, k, v, delta, beta, freqs, return_lse=bad)
    assert torch.equal(cf.cmha_attention(q, k, v, delta, beta, freqs, causal=np.bool_(False)),
                       cf.cmha_attention(q, k, v, delta, beta, freqs, causal=False))


def test_numpy_scalars_everywhere():
    m = cf.CMHA(8, 2, scale=np.float32(0.5), rope_base=np.float64(500.0))
    assert m.scale == 0.5 and type(m.scale) is float
    ref = cf.CMHA(8, 2, scale=0.5, rope_base=500.0)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(m(x), ref(x))
    h, W = torch.randn(7, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    _, y, w = pdl_case()
    torch.testing.assert_close(cf.fused_linear_pdl_loss(h, W, y, w, chunk_size=np.int64(3)),
                               cf.fused_linear_pdl_loss(h, W, y, w, chunk_size=3))
    torch.testing.assert_close(cf.fused_linear_pdl_loss(h, W, y, w, memory_budget=np.int32(4096)),
                               cf.fused_linear_pdl_loss(h, W, y, w))


@pytest.mark.parametrize("causal", [False, True])
def test_nan_value_leaves_masked_keys_gradients_finite_like_torch(causal):
    # key 1's value is NaN, so are the outputs (0 * NaN even where key 1 is masked) and D =
    # rowsum(dO * out); keys 4 and 5 are padding: torch's masked softmax gives them an exact 0
    # gradient, where P (dP - D) = 0 * NaN made them NaN in the CPU kernel's tile
    q, k, v, delta, beta, freqs = attn_case(H=1, Hkv=1, Lq=6, Lk=6)
    v[0, 0, 1, 2] = float("nan")
    kpm = torch.tensor([[True, True, True, True, False, False]])
    grads = {}
    for b in ("fused", "reference"):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        cf.cmha_attention(*ins, delta, beta, freqs, causal=causal, key_padding_mask=kpm, backend=b).sum().backward()
        grads[b] = [t.grad for t in ins]
    for got, want in zip(grads["fused"][1:], grads["reference"][1:]):  # dk, dv
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.all(grads["fused"][1][0, 0, 4:] == 0)


def test_pdl_model_rechecks_weights_loaded_later():
    from complexformer.models import ComplexFormerConfig, ComplexFormerForCausalLM

    cfg = ComplexFormerConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, loss="pdl")
    m = ComplexFormerForCausalLM(cfg)
    m.set_pdl_weights(torch.rand(11) + 0.5)
    ids = torch.randint(0, 11, (2, 5))
    assert torch.isfinite(m(input_ids=ids, labels=ids).loss)
    sd = m.state_dict()
    sd["pdl_weights"] = torch.full((11,), float("nan"))
    m.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="not set or invalid"):
        m(input_ids=ids, labels=ids)
    with torch.no_grad():
        m.pdl_weights[3] = -1.0  # any in-place write is seen too
    with pytest.raises(RuntimeError, match="not set or invalid"):
        m(input_ids=ids, labels=ids)


# ------------------------------------------------------------------ hypothesis fuzz

_REF_OK = dict(atol=1e-9, rtol=1e-9)


@given(N=st.integers(0, 12), V=st.integers(1, 9), reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.1, 1.0]), neg=st.booleans(), ignore_p=st.floats(0, 1),
       three_d=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_pdl_loss_against_cross_entropy(N, V, reduction, smoothing, neg, ignore_p, three_d, seed):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(N, V, generator=g, dtype=F64)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_p] = -100
    w = torch.rand(V, generator=g, dtype=F64) + 0.05
    if neg:
        w = torch.where(torch.rand(V, generator=g) < 0.5, -w, w)
    zz = z.clone().requires_grad_()
    shape = (1, N) if three_d else (N,)
    got = cf.pdl_loss(zz.view(*shape, V), y.view(shape), w, reduction=reduction, label_smoothing=smoothing)
    zr = z.clone().requires_grad_()
    valid = y != -100
    if reduction == "mean" and float(w[y[valid]].sum()) == 0:  # no counted target: 0, not NaN
        want = (zr * 0).sum()
    else:
        want = F.cross_entropy(zr, y, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got.reshape(want.shape), want, **_REF_OK)
    if N:
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(zz.grad, zr.grad, **_REF_OK)


@given(B=st.integers(1, 2), G=st.sampled_from([1, 2]), Hx=st.integers(1, 2), L=st.integers(0, 5),
       h=st.integers(1, 4), layout=st.sampled_from(["half", "interleaved"]), per_head=st.booleans(),
       is_query=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_euler_rotate_against_reference(B, G, Hx, L, h, layout, per_head, is_query, seed):
    g = torch.Generator().manual_seed(seed)
    H, d = G * Hx, 2 * h
    x = torch.randn(B, Hx, L, d, generator=g, dtype=F64)
    delta = torch.randn(H, h, generator=g, dtype=F64)
    beta = torch.randn(H, h, generator=g, dtype=F64)
    freqs = torch.rand((H, h) if per_head else (h,), generator=g, dtype=F64)
    pos = torch.randint(-1000, 10**6, (B, L), generator=g)
    got = cf.euler_rotate(x, delta, beta, freqs, positions=pos, is_query=is_query, layout=layout)
    want = rotate_reference(x, delta, beta if is_query else None, freqs, pos, layout=layout)
    torch.testing.assert_close(got, want, **_REF_OK)


@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2]), Lq=st.integers(1, 6),
       Lk=st.integers(1, 7), h=st.integers(1, 4), causal=st.booleans(), q_offset=st.integers(-3, 3),
       use_kpm=st.booleans(), scale=st.sampled_from([None, -0.5, 0.0, 1.0]),
       backend=st.sampled_from(ATTN_BACKENDS), layout=st.sampled_from(["half", "interleaved"]),
       seed=st.integers(0, 2**16))
def test_fuzz_cmha_attention_against_pairwise(B, Hkv, G, Lq, Lk, h, causal, q_offset, use_kpm, scale, backend,
                                              layout, seed):
    g = torch.Generator().manual_seed(seed)
    H, d = Hkv * G, 2 * h
    q = torch.randn(B, H, Lq, d, generator=g, dtype=F64)
    k = torch.randn(B, Hkv, Lk, d, generator=g, dtype=F64)
    v = torch.randn(B, Hkv, Lk, d, generator=g, dtype=F64)
    delta = torch.randn(H, h, generator=g, dtype=F64)
    beta = torch.randn(H, h, generator=g, dtype=F64)
    freqs = torch.rand(h, generator=g, dtype=F64)
    kpm = torch.rand(B, Lk, generator=g) > 0.3 if use_kpm else None
    out = cf.cmha_attention(q, k, v, delta, beta, freqs, causal=causal, scale=scale, q_offset=q_offset,
                            key_padding_mask=kpm, layout=layout, backend=backend)
    ref, _ = cmha_attention_pairwise(q, k, v, delta, beta, freqs, causal=causal, scale=scale, q_offset=q_offset,
                                     key_padding_mask=kpm, layout=layout)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                  st.text(max_size=3), st.just(torch.tensor([1.0, float("nan")])), st.just(torch.zeros(2, 3, 4)),
                  st.just(torch.zeros(3, dtype=torch.int32)), st.just(np.int64(-100)), st.just(np.float32(0.5)),
                  st.just(torch.tensor(float("inf"))), st.just(torch.zeros(0)))

_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError, IndexError)


def _checked(fn, kwargs):
    """A call with junk in it raises a clear exception, or returns a result with no NaN."""
    try:
        out = fn(**kwargs)
    except _ERRORS as e:
        assert str(e), "an exception without a message"
        return
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert not torch.isnan(o.float()).any(), (fn.__name__, kwargs)


@given(arg=st.sampled_from(["logits", "targets", "weights", "ignore_index", "reduction", "label_smoothing",
                            "normalizer"]), junk=_JUNK)
def test_fuzz_pdl_loss_junk_arguments(arg, junk):
    z, y, w = pdl_case(dtype=torch.float32)
    kw = {"logits": z, "targets": y, "weights": w, arg: junk}
    _checked(cf.pdl_loss, kw)


@given(arg=st.sampled_from(["ids", "vocab_size", "ignore_index"]), junk=_JUNK)
def test_fuzz_token_counts_junk_arguments(arg, junk):
    kw = {"ids": torch.tensor([0, 1, 2]), "vocab_size": 4, "ignore_index": -100, arg: junk}
    _checked(cf.token_counts, kw)


@given(arg=st.sampled_from(["counts", "alpha", "eps", "max_weight"]), junk=_JUNK)
def test_fuzz_pdl_weights_junk_arguments(arg, junk):
    kw = {"counts": torch.tensor([0, 1, 2]), "alpha": 1.0, "eps": 1e-7, "max_weight": None, arg: junk}
    _checked(cf.pdl_weights, kw)


@given(arg=st.sampled_from(["x", "delta", "beta", "freqs", "positions", "is_query", "layout"]), junk=_JUNK)
def test_fuzz_euler_rotate_junk_arguments(arg, junk):
    x, delta, beta, freqs = rot_case()
    kw = {"x": x, "delta": delta, "beta": beta, "freqs": freqs, arg: junk}
    _checked(cf.euler_rotate, kw)


@given(arg=st.sampled_from(["q", "k", "v", "delta", "beta", "freqs", "causal", "scale", "q_offset",
                            "key_padding_mask", "cu_seqlens", "layout", "backend", "positions"]), junk=_JUNK)
def test_fuzz_cmha_attention_junk_arguments(arg, junk):
    q, k, v, delta, beta, freqs = attn_case()
    kw = {"q": q, "k": k, "v": v, "delta": delta, "beta": beta, "freqs": freqs, arg: junk}
    _checked(cf.cmha_attention, kw)


# ------------------------------------------------------------------ memory


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_memory_growth_over_many_calls():
    """Normal and error paths of every op, 2000 rounds after a warm-up: resident memory may not
    grow by more than 32 MiB (a leak of one small tensor or capsule per call would be ~100 MiB)."""
    z, y, w = pdl_case(N=16, V=32, dtype=torch.float32)
    zg = z.clone().requires_grad_()
    x, delta, beta, freqs = (t.float() for t in rot_case())
    q, k, v, dl_, bt, fr = attn_case(dtype=torch.float32)
    ro = np.frombuffer(bytes(32 * 8), dtype=np.int64)

    def round_():
        cf.pdl_loss(zg, y, w).backward()
        cf.pdl_loss(z, y, w, reduction="none")
        cf.token_counts(y, 32)
        cf.euler_rotate(x, delta, beta, freqs)
        cf.cmha_attention(q, k, v, dl_, bt, fr, backend="fused")
        cf.cmha_attention(q, k, v, dl_, bt, fr, backend="sdpa")
        for fn in (lambda: cf.pdl_loss(z, y + 100, w),  # out-of-range target, raised inside the kernel
                   lambda: cf.pdl_loss(z, y, w, normalizer=-1.0),
                   lambda: cf.token_counts(y + 100, 32),
                   lambda: _C.pdl_token_counts(dl(y), ro.__dlpack__(max_version=(1, 0)), -100, 1, 0, None),
                   lambda: cf.cmha_attention(q, k, v[..., :3, :], dl_, bt, fr)):
            with pytest.raises(_ERRORS):
                fn()

    for _ in range(200):
        round_()
    before = _rss_bytes()
    for _ in range(2000):
        round_()
    grown = _rss_bytes() - before
    assert grown < 32 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 2000 rounds"


def test_operator_index_semantics_documented():
    # what "an int" means for every integer argument: operator.index, never truncation
    assert operator.index(np.int64(3)) == 3
    with pytest.raises(TypeError, match="ignore_index"):
        cf.pdl_loss(*pdl_case(), ignore_index=np.float64(-100.0))
