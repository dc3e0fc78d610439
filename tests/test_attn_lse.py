"""cmha_attention(..., return_lse=True) and merge_attention: the row log-sum-exp on every backend, its
gradient (the fused kernels take dlse in their backward), and exact merging of attentions over
disjoint key sets, as ring / context-parallel attention needs."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import complexformer as cf
from complexformer import cmha_attention, merge_attention
from complexformer.reference import cmha_attention_pairwise
from oracles import assert_fa_rule, attn_inputs, cmha_ref
from test_attn_api import CASES, build_case, _kpm

ALL = ["reference", "sdpa", "fused"]


def pairwise_lse(q, k, v, delta, beta, freqs, **kw):
    pos = kw.pop("positions", None)
    if pos is not None:
        kw["q_pos"], kw["k_pos"] = (p if p.dim() == 2 else p[None] for p in pos)
    return cmha_attention_pairwise(q, k, v, delta, beta, freqs, **kw)


def split_keys(ts, kw, cuts):
    """The call kwargs for each key block [c0, c1) of `cuts` (0 = c_0 < ... < c_n = Lk), keeping the
    rotation positions and the causal alignment of the whole call: block keys keep their absolute
    positions, and q_offset shifts by the block's start (causal: key n visible iff n <= m + q_offset)."""
    q, k = ts[0], ts[1]
    Lq, Lk = q.shape[2], k.shape[2]
    q_offset = kw.get("q_offset", Lk - Lq)
    qp, kp = kw.get("positions") or (q_offset + torch.arange(Lq, device=q.device), torch.arange(Lk, device=q.device))
    parts = []
    for c0, c1 in zip(cuts[:-1], cuts[1:]):
        pkw = {key: val for key, val in kw.items() if key not in ("positions", "q_offset", "key_padding_mask")}
        pkw.update(q_offset=q_offset - c0, positions=(qp, kp[..., c0:c1]))
        if kw.get("key_padding_mask") is not None:
            pkw["key_padding_mask"] = kw["key_padding_mask"][:, c0:c1]
        parts.append((c0, c1, pkw))
    return parts


def run_split(ts, kw, cuts, backend):
    q, k, v, delta, beta, freqs = ts
    outs, lses = [], []
    for c0, c1, pkw in split_keys(ts, kw, cuts):
        o, s = cmha_attention(q, k[:, :, c0:c1], v[:, :, c0:c1], delta, beta, freqs, backend=backend,
                              return_lse=True, **pkw)
        outs.append(o)
        lses.append(s)
    return merge_attention(outs, lses)


