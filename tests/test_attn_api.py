"""cmha_attention: every backend against the pair-by-pair float64 reference (reference.py), which
evaluates the polar score directly and never goes through the factorised rotation."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from complexformer import cmha_attention
from complexformer import attention as A
from complexformer.reference import cmha_attention_pairwise
from oracles import assert_fa_rule, attn_inputs

ALL = ["reference", "sdpa", "fused"]


def pairwise(q, k, v, delta, beta, freqs, **kw):
    pos = kw.pop("positions", None)
    if pos is not None:
        kw["q_pos"], kw["k_pos"] = (p if p.dim() == 2 else p[None] for p in pos)
    return cmha_attention_pairwise(q, k, v, delta, beta, freqs, **kw)[0]


# name -> (shape kwargs, call kwargs); call kwargs may hold callables of B, Lq, Lk (built lazily)
def _kpm(B, Lk, full_row=True):
    g = torch.Generator().manual_seed(7)
    m = torch.rand(B, Lk, generator=g) > 0.35
    if full_row:
        m[-1] = False  # the last batch entry attends to nothing: output 0, gradients 0
    return m


CASES = {
    "causal": (dict(), dict()),
    "noncausal": (dict(), dict(causal=False)),
    "decode": (dict(Lq=1, Lk=9), dict()),
    "chunked_prefill": (dict(Lq=4, Lk=11), dict()),
    "lq_gt_lk": (dict(Lq=7, Lk=4), dict()),  # q_offset = -3: first rows see nothing
    "q_offset": (dict(Lq=5, Lk=8), dict(q_offset=1)),
    "q_offset_zero_rect": (dict(Lq=3, Lk=6), dict(q_offset=0)),  # top-left: SDPA's own alignment
    "q_offset_large": (dict(Lq=3, Lk=5), dict(q_offset=10)),  # every key visible
    "q_offset_neg_noncausal": (dict(Lq=3, Lk=5), dict(q_offset=-2, causal=False)),
    "kpm": (dict(Lq=5, Lk=7), dict(key_padding_mask="kpm")),
    "kpm_noncausal": (dict(), dict(key_padding_mask="kpm", causal=False)),
    "cu_seqlens": (dict(B=1, Lq=10, Lk=10), dict(cu_seqlens=torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32))),
    "cu_seqlens_noncausal": (dict(B=1, Lq=9, Lk=9),
                             dict(causal=False, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))),
    "mqa": (dict(H=6, Hkv=1), dict()),
    "mha": (dict(H=3, Hkv=3), dict()),
    "interleaved": (dict(), dict(layout="interleaved")),
    "per_head_freqs": (dict(per_head_freqs=True), dict()),
    "scale": (dict(), dict(scale=1.0)),
    "dv_ne_d": (dict(d=8, dv=6), dict()),
    "positions": (dict(B=2, Lq=3, Lk=7), dict(positions="custom")),
}


def build_case(name, device="cpu", dtype=torch.float64, grad=False):
    shape, kw = CASES[name]
    kw = dict(kw)
    ts = attn_inputs(**shape, device=device, dtype=dtype, grad=grad)
    B, Lq, Lk = ts[0].shape[0], ts[0].shape[2], ts[1].shape[2]
    if kw.get("key_padding_mask") == "kpm":
        kw["key_padding_mask"] = _kpm(B, Lk).to(device)
    if kw.get("positions") == "custom":
        # module-style position ids: per-batch query positions, shared key positions with a gap
        kw["positions"] = (torch.tensor([[4, 5, 9], [0, 1, 2]], device=device),
                           torch.tensor([0, 1, 2, 3, 4, 5, 9], device=device))
    if "cu_seqlens" in kw:
        kw["cu_seqlens"] = kw["cu_seqlens"].to(device)
    return ts, kw


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_pairwise_float64(backend, case):
    ts, kw = build_case(case)
    out = cmha_attention(*ts, backend=backend, **kw)
    ref = pairwise(*ts, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", ["causal", "lq_gt_lk", "kpm", "cu_seqlens", "mqa", "interleaved",
                                  "per_head_freqs", "positions", "dv_ne_d"])
def test_grads_match_pairwise_float64(backend, case):
    """Gradients of all six inputs (freqs learnable) against autograd through the polar form."""
    ts, kw = build_case(case, grad=True)
    gout = torch.randn(cmha_attention(*ts, backend="reference", **kw).shape, dtype=torch.float64)
    got = torch.autograd.grad(cmha_attention(*ts, backend=backend, **kw), ts, gout)
    want = torch.autograd.grad(pairwise(*ts, **kw), ts, gout)
    for name, a, b in zip("q k v delta beta freqs".split(), got, want):
        # the kernels' rotation backward takes d theta = (-s, c) / r with r including eps_r (bounded
        # as r -> 0, csrc/rotate_math.h): a relative difference of eps_r / (re^2 + im^2) ~ 1e-8 here
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ALL)
def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    q, k, v, delta, beta, freqs = attn_inputs(B=3, Lq=5, Lk=7, grad=True)
    kpm = torch.ones(3, 7, dtype=torch.bool)
    kpm[1] = False
    out = cmha_attention(q, k, v, delta, beta, freqs, key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v, delta, beta, freqs):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    # causal with Lq > Lk: the first rows see nothing
    q, k, v, delta, beta, freqs = attn_inputs(Lq=6, Lk=3, grad=True)
    out = cmha_attention(q, k, v, delta, beta, freqs, backend=backend)
    assert (out[:, :, :3] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert (q.grad[:, :, :3] == 0).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v, delta, beta))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("causal", [True, False])
def test_cu_seqlens_equals_separate_runs(backend, causal):
    lens = [3, 1, 5, 0, 4]
    T = sum(lens)
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=4, Hkv=2, Lq=T, Lk=T, d=16)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out = cmha_attention(q, k, v, delta, beta, freqs, cu_seqlens=cu, causal=causal, backend=backend)
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        sep = cmha_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], delta, beta, freqs, causal=causal,
                             backend=backend)
        torch.testing.assert_close(out[:, :, a:b], sep, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", ["causal", "kpm", "mqa", "cu_seqlens", "lq_gt_lk", "interleaved"])
def test_gradcheck(backend, case):
    shape, kw = CASES[case]
    shape = {"H": 2, "Hkv": 1, **shape, "d": 4}
    if case != "cu_seqlens":
        shape = {**shape, "Lq": min(shape.get("Lq", 3), 3), "Lk": min(shape.get("Lk", 4), 4), "B": 2}
    ts = attn_inputs(**shape, per_head_freqs=True, grad=True)
    kw = dict(kw)
    if kw.get("key_padding_mask") == "kpm":
        kw["key_padding_mask"] = _kpm(ts[0].shape[0], ts[1].shape[2])
    fn = lambda *xs: cmha_attention(*xs, backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ts, eps=1e-6, atol=1e-6, rtol=1e-5)
    # fast mode (random projections) on a bigger GQA case with a padding mask
    ts = attn_inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7, d=8, per_head_freqs=True, grad=True)
    kw2 = dict(key_padding_mask=_kpm(2, 7), layout=kw.get("layout", "half"))
    fn2 = lambda *xs: cmha_attention(*xs, backend=backend, **kw2)  # noqa: E731
    assert torch.autograd.gradcheck(fn2, ts, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", ALL)
def test_learnable_freqs_grad_shared(backend):
    ts = attn_inputs(grad=True)
    gout = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    g1 = torch.autograd.grad(cmha_attention(*ts, backend=backend), ts[5], gout)[0]
    g2 = torch.autograd.grad(pairwise(*ts), ts[5], gout)[0]
    assert g1.shape == (4,) and g1.abs().max() > 0
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fused"])
def test_float32_params_and_dtype_of_grads(backend):
    """float32 q with float64 parameters: parameters are cast for the math, grads come back in
    the parameters' own dtype; freqs that do not require grad get none."""
    q, k, v, delta, beta, freqs = attn_inputs(dtype=torch.float32)
    q.requires_grad_()
    delta = delta.double().requires_grad_()
    beta = beta.double().requires_grad_()
    out = cmha_attention(q, k, v, delta, beta, freqs, backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert delta.grad.dtype == torch.float64 and beta.grad.dtype == torch.float64
    assert freqs.grad is None and q.grad.dtype == torch.float32


def fa_rule(backend, ts64, kw, floor=2e-6):
    """FlashAttention rule: |backend(fp32) - ref64| <= 2 |torch-math(fp32) - ref64| + floor."""
    ts32 = [t.float() for t in ts64]
    ours, torch32 = (cmha_attention(*ts32, backend=b, **kw) for b in (backend, "reference"))
    return assert_fa_rule(ours, torch32, pairwise(*ts64, **kw), floor=floor, what=f"{backend} float32")


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
@given(
    L=st.sampled_from([1, 17, 127, 129]),
    Lk_extra=st.sampled_from([0, 0, 5]),
    d=st.sampled_from([32, 64, 128]),
    heads=st.sampled_from([(1, 1), (4, 4), (4, 2), (6, 1)]),
    B=st.sampled_from([1, 3]),
    causal=st.booleans(),
    layout=st.sampled_from(["half", "interleaved"]),
    use_kpm=st.booleans(),
    bshd=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=12, deadline=None)
def test_hypothesis_float32_fa_rule(backend, L, Lk_extra, d, heads, B, causal, layout, use_kpm, bshd, seed):
    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    ts = attn_inputs(B=B, H=H, Hkv=Hkv, Lq=L, Lk=L + Lk_extra, d=d, per_head_freqs=bool(seed % 2), gen=g)
    if bshd:  # (B, L, H, d) storage viewed as (B, H, L, d): what a projection + view gives
        ts[:3] = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts[:3]]
    kw = dict(causal=causal, layout=layout)
    if use_kpm:
        kw["key_padding_mask"] = torch.rand(B, L + Lk_extra, generator=g) > 0.3
    fa_rule(backend, ts, kw)


