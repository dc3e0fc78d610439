"""PDL on the CPU: pdl_loss against F.cross_entropy(weight=w) and a float64 reference, gradients,
custom-op contracts (opcheck, torch.compile), the normalizer contract, retain_graph, bad inputs,
token_counts and pdl_weights. CUDA versions live in test_pdl_cuda.py; fused_linear_pdl_loss in
test_fused_linear.py."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import complexformer as cf
from complexformer.reference import reference_pdl_loss
from oracles import assert_fa_rule

REDUCTIONS = ["mean", "sum", "none"]


def make(N, V, dtype=torch.float64, ignore_every=0, seed=0, scale=3.0, tdtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g).to(tdtype)
    if ignore_every:
        y[::ignore_every] = -100
    w = pdl_w(V, g)
    return z, y, w


def pdl_w(V, g):
    counts = torch.randint(0, 1000, (V,), generator=g)
    return cf.pdl_weights(counts, alpha=0.7, max_weight=10.0)


def ce(z, y, w, **kw):
    """F.cross_entropy on flattened inputs, with our 'no counted token -> 0' rule."""
    out = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1).long(), weight=w.to(z.dtype), **kw)
    return out.view(y.shape) if kw.get("reduction") == "none" else out


def loss_and_grad(fn, z, *args, **kw):
    z = z.detach().requires_grad_()  # detach keeps the strides (clone would compact them)
    out = fn(z, *args, **kw)
    # a non-uniform grad_output exercises the backward's scaling
    go = torch.rand(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5)) + 0.5
    (g,) = torch.autograd.grad(out, z, go)
    return out.detach(), g


# ---------------------------------------------------------------- equality with torch


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(33, 50), (3, 7, 129), (1, 1)])
def test_float64_matches_cross_entropy(reduction, smoothing, shape):
    *bt, V = shape
    z, y, w = make(math.prod(bt), V, ignore_every=4 if V > 1 else 0)
    z, y = z.view(*bt, V), y.view(*bt)
    a, ga = loss_and_grad(cf.pdl_loss, z, y, w, reduction=reduction, label_smoothing=smoothing)
    b, gb = loss_and_grad(ce, z, y, w, reduction=reduction, label_smoothing=smoothing)
    assert a.dtype == torch.float64 and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("N,V", [(64, 32000), (257, 1031), (8, 3)])
def test_float32_flash_attention_rule(reduction, smoothing, N, V):
    z64, y, w = make(N, V, ignore_every=5, scale=4.0)
    ref, gref = loss_and_grad(ce, z64, y, w.double(), reduction=reduction, label_smoothing=smoothing)
    z32 = z64.float()
    ours, g_ours = loss_and_grad(cf.pdl_loss, z32, y, w, reduction=reduction, label_smoothing=smoothing)
    low, g_low = loss_and_grad(ce, z32, y, w, reduction=reduction, label_smoothing=smoothing)
    assert ours.dtype == torch.float32 and g_ours.dtype == torch.float32
    assert_fa_rule(ours, low, ref, rel_floor=2e-7)
    assert_fa_rule(g_ours, g_low, gref, rel_floor=2e-7)


def test_large_common_offset():
    z64, y, w = make(40, 5000, ignore_every=5)
    z64 = z64 + 40
    ref, gref = loss_and_grad(ce, z64, y, w.double(), reduction="sum", label_smoothing=0.1)
    ours, g_ours = loss_and_grad(cf.pdl_loss, z64.float(), y, w, reduction="sum", label_smoothing=0.1)
    low, g_low = loss_and_grad(ce, z64.float(), y, w, reduction="sum", label_smoothing=0.1)
    assert_fa_rule(ours, low, ref, rel_floor=2e-7)
    assert_fa_rule(g_ours, g_low, gref, rel_floor=2e-7)


def test_exp_polynomial_accuracy():
    """cf_exp_f32 (the vectorised float32 exp in pdl_math.h) through the kernel: one-hot-like
    rows make p_c = exp(z_c - max) / s with s ~ 1, so the gradient exposes exp's error."""
    V = 4097
    x = torch.linspace(-87.0, 0.0, V, dtype=torch.float64)
    z = x.float().double()  # exactly representable inputs
    z[0] = 0.0  # the max: s = 1 + tiny
    zf = z.float().requires_grad_()
    w = torch.ones(V)
    y = torch.tensor([0])
    cf.pdl_loss(zf[None], y, w, reduction="sum").backward()
    p = torch.softmax(z, 0)
    exact = p.clone()
    exact[0] -= 1
    got = zf.grad.double()
    mask = exact.abs() > 1e-30
    rel = ((got - exact).abs() / exact.abs())[mask][1:]  # skip the target (cancellation)
    assert rel.max().item() < 4 * 2.0**-23, rel.max().item()