LSE_CASES = [c for c in CASES if "cu_seqlens" not in c]  # packed calls cannot be split by key index


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", list(CASES))
def test_lse_matches_pairwise_float64(backend, case):
    ts, kw = build_case(case)
    out, lse = cmha_attention(*ts, backend=backend, return_lse=True, **kw)
    ref_out, ref_lse = pairwise_lse(*ts, **kw)
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)  # -inf on rows that see no key


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", LSE_CASES)
def test_split_in_two_halves_merged_by_lse_equals_whole(backend, case):
    """The issue's test: attention over a key split in two halves, merged by the LSE, equals attention
    over the whole key set; values and the gradients of all six inputs (through out and lse)."""
    ts, kw = build_case(case, grad=True)
    Lk = ts[1].shape[2]
    out, lse = cmha_attention(*ts, backend=backend, return_lse=True, **kw)
    mo, ml = run_split(ts, kw, [0, Lk // 2, Lk], backend)
    torch.testing.assert_close(mo, out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ml, lse, atol=1e-12, rtol=1e-12)
    gout, glse = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(lse)
    want = torch.autograd.grad((out * gout).sum() + (lse.where(fin, 0) * glse).sum(), ts)
    got = torch.autograd.grad((mo * gout).sum() + (ml.where(fin, 0) * glse).sum(), ts)
    for name, a, b in zip("q k v delta beta freqs".split(), got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_float32_split_three_ways_gqa_padding(backend):
    q, k, v, delta, beta, freqs = attn_inputs(B=2, H=4, Hkv=2, Lq=70, Lk=150, d=32, dtype=torch.float32)
    kw = dict(key_padding_mask=_kpm(2, 150, full_row=False))
    out, lse = cmha_attention(q, k, v, delta, beta, freqs, backend=backend, return_lse=True, **kw)
    ref_out, ref_lse = pairwise_lse(*(t.double() for t in (q, k, v, delta, beta, freqs)), **kw)
    mo, ml = run_split((q, k, v, delta, beta, freqs), kw, [0, 33, 97, 150], backend)
    assert mo.dtype == torch.float32 and ml.dtype == torch.float32
    # the flash rule: at most 2x the error of the unsplit float32 call (plus float32 rounding)
    for got, whole, ref in ((mo, out, ref_out), (ml, lse, ref_lse)):
        assert_fa_rule(got, whole, ref, floor=1e-6, what="split vs unsplit")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", ["causal", "kpm", "lq_gt_lk", "mqa", "cu_seqlens"])
def test_gradcheck_through_out_and_lse(backend, case):
    ts, kw = build_case(case, grad=True)

    def f(*xs):
        out, lse = cmha_attention(*xs, backend=backend, return_lse=True, **kw)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # gradcheck's finite differences need finite outputs

    assert torch.autograd.gradcheck(f, ts, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_lse_only_loss(backend):
    """Only lse enters the loss: the fused backward gets dout = None and dlse."""
    ts, kw = build_case("kpm", grad=True)
    _, lse = cmha_attention(*ts, backend=backend, return_lse=True, **kw)
    _, ref = pairwise_lse(*ts, **kw)
    w = torch.randn_like(lse)
    fin = torch.isfinite(ref)
    got = torch.autograd.grad((lse.where(fin, 0) * w).sum(), ts, allow_unused=True)
    want = torch.autograd.grad((ref.where(fin, 0) * w).sum(), ts, allow_unused=True)
    for name, a, b in zip("q k v delta beta freqs".split(), got, want):
        if b is None or name == "v":  # lse does not depend on v
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"grad {name}: {m}")


def test_lse_forward_ad_matches_plain_torch():
    ts, kw = build_case("kpm")
    tangents = tuple(torch.randn_like(t) for t in ts)
    fin = torch.isfinite(pairwise_lse(*ts, **kw)[1])

    def f(backend):
        return lambda *xs: cmha_attention(*xs, backend=backend, return_lse=True, **kw)[1].where(fin, 0)

    # the oracle: CMHA in plain PyTorch (forward AD of every backend runs the package's reference math)
    want = torch.func.jvp(lambda *xs: cmha_ref(*xs, **kw)[1].where(fin, 0), tuple(ts), tangents)[1]
    got = torch.func.jvp(f("fused"), tuple(ts), tangents)[1]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_fused_double_backward_through_lse_raises():
    ts, kw = build_case("causal", grad=True)
    _, lse = cmha_attention(*ts, backend="fused", return_lse=True, **kw)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lse.sum(), ts[0], create_graph=True)


def test_empty_keys_give_minus_inf():
    q, k, v, delta, beta, freqs = attn_inputs(Lq=3, Lk=0)
    for backend in ALL:
        out, lse = cmha_attention(q, k, v, delta, beta, freqs, backend=backend, return_lse=True)
        assert torch.count_nonzero(out) == 0 and torch.isneginf(lse).all() and lse.shape == (2, 4, 3)


def test_return_lse_must_be_bool():
    ts = attn_inputs()
    with pytest.raises(TypeError, match="return_lse"):
        cmha_attention(*ts, return_lse=1)


def test_auto_prefers_fused_with_lse():
    from complexformer import attention as A
    ts, kw = build_case("causal")
    p = A._validate(*ts, True, None, None, None, None, "half", "auto", None)
    assert A._auto_backend(ts[0], p, True) == "fused"


def test_nan_query_gives_nan_lse_row():
    q, k, v, delta, beta, freqs = attn_inputs(Lq=5, Lk=5)
    q = q.clone()
    q[0, 1, 2, 0] = float("nan")
    for backend in ALL:
        _, lse = cmha_attention(q, k, v, delta, beta, freqs, backend=backend, return_lse=True)
        assert torch.isnan(lse[0, 1, 2]) and torch.isnan(lse).sum() == 1, backend


# ------------------------------------------------------------------------------------------------
# merge_attention
# ------------------------------------------------------------------------------------------------
def test_merge_rows_without_keys_anywhere():
    out = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.tensor([[0.5, -math.inf, 1.0], [-math.inf, -math.inf, 2.0]], dtype=torch.float64, requires_grad=True)
    out2 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    lse2 = torch.tensor([[-math.inf, -math.inf, 0.0], [3.0, -math.inf, -math.inf]], dtype=torch.float64,
                        requires_grad=True)
    mo, ml = merge_attention([out, out2], [lse, lse2])
    assert torch.isneginf(ml[0, 1]) and torch.isneginf(ml[1, 1])
    assert torch.count_nonzero(mo[:, 1]) == 0
    torch.testing.assert_close(mo[0, 0], out[0, 0])  # only part 0 saw keys
    torch.testing.assert_close(ml[0, 2], torch.logaddexp(lse[0, 2], lse2[0, 2]))
    grads = torch.autograd.grad(mo.sum() + ml.where(torch.isfinite(ml), 0).sum(), (out, lse, out2, lse2))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[0][:, 1]) == 0 and torch.count_nonzero(grads[2][:, 1]) == 0


def test_merge_gradcheck_and_nan():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *xs: merge_attention(xs[:3], xs[3:]), (*outs, *lses))
    lnan = lses[1].detach().clone()
    lnan[1, 2] = float("nan")
    mo, ml = merge_attention([o.detach() for o in outs], [lses[0].detach(), lnan, lses[2].detach()])
    assert torch.isnan(ml[1, 2]) and torch.isnan(mo[1, 2]).all() and torch.isnan(ml).sum() == 1


