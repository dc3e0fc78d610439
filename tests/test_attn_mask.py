"""cmha_attention(attn_mask=...): a dense boolean or additive mask, broadcastable to (B, H, Lq, Lk),
combined with causal / key_padding_mask / cu_seqlens, on every backend that serves it, against a
float64 masked softmax written here from the pair-by-pair polar scores."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import complexformer as cf
from complexformer.reference import cmha_scores_pairwise
from oracles import attn_inputs
from test_attn_api import _kpm

BACKENDS = ["reference", "sdpa", "auto"]
NEG_INF = float("-inf")


def oracle(q, k, v, delta, beta, freqs, *, attn_mask, causal=True, q_offset=None, key_padding_mask=None,
           cu_seqlens=None):
    """float64 (out, lse): softmax over the visible keys of scores + bias; a row that sees no key
    gives 0 and -inf."""
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    q_offset = Lk - Lq if q_offset is None else q_offset
    if cu_seqlens is not None:  # each packed sequence is a causal square block, positions restart
        seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        start = cu_seqlens[:-1].long()[seq]
        q_pos = k_pos = (torch.arange(Lq) - start)[None]
        vis = (seq[:, None] == seq[None, :]).expand(B, H, Lq, Lk)
        q_offset = 0
    else:
        q_pos, k_pos = (q_offset + torch.arange(Lq))[None], torch.arange(Lk)[None]
        vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    s = cmha_scores_pairwise(q, k, delta, beta, freqs, q_pos, k_pos, scale=1 / math.sqrt(d))
    if causal:
        vis = vis & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + q_offset)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    if attn_mask.dtype == torch.bool:
        vis = vis & attn_mask
    else:
        s = s + attn_mask.double()
        vis = vis & (attn_mask != NEG_INF)
    s = s.masked_fill(~vis, NEG_INF)
    row_ok = vis.any(-1)
    m = torch.where(row_ok, s.amax(-1), 0.0)[..., None]
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / den
    vv = v.double().repeat_interleave(H // k.shape[1], dim=1)
    out = torch.where(row_ok[..., None], p @ vv, 0.0)
    lse = torch.where(row_ok, (m + torch.log(den))[..., 0], NEG_INF)
    return out, lse


def random_mask(shape, kind, gen, hide=0.3):
    keep = torch.rand(shape, generator=gen) > hide
    if kind == "bool":
        return keep
    bias = torch.randn(shape, generator=gen, dtype=torch.float64)
    return bias.masked_fill(~keep, NEG_INF)


SHAPES = [(2, 4, 5, 7), (2, 1, 5, 7), (1, 4, 1, 7), (5, 7), (7,), (1, 1, 1, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("extra", [dict(), dict(causal=False), dict(key_padding_mask="kpm"), dict(q_offset=-1)])
def test_matches_float64_masked_softmax(backend, kind, shape, extra):
    ts = attn_inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7)
    kw = dict(extra)
    if kw.get("key_padding_mask") == "kpm":
        kw["key_padding_mask"] = _kpm(2, 7)
    mask = random_mask(shape, kind, torch.Generator().manual_seed(len(shape) + 10 * len(kw)))
    out, lse = cf.cmha_attention(*ts, attn_mask=mask, backend=backend, return_lse=True, **kw)
    want_out, want_lse = oracle(*ts, attn_mask=mask, **kw)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_float32_and_cu_seqlens(backend, kind):
    cu = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    ts = attn_inputs(B=1, H=4, Hkv=2, Lq=10, Lk=10)
    mask = random_mask((1, 4, 10, 10), kind, torch.Generator().manual_seed(2))
    want_out, want_lse = oracle(*ts, attn_mask=mask, cu_seqlens=cu)
    ts32 = [t.float() for t in ts]
    out, lse = cf.cmha_attention(*ts32, attn_mask=mask if kind == "bool" else mask.float(), cu_seqlens=cu,
                                 backend=backend, return_lse=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_empty_rows_give_zero_output_neg_inf_lse_and_zero_grads(backend, kind):
    ts = attn_inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7, grad=True)
    mask = random_mask((2, 4, 5, 7), kind, torch.Generator().manual_seed(3), hide=0.2)
    mask[0, 1, 2] = False if kind == "bool" else NEG_INF  # one query of one head sees nothing
    mask[1, :, 4] = False if kind == "bool" else NEG_INF  # one query of every head sees nothing
    out, lse = cf.cmha_attention(*ts, attn_mask=mask, backend=backend, return_lse=True, causal=False)
    assert torch.isfinite(out).all()
    for b, h, m in [(0, 1, 2)] + [(1, h, 4) for h in range(4)]:
        assert (out[b, h, m] == 0).all() and lse[b, h, m] == NEG_INF
    fin = torch.isfinite(lse)
    dq, = torch.autograd.grad((out.sum() + lse[fin].sum()), ts[0])
    assert torch.isfinite(dq).all()
    assert (dq[0, 1, 2] == 0).all() and (dq[1, :, 4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_follow_the_reference_math(backend):
    ts = attn_inputs(B=1, H=2, Hkv=2, Lq=4, Lk=4)
    q, k = ts[0].clone(), ts[1].clone()
    k[0, 0, 3] = float("nan")  # a NaN key: hidden from query 1 by the mask, visible to query 3 (causal)
    q[0, 1, 0] = float("nan")  # a NaN query: its row is NaN
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    mask[0, 0, 1, 3] = NEG_INF
    mask[0, 1, 2, 1] = float("nan")  # a NaN bias on a visible key: that row is NaN
    mask[0, 1, 1, 3] = float("nan")  # a NaN bias on a key the causal mask hides: no effect
    out = cf.cmha_attention(q, k, *ts[2:], attn_mask=mask, backend=backend, causal=False)
    nan_rows = torch.isnan(out).any(-1)[0]
    want = torch.isnan(oracle(q, k, *ts[2:], attn_mask=mask, causal=False)[0]).any(-1)[0]
    assert torch.equal(nan_rows, want)
    assert want[0, 3] and not want[0, 1] and want[1, 0] and want[1, 2] and want[1, 1]  # the case is what it says
    out_c = cf.cmha_attention(q, k, *ts[2:], attn_mask=mask, backend=backend, causal=True)
    want_c = torch.isnan(oracle(q, k, *ts[2:], attn_mask=mask, causal=True)[0]).any(-1)[0]
    assert torch.equal(torch.isnan(out_c).any(-1)[0], want_c) and not want_c[1, 1]
    keep = ~mask.isinf()  # the same as a boolean mask: a hidden NaN key leaves the rows that do not see it finite
    out_b = cf.cmha_attention(q, k, *ts[2:], attn_mask=keep, backend=backend, causal=False)
    want_b = torch.isnan(oracle(q, k, *ts[2:], attn_mask=keep, causal=False)[0]).any(-1)[0]
    assert torch.equal(torch.isnan(out_b).any(-1)[0], want_b) and not want_b[0, 1]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gradcheck(backend, kind):
    ts = attn_inputs(B=1, H=2, Hkv=1, Lq=3, Lk=4, d=4, grad=True)
    mask = random_mask((1, 2, 3, 4), kind, torch.Generator().manual_seed(5))
    mask[0, 0, 1] = False if kind == "bool" else NEG_INF  # an empty row
    leaves = list(ts[:5])
    if kind == "float":
        mask.requires_grad_()
        leaves.append(mask)

    def f(*a):
        m = a[5] if kind == "float" else mask
        out, lse = cf.cmha_attention(*a[:5], ts[5], attn_mask=m, backend=backend, return_lse=True, causal=False)
        return out, lse.masked_fill(~torch.isfinite(lse), 0.0)

    assert torch.autograd.gradcheck(f, leaves)


_dims = st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 5), st.integers(1, 6))


@settings(max_examples=40, deadline=None)
@given(dims=_dims, seed=st.integers(0, 2**16), kind=st.sampled_from(["bool", "float"]),
       keep=st.lists(st.booleans(), min_size=4, max_size=4), ndim=st.integers(0, 4),
       causal=st.booleans(), backend=st.sampled_from(BACKENDS))
def test_broadcast_shapes(dims, seed, kind, keep, ndim, causal, backend):
    B, H, Lq, Lk = dims
    Hkv = 1 if H % 2 else 2
    ts = attn_inputs(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, d=4, gen=torch.Generator().manual_seed(seed))
    shape = tuple(n if k else 1 for n, k in zip(dims, keep))[4 - ndim:]
    mask = random_mask(shape, kind, torch.Generator().manual_seed(seed + 1))
    out, lse = cf.cmha_attention(*ts, attn_mask=mask, backend=backend, return_lse=True, causal=causal)
    want_out, want_lse = oracle(*ts, attn_mask=mask, causal=causal)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_forward_ad_runs_the_reference_math():
    ts = attn_inputs(B=1, H=2, Hkv=1, Lq=3, Lk=5)
    mask = random_mask((3, 5), "float", torch.Generator().manual_seed(6))
    tq = torch.randn_like(ts[0])
    f = lambda backend: lambda q: cf.cmha_attention(q, *ts[1:], attn_mask=mask, backend=backend)  # noqa: E731
    got = torch.func.jvp(f("sdpa"), (ts[0],), (tq,))[1]
    want = torch.autograd.functional.jvp(f("reference"), (ts[0],), (tq,))[1]
    torch.testing.assert_close(got, want)


def test_fused_raises_and_auto_takes_a_backend_that_serves_the_mask():
    ts = [t.float() for t in attn_inputs(Lq=5, Lk=7)]
    mask = random_mask((5, 7), "bool", torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match="attn_mask"):
        cf.cmha_attention(*ts, attn_mask=mask, backend="fused")
    torch.testing.assert_close(cf.cmha_attention(*ts, attn_mask=mask),
                               cf.cmha_attention(*ts, attn_mask=mask, backend="reference"), rtol=1e-5, atol=1e-5)


def test_bad_masks_raise_naming_attn_mask():
    ts = attn_inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7)
    for bad, err in [(torch.ones(5, 7, dtype=torch.int64), TypeError), (torch.ones(5, 6, dtype=torch.bool), ValueError),
                     (torch.ones(3, 4, 5, 7, dtype=torch.bool), ValueError),
                     (torch.ones(1, 2, 4, 5, 7, dtype=torch.bool), ValueError),
                     ([[True] * 7] * 5, TypeError)]:
        with pytest.raises(err, match="attn_mask"):
            cf.cmha_attention(*ts, attn_mask=bad, backend="reference")