def test_extreme_logits_and_minus_inf():
    z = torch.tensor([[1e4, -1e4, 0.0], [-float("inf"), 2.0, 1.0], [-float("inf"), -float("inf"), 5.0]],
                     dtype=torch.float32, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    w = torch.tensor([1.0, 2.0, 3.0])
    a = cf.pdl_loss(z, y, w, reduction="none")
    a.sum().backward()
    z2 = z.detach().clone().requires_grad_()
    b = F.cross_entropy(z2, y, weight=w, reduction="none")
    b.sum().backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(z.grad, z2.grad)


def test_nan_logit_propagates():
    z = torch.randn(2, 40)
    z[1, 7] = float("nan")
    out = cf.pdl_loss(z, torch.tensor([3, 3]), torch.ones(40), reduction="none")
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


# ---------------------------------------------------------------- gradcheck / opcheck / compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_gradcheck(reduction, smoothing):
    z, y, w = make(6, 5, ignore_every=3)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cf.pdl_loss(t, y, w, reduction=reduction, label_smoothing=smoothing), (z,))


def test_opcheck():
    z, y, w = make(9, 11, ignore_every=4, dtype=torch.float32)
    z.requires_grad_()
    ops = torch.ops.complexformer
    for red in (0, 1, 2):
        torch.library.opcheck(ops.pdl_loss_fwd, (z, y, w, None, -100, red, 0.1))
    torch.library.opcheck(ops.pdl_loss_fwd, (z, y, w, torch.tensor(3.0), -100, 2, 0.0))
    torch.library.opcheck(ops.pdl_loss_fwd, (z.detach().view(3, 3, 11), y, w, None, -100, 0, 0.0))
    torch.library.opcheck(ops.pdl_scale_, (torch.randn(9, 11), torch.tensor(2.0)))
    torch.library.opcheck(ops.pdl_scale_, (torch.randn(9, 11), torch.rand(9)))
    torch.library.opcheck(ops.token_counts, (torch.randint(0, 11, (50,)), 11, -100))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    z, y, w = make(12, 37, ignore_every=5, dtype=torch.float32)

    def step(z, y, w):
        loss = cf.pdl_loss(z * 1.5, y, w, reduction=reduction, label_smoothing=0.1)
        return loss.sum() * 2.0  # grad_output != 1 reaches the backward

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    za = z.clone().requires_grad_()
    zb = z.clone().requires_grad_()
    la = step(za, y, w)
    la.backward()
    lb = compiled(zb, y, w)
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(za.grad, zb.grad)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    z, y, w = make(16, 64, ignore_every=5, dtype=torch.float32)
    fn = torch.compile(lambda z: cf.pdl_loss(z, y, w), fullgraph=True)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    cf.pdl_loss(za, y, w).backward()
    fn(zb).backward()
    torch.testing.assert_close(za.grad, zb.grad)


# ---------------------------------------------------------------- properties (hypothesis)