def test_merge_single_part_and_dtypes():
    out = torch.randn(3, 4, 8).to(torch.bfloat16)
    lse = torch.randn(3, 4)
    mo, ml = merge_attention([out], [lse])
    assert mo.dtype == torch.bfloat16 and ml.dtype == torch.float32
    assert torch.equal(mo, out) and torch.allclose(ml, lse)


@pytest.mark.parametrize("outs,lses,exc,match", [
    ([], [], ValueError, "at least 1"),
    ([torch.zeros(2, 3)], [], ValueError, "same number"),
    ([torch.zeros(2, 3)], [torch.zeros(3)], ValueError, r"lses\[0\]"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2), torch.zeros(2)], ValueError, r"outs\[1\]"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], [torch.zeros(2)] * 2, TypeError, "dtypes"),
    ([torch.zeros(2, 3, dtype=torch.long)], [torch.zeros(2)], TypeError, r"outs\[0\]"),
    ([torch.zeros(2, 3)], ["x"], TypeError, r"lses\[0\]"),
])
def test_merge_bad_input(outs, lses, exc, match):
    with pytest.raises(exc, match=match):
        merge_attention(outs, lses)


@settings(max_examples=25, deadline=None)
@given(Lq=st.integers(1, 20), Lk=st.integers(2, 40), G=st.sampled_from([1, 2]), causal=st.booleans(),
       cut=st.floats(0.05, 0.95), dtype=st.sampled_from([torch.float32, torch.float64]), data=st.data())
def test_hypothesis_split_merge_fused(Lq, Lk, G, causal, cut, dtype, data):
    ts = attn_inputs(B=2, H=2 * G, Hkv=2, Lq=Lq, Lk=Lk, d=8, dtype=dtype)
    kw = dict(causal=causal, q_offset=data.draw(st.integers(-Lq, Lk)))
    c = min(max(1, round(cut * Lk)), Lk - 1)
    out, lse = cmha_attention(*ts, backend="fused", return_lse=True, **kw)
    mo, ml = run_split(ts, kw, [0, c, Lk], "fused")
    ref_out, ref_lse = pairwise_lse(*(t.double() for t in ts), **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(mo.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(ml.double(), ref_lse, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_exported_names():
    assert cf.merge_attention is merge_attention and "merge_attention" in cf.__all__