def test_fused_long_sequence():
    ts = attn_inputs(B=1, H=2, Hkv=1, Lq=1000, Lk=1000, d=32)
    fa_rule("fused", ts, {})


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_param_grads_deterministic(backend):
    ts = attn_inputs(B=2, H=4, Hkv=2, Lq=67, Lk=67, d=32, dtype=torch.float32, grad=True)
    gout = torch.randn(2, 4, 67, 32)
    runs = [torch.autograd.grad(cmha_attention(*ts, backend=backend), ts[3:], gout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck_fused_ops():
    for shape, kw in [(dict(), dict()), (dict(Lq=3, Lk=7), dict(key_padding_mask=True))]:
        q, k, v, delta, beta, freqs = attn_inputs(**shape, dtype=torch.float32, grad=True)
        B, H, Lq, d = q.shape
        Lk = k.shape[2]
        q_pos = (Lk - Lq + torch.arange(Lq))[None]
        k_pos = torch.arange(Lk)[None]
        kpm = _kpm(B, Lk) if kw.get("key_padding_mask") else None
        args = (q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, None, True, 1 / math.sqrt(d), Lk - Lq, 0)
        torch.library.opcheck(torch.ops.complexformer.cmha_fused.default, args)
        out, lse = torch.ops.complexformer.cmha_fused(*args)
        dout = torch.randn_like(out)
        for dlse in (None, torch.randn_like(lse)):
            bargs = (*[t.detach() if isinstance(t, torch.Tensor) else t for t in args[:10]], out.detach(), dout,
                     lse.detach(), dlse, True, 1 / math.sqrt(d), Lk - Lq, 0)
            torch.library.opcheck(torch.ops.complexformer.cmha_fused_bwd.default, bargs)


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_compile_fullgraph(backend):
    ts = attn_inputs(B=1, H=4, Hkv=2, Lq=5, Lk=9, d=16, dtype=torch.float32, grad=True)
    kpm = _kpm(1, 9, full_row=False)

    def f(q, k, v, delta, beta, freqs):
        return cmha_attention(q, k, v, delta, beta, freqs, key_padding_mask=kpm, backend=backend)

    def g(q, k, v, delta, beta, freqs, cu):
        return cmha_attention(q, k, v, delta, beta, freqs, cu_seqlens=cu, backend=backend)

    torch._dynamo.reset()
    cu = torch.tensor([0, 2, 5, 9], dtype=torch.int32)
    ts9 = attn_inputs(B=1, H=4, Hkv=2, Lq=9, Lk=9, d=16, dtype=torch.float32, grad=True)
    for fn, args in [(f, ts), (g, (*ts9, cu))]:
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        ref = fn(*args)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        g1 = torch.autograd.grad(out.sum(), args[:6])
        g2 = torch.autograd.grad(ref.sum(), args[:6])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_empty_inputs(backend):
    # Lq = 0: empty output; Lk = 0: zeros (no key to attend to), grads zero
    ts = attn_inputs(Lq=0, Lk=5, grad=True)
    out = cmha_attention(*ts, backend=backend)
    assert out.shape == (2, 4, 0, 8)
    ts = attn_inputs(Lq=3, Lk=0, grad=True)
    out = cmha_attention(*ts, backend=backend, causal=False)
    assert out.shape == (2, 4, 3, 8) and (out == 0).all()
    out.sum().backward()
    assert (ts[0].grad == 0).all()
    ts = attn_inputs(B=0)
    assert cmha_attention(*ts, backend=backend).shape == (0, 4, 6, 8)


def test_non_contiguous_inputs():
    q, k, v, delta, beta, freqs = attn_inputs(B=2, H=4, Hkv=2, Lq=6, Lk=6, d=8)
    # (B, L, H, d) storage viewed as (B, H, L, d), and a transposed-last-dims v
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    ref = pairwise(q, k, v, delta, beta, freqs)
    for backend in ALL:
        torch.testing.assert_close(cmha_attention(qt, kt, vt, delta, beta, freqs, backend=backend), ref,
                                   atol=1e-10, rtol=1e-10)


def test_auto_rule_cpu():
    ts = attn_inputs(dtype=torch.float32)
    p = A._validate(*ts, True, None, None, None, None, "half", "auto", None)
    assert A._auto_backend(ts[0], p) == ("fused" if A._AUTO_FUSED_ON_CPU else "sdpa")
    torch.testing.assert_close(cmha_attention(*ts), cmha_attention(*ts, backend="reference"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument.
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v, delta, beta, freqs = attn_inputs(dtype=torch.float32)
    base = dict(q=q, k=k, v=v, delta=delta, beta=beta, freqs=freqs)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    m1 = attn_inputs(B=1, dtype=torch.float32)
    b1 = dict(zip("q k v delta beta freqs".split(), m1))
    return [
        (dict(q=q[..., :7], k=k[..., :7], v=v[..., :7]), {}, "even"),
        (dict(k=k[..., :6]), {}, "k: head dim"),
        (dict(k=k[:1], v=v[:1]), {}, "batch"),
        (dict(v=v[:, :, :5]), {}, "v:"),
        (dict(k=k[:, :1].expand(2, 3, 6, 8), v=v[:, :1].expand(2, 3, 6, 8)), {}, "divide"),
        (dict(delta=delta[:, :3]), {}, "delta"),
        (dict(beta=beta[:2]), {}, "beta"),
        (dict(freqs=freqs[:3]), {}, "freqs"),
        (dict(q=q.double()), {}, "dtype"),
        (dict(q=q.long()), {}, "q: dtype"),
        (dict(q=q[0]), {}, "q: expected 4"),
        (dict(delta=delta.long()), {}, "delta: dtype"),
        ({}, dict(key_padding_mask=torch.ones(2, 6)), "key_padding_mask: dtype"),
        ({}, dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), "key_padding_mask: expected shape"),
        ({}, dict(cu_seqlens=cu), "cu_seqlens: packed"),
        (b1, dict(cu_seqlens=cu.long()), "cu_seqlens: dtype"),
        (b1, dict(cu_seqlens=torch.tensor([1, 6], dtype=torch.int32)), "cu_seqlens: must start"),
        (b1, dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens: must start"),
        (b1, dict(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), "non-decreasing"),
        (b1, dict(cu_seqlens=cu, q_offset=0), "q_offset"),
        ({}, dict(q_offset=1.5), "q_offset"),
        ({}, dict(q_offset=2**40), "q_offset"),
        ({}, dict(layout="complex"), "layout"),
        ({}, dict(backend="flash"), "backend"),
        ({}, dict(scale=float("nan")), "scale"),
        ({}, dict(positions=torch.arange(6)), "positions"),
        ({}, dict(positions=(torch.arange(6.0), torch.arange(6))), "positions[0]"),
        ({}, dict(positions=(torch.arange(6), torch.arange(5))), "positions[1]"),
        (dict(q="q"), {}, "q: expected a torch.Tensor"),
        (dict(k=k.to("meta")), {}, "k: on meta"),
        (dict(delta=delta.to("meta")), {}, "delta"),
        ({}, dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), "key_padding_mask: on meta"),
        (dict(q=q[..., :0], k=k[..., :0], v=v[..., :0]), {}, "positive even"),
        (dict(k=k[:, :0], v=v[:, :0]), {}, "divide"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_cases())))
def test_bad_inputs_raise(i):
    tensors, kw, match = _bad_cases()[i]
    q, k, v, delta, beta, freqs = attn_inputs(dtype=torch.float32)
    args = dict(q=q, k=k, v=v, delta=delta, beta=beta, freqs=freqs)
    args.update(tensors)
    with pytest.raises((ValueError, TypeError), match=re.escape(match)):
        cmha_attention(args["q"], args["k"], args["v"], args["delta"], args["beta"], args["freqs"], **kw)


def test_fused_unsupported_dtype_raises():
    q, k, v, delta, beta, freqs = attn_inputs(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="fused"):
        cmha_attention(q, k, v, delta, beta, freqs, backend="fused")
    q, k, v, delta, beta, freqs = attn_inputs(B=1, H=1, Hkv=1, Lq=2, Lk=2, d=258, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="head dims"):
        cmha_attention(q, k, v, delta, beta, freqs, backend="fused")
    assert torch.isfinite(cmha_attention(q, k, v, delta, beta, freqs)).all()  # auto still serves it


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_dim_rotates_only_the_leading_features(backend, layout):
    """Partial rotary against float64 written here: the polar scores of the first r features plus
    the plain dot product of the rest, causal softmax (GQA, scale 1/sqrt(d) of the whole head)."""
    from complexformer.reference import cmha_scores_pairwise
    q, k, v, delta, beta, freqs = attn_inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7, d=12)
    r = 4
    delta, beta, freqs = delta[:, :r // 2].contiguous(), beta[:, :r // 2].contiguous(), freqs[:r // 2].contiguous()
    scale = 1 / math.sqrt(12)
    q_pos, k_pos = (2 + torch.arange(5))[None], torch.arange(7)[None]
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = cmha_scores_pairwise(q[..., :r], k[..., :r], delta, beta, freqs, q_pos, k_pos, scale=scale, layout=layout)
    s = s + scale * q[..., r:] @ kk[..., r:].transpose(-1, -2)
    s = s.masked_fill(torch.arange(7)[None, :] > torch.arange(5)[:, None] + 2, float("-inf"))
    want = torch.softmax(s, -1) @ vv
    got = cmha_attention(q, k, v, delta, beta, freqs, rotary_dim=r, layout=layout, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="rotary_dim"):
        cmha_attention(q, k, v, delta, beta, freqs, rotary_dim=r, backend="fused")
    with pytest.raises(ValueError, match="rotary_dim"):
        cmha_attention(q, k, v, delta, beta, freqs, rotary_dim=3)
    with pytest.raises(ValueError, match="delta"):
        cmha_attention(q, k, v, delta, beta, freqs, rotary_dim=2 * r)