@given(
    N=st.integers(0, 19),
    V=st.integers(1, 70),
    three_d=st.booleans(),
    strided=st.sampled_from(["none", "row", "shift", "transpose"]),
    reduction=st.sampled_from(REDUCTIONS),
    smoothing=st.sampled_from([0.0, 0.15, 1.0]),
    ignore=st.sampled_from([None, -100, 0]),
    int32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(N, V, three_d, strided, reduction, smoothing, ignore, int32, seed):
    g = torch.Generator().manual_seed(seed)
    B = 2 if three_d else 1
    T = N
    big = torch.randn(B, T + 1, V + 3, dtype=torch.float64, generator=g) * 4
    if strided == "row":  # rows of stride V + 3
        z = big[:, :T, :V]
    elif strided == "shift":  # the causal-LM shift: logits[:, :-1]
        z = big[:, :-1, :V]
    elif strided == "transpose":  # last dim not stride 1: copied
        z = (torch.randn(B, V, T, dtype=torch.float64, generator=g) * 4).transpose(1, 2)
    else:
        z = big[:, :T, :V].contiguous()
    if not three_d:
        z = z[0]
    y = torch.randint(0, V, z.shape[:-1], generator=g)
    if ignore is not None:
        mask = torch.rand(z.shape[:-1], generator=g) < 0.3
        y[mask] = ignore
    if int32:
        y = y.int()
    w = torch.rand(V, dtype=torch.float64, generator=g) * 3
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=-100 if ignore is None else ignore)
    a, ga = loss_and_grad(cf.pdl_loss, z, y, w, **kw)
    b, gb = loss_and_grad(reference_pdl_loss, z, y.long(), w, **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    if reduction == "mean" and N > 0:
        valid = y != kw["ignore_index"]
        if valid.any() and w[y.long()[valid]].sum() > 0:  # torch agrees where it is defined
            torch.testing.assert_close(a, ce(z, y, w, **kw), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- semantics


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero(reduction):
    z = torch.randn(5, 9, requires_grad=True)
    y = torch.full((5,), -100)
    out = cf.pdl_loss(z, y, torch.rand(9), reduction=reduction, label_smoothing=0.2)
    assert torch.all(out == 0) and not torch.isnan(out).any()
    out.sum().backward()
    assert torch.all(z.grad == 0)


def test_empty_batch_gives_zero():
    z = torch.randn(0, 9, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    assert cf.pdl_loss(z, y, torch.rand(9)).item() == 0
    assert cf.pdl_loss(z, y, torch.rand(9), reduction="none").shape == (0,)
    cf.pdl_loss(z, y, torch.rand(9)).backward()
    assert z.grad.shape == (0, 9)


def test_zero_weight_batch_gives_zero_not_nan():
    z = torch.randn(4, 6, requires_grad=True)
    w = torch.ones(6)
    w[2] = 0
    out = cf.pdl_loss(z, torch.full((4,), 2), w)
    out.backward()
    assert out.item() == 0 and torch.all(z.grad == 0)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_normalizer_contract(smoothing):
    z, y, w = make(40, 23, ignore_every=3)
    S = w.double()[y[y != -100]].sum()  # the kernel sums weights in float64
    full = cf.pdl_loss(z, y, w, label_smoothing=smoothing)
    a = cf.pdl_loss(z[:17], y[:17], w, normalizer=S, label_smoothing=smoothing)
    b = cf.pdl_loss(z[17:], y[17:], w, normalizer=float(S), label_smoothing=smoothing)
    torch.testing.assert_close(a + b, full, rtol=1e-12, atol=1e-12)
    # gradient accumulation: two micro-batches == one batch
    za = z.clone().requires_grad_()
    cf.pdl_loss(za, y, w, label_smoothing=smoothing).backward()
    zb = z.clone().requires_grad_()
    cf.pdl_loss(zb[:17], y[:17], w, normalizer=S, label_smoothing=smoothing).backward()
    cf.pdl_loss(zb[17:], y[17:], w, normalizer=S, label_smoothing=smoothing).backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-12, atol=1e-14)
    # a normalizer equal to the batch's own weight sum changes nothing
    torch.testing.assert_close(cf.pdl_loss(z, y, w, normalizer=S, label_smoothing=smoothing), full)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_double_backward(reduction):
    z, y, w = make(10, 13, ignore_every=4)
    z.requires_grad_()
    loss = cf.pdl_loss(z, y, w, reduction=reduction).sum() * 3.0
    loss.backward(retain_graph=True)
    g1 = z.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 2 * g1)
    z.grad = None
    loss.backward()
    torch.testing.assert_close(z.grad, g1)
    zr = z.detach().clone().requires_grad_()
    (ce(zr, y, w, reduction=reduction).sum() * 3.0).backward()
    torch.testing.assert_close(g1, zr.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_path_matches(reduction):
    """Without autograd (no_grad / logits not requiring grad) only the loss is computed."""
    z, y, w = make(21, 77, dtype=torch.float32, ignore_every=4)
    want = cf.pdl_loss(z.clone().requires_grad_(), y, w, reduction=reduction, label_smoothing=0.1).detach()
    with torch.no_grad():
        a = cf.pdl_loss(z.clone().requires_grad_(), y, w, reduction=reduction, label_smoothing=0.1)
    b = cf.pdl_loss(z, y, w, reduction=reduction, label_smoothing=0.1)
    assert not a.requires_grad and not b.requires_grad
    assert torch.equal(a, want) and torch.equal(b, want)
    torch.library.opcheck(torch.ops.complexformer.pdl_loss_value, (z, y, w, None, -100, _RED[reduction], 0.1))


def test_no_grad_path_allocates_no_gradient():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from _util import peak_bytes

    z, y, w = make(2048, 4096, dtype=torch.float32)  # 32 MB of logits
    peak = peak_bytes(lambda: cf.pdl_loss(z, y, w), device="cpu")
    assert peak < z.numel() * 4 / 4, peak


_RED = {"none": 0, "sum": 1, "mean": 2}


def test_threads_are_deterministic():
    z, y, w = make(67, 301, dtype=torch.float32, ignore_every=6)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga = loss_and_grad(cf.pdl_loss, z, y, w, label_smoothing=0.1)
        torch.set_num_threads(max(2, n))
        b, gb = loss_and_grad(cf.pdl_loss, z, y, w, label_smoothing=0.1)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_is_upcast(dtype):
    z, y, w = make(20, 30, dtype=dtype)
    a, ga = loss_and_grad(cf.pdl_loss, z, y, w)
    b, gb = loss_and_grad(cf.pdl_loss, z.float(), y, w)
    assert ga.dtype == dtype
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb.to(dtype))


def test_module():
    z, y, w = make(11, 17, ignore_every=3)
    m = cf.PDLLoss(w, reduction="sum", label_smoothing=0.1)
    assert "weights" in dict(m.named_buffers()) and "weights" in m.state_dict()
    torch.testing.assert_close(m(z, y), ce(z, y, w, reduction="sum", label_smoothing=0.1))
    m2 = cf.PDLLoss(w)
    S = w[y[y != -100]].sum()
    torch.testing.assert_close(m2(z, y, normalizer=S * 2), cf.pdl_loss(z, y, w) / 2)
    assert "reduction='sum'" in repr(m)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    z, y, w = make(4, 5, dtype=torch.float32)
    cases = [
        (ValueError, "targets", lambda: cf.pdl_loss(z, torch.tensor([0, 1, 5, 2]), w)),
        (ValueError, "targets", lambda: cf.pdl_loss(z, torch.tensor([0, 1, -3, 2]), w)),
        (ValueError, "targets", lambda: cf.pdl_loss(z, y[:3], w)),
        (TypeError, "targets", lambda: cf.pdl_loss(z, y.float(), w)),
        (ValueError, "weights", lambda: cf.pdl_loss(z, y, torch.rand(6))),
        (ValueError, "weights", lambda: cf.pdl_loss(z, y, torch.rand(5, 1))),
        (TypeError, "weights", lambda: cf.pdl_loss(z, y, torch.ones(5, dtype=torch.long))),
        (TypeError, "logits", lambda: cf.pdl_loss(z.long(), y, w)),
        (ValueError, "logits", lambda: cf.pdl_loss(z[0], y[0], w)),
        (ValueError, "logits", lambda: cf.pdl_loss(z.view(1, 1, 4, 5), y.view(1, 1, 4), w)),
        (ValueError, "logits", lambda: cf.pdl_loss(torch.zeros(4, 0), y, torch.zeros(0))),
        (ValueError, "reduction", lambda: cf.pdl_loss(z, y, w, reduction="avg")),
        (ValueError, "label_smoothing", lambda: cf.pdl_loss(z, y, w, label_smoothing=1.5)),
        (ValueError, "label_smoothing", lambda: cf.pdl_loss(z, y, w, label_smoothing=-0.1)),
        (TypeError, "ignore_index", lambda: cf.pdl_loss(z, y, w, ignore_index=1.0)),
        (ValueError, "normalizer", lambda: cf.pdl_loss(z, y, w, normalizer=0.0)),
        (ValueError, "normalizer", lambda: cf.pdl_loss(z, y, w, normalizer=-2)),
        (ValueError, "normalizer", lambda: cf.pdl_loss(z, y, w, normalizer=float("nan"))),
        (ValueError, "normalizer", lambda: cf.pdl_loss(z, y, w, normalizer=torch.tensor(0.0))),
        (ValueError, "normalizer", lambda: cf.pdl_loss(z, y, w, normalizer=torch.ones(2))),
        (ValueError, "normalizer", lambda: cf.pdl_loss(z, y, w, reduction="sum", normalizer=3.0)),
        (TypeError, "logits", lambda: cf.pdl_loss("z", y, w)),
        (ValueError, "vocab_size", lambda: cf.token_counts(y, 0)),
        (TypeError, "ids", lambda: cf.token_counts(z, 5)),
        (ValueError, "ids", lambda: cf.token_counts(torch.tensor([1, 2, 9]), 5)),
        (ValueError, "ids", lambda: cf.token_counts(torch.tensor([1, -2], dtype=torch.int32), 5)),
        (ValueError, "alpha", lambda: cf.pdl_weights(torch.ones(3), alpha=-1)),
        (ValueError, "eps", lambda: cf.pdl_weights(torch.ones(3), eps=0)),
        (ValueError, "max_weight", lambda: cf.pdl_weights(torch.ones(3), max_weight=0)),
        (ValueError, "counts", lambda: cf.pdl_weights(torch.tensor([1.0, -1.0]))),
        (ValueError, "counts", lambda: cf.pdl_weights(torch.ones(2, 2))),
        (ValueError, "counts", lambda: cf.pdl_weights(torch.ones(0))),
        (ValueError, "weights", lambda: cf.PDLLoss(torch.ones(2, 2))),
    ]
    for exc, name, fn in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_out_of_range_target_message():
    z, _, w = make(3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"targets: value 7 .*position 1"):
        cf.pdl_loss(z, torch.tensor([0, 7, 1]), w)


# ---------------------------------------------------------------- token_counts / pdl_weights


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,V", [(1, 1), (1000, 7), (100_003, 3001), (50_000, 200_000)])
def test_token_counts_matches_bincount(dtype, n, V):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, V, (n,), generator=g)
    ids[::11] = -100
    got = cf.token_counts(ids.to(dtype), V)
    assert got.dtype == torch.int64 and got.shape == (V,)
    assert torch.equal(got, torch.bincount(ids[ids >= 0], minlength=V))


def test_token_counts_shapes_and_ignore():
    ids = torch.tensor([[3, 3, 0], [-1, 2, 3]])
    assert cf.token_counts(ids, 5, ignore_index=-1).tolist() == [1, 0, 1, 3, 0]
    assert cf.token_counts(ids.t(), 5, ignore_index=-1).tolist() == [1, 0, 1, 3, 0]  # non-contiguous
    assert cf.token_counts(torch.tensor([4, 4]), 5, ignore_index=4).tolist() == [0] * 5  # an id as ignore
    assert cf.token_counts(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_pdl_weights_math():
    counts = torch.tensor([0, 1, 10, 1000])
    w = cf.pdl_weights(counts)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), (counts.double() + 1e-7) ** -1.0, rtol=1e-6, atol=0)
    assert abs(w[0].item() - 1e7) / 1e7 < 1e-6
    w = cf.pdl_weights(counts, alpha=0.5, eps=0.5, max_weight=1.0)
    torch.testing.assert_close(w.double(), ((counts.double() + 0.5) ** -0.5).clamp(max=1.0), rtol=1e-6, atol=0)
    assert torch.equal(cf.pdl_weights(counts, alpha=0), torch.ones(4))
    assert torch.equal(cf.pdl_weights(counts.float(), alpha=0), torch.ones(4))


def test_alpha_zero_is_plain_cross_entropy():
    z, y, _ = make(30, 12, ignore_every=4)
    counts = cf.token_counts(y, 12)
    w = cf.pdl_weights(counts, alpha=0.0)
    torch.testing.assert_close(cf.pdl_loss(z, y, w), F.cross_entropy(z, y), rtol=1e-12, atol=1e-12)


def test_counting_the_label_stream_bounds_the_weights():
    y = torch.randint(0, 50, (500,))
    y[::7] = -100
    w = cf.pdl_weights(cf.token_counts(y, 50))
    assert w[y[y != -100]].max() <= 1.0  # every target the loss meets was counted


# ---------------------------------------------------------------- 64-bit indexing


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="needs ~17 GB of RAM; set RUN_SLOW=1")
def test_more_than_2_31_elements():
    """N x V > 2^31: the rows past element 2^31 must be right (int64 offsets everywhere)."""
    N, V = 2**16 + 1, 2**15 + 3  # 2^31 + ... elements
    assert N * V > 2**31
    z = torch.empty(N, V, dtype=torch.float32)
    z[:-2].zero_()
    z[-2:] = torch.randn(2, V)
    y = torch.zeros(N, dtype=torch.long)
    y[-1], y[-2] = V - 1, 5
    w = torch.ones(V)
    z.requires_grad_()
    out = cf.pdl_loss(z, y, w, reduction="none")
    ref = F.cross_entropy(z.detach()[-2:], y[-2:], reduction="none")
    torch.testing.assert_close(out[-2:], ref)
    assert abs(out[0].item() - math.log(V)) < 1e-5
    out.sum().backward()
    zr = z.detach()[-2:].clone().requires_grad_()
    F.cross_entropy(zr, y[-2:], reduction="sum").backward()
    torch.testing.assert_close(z.grad[-2:], zr.grad)


def test_row_offsets_past_2_31_elements():
    """Rows that start beyond element 2^31 of their storage (a strided view: only the two rows'
    pages of the 8 GB virtual allocation are ever touched) exercise the int64 row offsets."""
    V = 1000
    big = torch.empty(2**31 + 2 * V + 64, dtype=torch.float32)
    rows = big.as_strided((2, V), (2**31 + 17, 1), storage_offset=5)
    rows.copy_(torch.randn(2, V))
    y = torch.tensor([3, V - 1])
    w = torch.rand(V) + 0.5
    a, ga = loss_and_grad(cf.pdl_loss, rows, y, w, reduction="none", label_smoothing=0.1)
    b, gb = loss_and_grad(ce, rows.clone(), y, w, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    z3 = big.as_strided((2, 1, V), (2**31 + 17, V, 1), storage_offset=5)  # the same rows, 3-D
    torch.testing.assert_close(cf.pdl_loss(z3, y.view(2, 1), w, reduction="none", label_smoothing=0.1).view(2), a)
    del big, rows, z3
