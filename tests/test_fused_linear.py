"""fused_linear_pdl_loss on the CPU: equal to F.linear + pdl_loss / F.cross_entropy(weight) in
float64 (loss and the hidden, weight and bias gradients), the FlashAttention rule in float32,
float16 and bfloat16, odd sizes and chunkings, ignore_index, normalizer, the chunk rule,
gradcheck, opcheck, torch.compile, unsupported autograd modes and bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import complexformer as cf
from complexformer.fused_linear import fused_linear_chunk_rows
from oracles import assert_fa_rule

REDUCTIONS = ["mean", "sum", "none"]


def make(N, D, V, dtype=torch.float64, bias=False, ignore_every=0, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    w = cf.pdl_weights(torch.randint(0, 1000, (V,), generator=g), alpha=0.7, max_weight=10.0)
    return h, W, b, y, w


def unfused(h, W, y, w, bias=None, **kw):
    """F.linear + F.cross_entropy(weight=w): the reference (float64) and PyTorch's own low precision."""
    z = F.linear(h, W, bias)
    out = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), weight=w.to(z.dtype), **kw)
    return out.view(y.shape) if kw.get("reduction") == "none" else out


def run(fn, h, W, b, go_seed=5):
    """(loss, grad_hidden, grad_weight[, grad_bias]) with a non-trivial grad_output."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, W) + ((b,) if b is not None else ())]
    out = fn(*leaves)
    go = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(go_seed)) + 0.5
    grads = torch.autograd.grad(out, leaves, go.to(out.device, out.dtype))
    return (out.detach(),) + grads


# ---------------------------------------------------------------- float64: equal to unfused


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_float64_matches_unfused(reduction, bias, smoothing, chunk):
    # N = 2 x 19 = 38 (not a multiple of 7 or 64), V = 41 (odd, prime)
    h, W, b, y, w = make(38, 16, 41, bias=bias, ignore_every=3)
    h, y = h.view(2, 19, 16), y.view(2, 19)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ours = run(lambda hh, WW, *bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb[0] if bb else None,
                                                            chunk_size=chunk, **kw), h, W, b)
    ref = run(lambda hh, WW, *bb: unfused(hh, WW, y, w, bb[0] if bb else None, **kw), h, W, b)
    pdl = run(lambda hh, WW, *bb: cf.pdl_loss(F.linear(hh, WW, bb[0] if bb else None), y, w, **kw), h, W, b)
    assert ours[0].dtype == torch.float64 and ours[0].shape == ref[0].shape
    for a, r, p in zip(ours, ref, pdl):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("N,V,chunk", [(1, 1, None), (5, 3, 2), (33, 257, 8), (129, 1001, 32)])
def test_odd_sizes(N, V, chunk):
    h, W, b, y, w = make(N, 8, V, bias=True, ignore_every=4 if N > 4 else 0)
    ours = run(lambda hh, WW, bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb, chunk_size=chunk), h, W, b)
    ref = run(lambda hh, WW, bb: unfused(hh, WW, y, w, bb), h, W, b)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(0, 25), D=st.integers(1, 9), V=st.integers(1, 40), chunk=st.one_of(st.none(), st.integers(1, 30)),
       bias=st.booleans(), reduction=st.sampled_from(REDUCTIONS), smoothing=st.sampled_from([0.0, 0.3]),
       three_d=st.booleans(), ignore_every=st.integers(0, 4), seed=st.integers(0, 3))
def test_hypothesis_matches_linear_then_pdl_loss(N, D, V, chunk, bias, reduction, smoothing, three_d, ignore_every,
                                                  seed):
    """Any shape and chunking (N = 0, V = 1, all rows ignored included) against F.linear + pdl_loss
    (itself checked against F.cross_entropy in test_pdl.py; it gives 0 where a mean has no counted
    token, as the fused op does)."""
    h, W, b, y, w = make(N, D, V, bias=bias, ignore_every=ignore_every, seed=seed)
    if three_d and N % 2 == 0:
        h, y = h.view(2, N // 2, D), y.view(2, N // 2)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ours = run(lambda hh, WW, *bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb[0] if bb else None,
                                                            chunk_size=chunk, **kw), h, W, b)
    ref = run(lambda hh, WW, *bb: cf.pdl_loss(F.linear(hh, WW, bb[0] if bb else None), y, w, **kw), h, W, b)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_normalizer_splits_exactly_and_retain_graph():
    h, W, b, y, w = make(20, 8, 30, bias=True)
    h.requires_grad_()
    W.requires_grad_()
    S = w.double()[y].sum()
    full = cf.fused_linear_pdl_loss(h, W, y, w, bias=b, chunk_size=6)
    parts = (cf.fused_linear_pdl_loss(h[:9], W, y[:9], w, bias=b, normalizer=S)
             + cf.fused_linear_pdl_loss(h[9:], W, y[9:], w, bias=b, normalizer=float(S)))
    torch.testing.assert_close(full, parts, rtol=1e-12, atol=1e-12)
    # a normalizer replaces the batch's weight sum
    torch.testing.assert_close(cf.fused_linear_pdl_loss(h, W, y, w, bias=b, normalizer=2 * S), full / 2)
    full.backward(retain_graph=True)
    g1 = (h.grad.clone(), W.grad.clone())
    h.grad = W.grad = None
    full.backward()  # the second backward recomputes the chunks
    torch.testing.assert_close(h.grad, g1[0])
    torch.testing.assert_close(W.grad, g1[1])


def test_all_ignored_and_empty():
    h, W, b, y, w = make(5, 4, 7, dtype=torch.float32, bias=True)
    leaves = [t.requires_grad_() for t in (h, W, b)]
    out = cf.fused_linear_pdl_loss(h, W, torch.full((5,), -100), w, bias=b)
    out.backward()
    assert out.item() == 0 and all(torch.all(t.grad == 0) for t in leaves)
    # another ignore_index: -100 is then an (invalid) target, 3 is skipped
    y3 = torch.full((5,), 3)
    assert cf.fused_linear_pdl_loss(h, W, y3, w, ignore_index=3).item() == 0
    # N = 0
    h0 = torch.zeros(0, 4, requires_grad=True)
    out = cf.fused_linear_pdl_loss(h0, W, torch.zeros(0, dtype=torch.long), w, reduction="sum")
    out.backward()
    assert out.item() == 0 and h0.grad.shape == (0, 4)


def test_frozen_head_and_no_grad():
    """Only the gradients autograd needs are computed; under no_grad none are."""
    h, W, b, y, w = make(12, 8, 30, bias=True)
    hh = h.clone().requires_grad_()
    cf.fused_linear_pdl_loss(hh, W, y, w, bias=b).backward()  # W, b frozen (e.g. LoRA)
    hr = h.clone().requires_grad_()
    unfused(hr, W, y, w, b).backward()
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        v = cf.fused_linear_pdl_loss(h.requires_grad_(), W, y, w, bias=b)
    assert not v.requires_grad
    torch.testing.assert_close(v, unfused(h.detach(), W, y, w, b))


def test_nan_propagates_like_torch():
    h, W, b, y, w = make(6, 4, 9, dtype=torch.float32)
    h[2, 1] = float("nan")
    ours = run(lambda hh, WW: cf.fused_linear_pdl_loss(hh, WW, y, w, reduction="none", chunk_size=4), h, W, None)
    ref = run(lambda hh, WW: unfused(hh, WW, y, w, reduction="none"), h, W, None)
    for a, r in zip(ours, ref):
        assert torch.equal(a.isnan(), r.isnan())
    assert cf.fused_linear_pdl_loss(h, W, y, w).isnan()


def test_deterministic():
    h, W, b, y, w = make(300, 32, 500, dtype=torch.float32, bias=True, ignore_every=5)
    a = run(lambda hh, WW, bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb, chunk_size=64), h, W, b)
    c = run(lambda hh, WW, bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb, chunk_size=64), h, W, b)
    assert all(torch.equal(u, v) for u, v in zip(a, c))


# ---------------------------------------------------------------- low precision


FLOOR = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}





@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_low_precision_flash_attention_rule(dtype, reduction):
    h64, W64, b64, y, w = make(203, 64, 1031, bias=True, ignore_every=7, scale=2.0)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    ref = run(lambda a, b, c: unfused(a, b, y, w.double(), c, **kw), h64, W64, b64)
    lo = [t.to(dtype) for t in (h64, W64, b64)]
    ours = run(lambda a, b, c: cf.fused_linear_pdl_loss(a, b, y, w, bias=c, chunk_size=48, **kw), *lo)
    torch_low = run(lambda a, b, c: unfused(a.float(), b.float(), y, w, c.float(), **kw).to(
        torch.float32) if dtype == torch.float16 else unfused(a, b, y, w, c, **kw), *lo)
    assert ours[0].dtype == torch.float32 and [g.dtype for g in ours[1:]] == [dtype] * 3
    for o, lw, r, what in zip(ours, torch_low, ref, ("loss", "grad_hidden", "grad_weight", "grad_bias")):
        assert_fa_rule(o, lw, r, rel_floor=FLOOR[dtype], what=what)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_flash_attention_rule_deterministic_and_no_host_sync(dtype):
    h64, W64, b64, y, w = make(1000, 128, 5003, bias=True, ignore_every=7, scale=2.0)
    ref = run(lambda a, b, c: unfused(a, b, y, w.double(), c, label_smoothing=0.1), h64, W64, b64)
    lo = [t.to("cuda", dtype) for t in (h64, W64, b64)]
    yd, wd = y.cuda(), w.cuda()
    fused = lambda a, b, c: cf.fused_linear_pdl_loss(a, b, yd, wd, bias=c, chunk_size=256,  # noqa: E731
                                                     label_smoothing=0.1)
    again = run(fused, *lo)  # also the weights' one-time check, which reads them once
    leaves = [t.detach().clone().requires_grad_() for t in lo]
    go = torch.rand((), device="cuda") + 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        out = fused(*leaves)
        grads = torch.autograd.grad(out, leaves, go)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ours = run(fused, *lo)
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))  # deterministic
    torch_low = run(lambda a, b, c: unfused(a, b, yd, wd, c, label_smoothing=0.1), *lo)
    for o, lw, r, what in zip(ours, torch_low, ref, ("loss", "grad_hidden", "grad_weight", "grad_bias")):
        assert_fa_rule(o.cpu(), lw.cpu(), r, rel_floor=FLOOR[dtype], what=what)


# ---------------------------------------------------------------- the chunk rule


def test_chunk_rule():
    f32 = torch.float32
    # memory-bound: a quarter of the logits' bytes / (2 V 4 bytes per row) = N / 8 rows
    assert fused_linear_chunk_rows(4096, 1024, 32000, f32, "cpu") == 512
    # small problems: one chunk (the 64 MiB minimum budget)
    assert fused_linear_chunk_rows(300, 64, 5000, f32, "cpu") == 300
    # the speed cap, and equal chunks
    assert fused_linear_chunk_rows(100000, 1024, 100, f32, "cpu") == -(-100000 // -(-100000 // 1024))
    assert fused_linear_chunk_rows(16384, 4096, 128256, torch.bfloat16, "cuda") == 2048
    # an explicit budget; never below one row
    assert fused_linear_chunk_rows(4096, 1024, 32000, f32, "cpu", memory_budget=64 * 256000) == 64
    assert fused_linear_chunk_rows(4096, 1024, 32000, f32, "cpu", memory_budget=1) == 1
    # CPU float16/bfloat16: the two float32 kernel buffers plus one low-precision buffer
    assert fused_linear_chunk_rows(4096, 1024, 32000, torch.bfloat16, "cpu", memory_budget=10 * 32000 * 10) == 10


def test_memory_budget_and_chunk_size_give_the_same_result():
    h, W, b, y, w = make(50, 8, 64, bias=True)
    a = run(lambda hh, WW, bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb, memory_budget=1), h, W, b)
    c = run(lambda hh, WW, bb: cf.fused_linear_pdl_loss(hh, WW, y, w, bias=bb), h, W, b)
    for u, v in zip(a, c):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- autograd contracts


def test_gradcheck():
    h, W, b, y, _ = make(7, 4, 6, bias=True)
    y = torch.tensor([0, 5, -100, 2, 2, 1, 3])
    w = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    leaves = [t.requires_grad_() for t in (h, W, b)]
    for red in REDUCTIONS:
        for ls in (0.0, 0.3):
            assert torch.autograd.gradcheck(lambda a, c, d: cf.fused_linear_pdl_loss(
                a, c, y, w, bias=d, reduction=red, label_smoothing=ls, chunk_size=3), leaves)
    assert torch.autograd.gradcheck(lambda a, c: cf.fused_linear_pdl_loss(
        a, c, y, w, normalizer=torch.tensor(2.5, dtype=torch.float64)), leaves[:2])


def test_opcheck():
    h, W, b, y, w = make(9, 5, 11, dtype=torch.float32, bias=True, ignore_every=4)
    h.requires_grad_()
    W.requires_grad_()
    op = torch.ops.complexformer.fused_linear_pdl_fwd
    for red in (0, 1, 2):
        for mask in (0, 7, 1):
            torch.library.opcheck(op, (h, W, b, y, w, None, -100, red, 0.1, 4, None, mask))
    torch.library.opcheck(op, (h, W, None, y, w, torch.tensor(3.0), -100, 2, 0.0, 4, None, 3))
    torch.library.opcheck(op, (h, W, None, y, w, None, -100, 0, 0.0, 4, torch.rand(9), 3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile(reduction):
    torch._dynamo.reset()
    h, W, b, y, w = make(24, 16, 37, dtype=torch.float32, bias=True, ignore_every=5)

    def step(hh, WW, bb):
        loss = cf.fused_linear_pdl_loss(hh * 1.5, WW, y, w, bias=bb, reduction=reduction, label_smoothing=0.1,
                                        chunk_size=10)
        return loss.sum() * 2.0  # grad_output != 1 reaches the backward

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = run(step, h, W, b)
    c = run(compiled, h, W, b)
    for u, v in zip(a, c):
        torch.testing.assert_close(u, v)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    h, W, b, y, w = make(32, 16, 64, dtype=torch.float32, ignore_every=5)
    fn = torch.compile(lambda hh, WW: cf.fused_linear_pdl_loss(hh, WW, y, w), fullgraph=True)
    a = run(lambda hh, WW: cf.fused_linear_pdl_loss(hh, WW, y, w), h, W, None)
    c = run(fn, h, W, None)
    for u, v in zip(a, c):
        torch.testing.assert_close(u, v)


def test_forward_ad_and_func_transforms_raise():
    import torch.autograd.forward_ad as fwad

    h, W, b, y, w = make(5, 4, 7)
    loss = lambda a: cf.fused_linear_pdl_loss(a, W, y, w)  # noqa: E731
    with pytest.raises(NotImplementedError, match="fused_linear_pdl_loss: forward-mode AD"):
        torch.func.jvp(loss, (h,), (torch.ones_like(h),))
    with fwad.dual_level(), pytest.raises(NotImplementedError, match="fused_linear_pdl_loss: forward-mode AD"):
        loss(fwad.make_dual(h, torch.ones_like(h)))
    with pytest.raises(NotImplementedError, match="fused_linear_pdl_loss"):
        torch.func.grad(loss)(h)


def test_double_backward_raises():
    h, W, b, y, w = make(5, 4, 7)
    h.requires_grad_()
    out = cf.fused_linear_pdl_loss(h, W, y, w)
    with pytest.raises(RuntimeError, match="fused_linear_pdl_loss: double backward"):
        torch.autograd.grad(out, h, create_graph=True)
    # without create_graph the same graph still works
    (g,) = torch.autograd.grad(cf.fused_linear_pdl_loss(h, W, y, w), h)
    assert not g.requires_grad


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    h, W, b, y, w = make(5, 4, 7, dtype=torch.float32, bias=True)
    fl = cf.fused_linear_pdl_loss
    cases = [
        (ValueError, "lm_head_weight: expected shape", lambda: fl(h, torch.randn(7, 3), y, w)),
        (ValueError, "lm_head_weight: expected 2", lambda: fl(h, W[None], y, w)),
        (TypeError, "lm_head_weight: dtype", lambda: fl(h, W.double(), y, w)),
        (ValueError, "lm_head_weight: on meta", lambda: fl(h, W.to("meta"), y, w)),
        (ValueError, "hidden: expected 2 or 3", lambda: fl(h[0], W, y, w)),
        (TypeError, "hidden: dtype", lambda: fl(h.int(), W, y, w)),
        (ValueError, "bias: expected shape \\(7,\\)", lambda: fl(h, W, y, w, bias=torch.randn(6))),
        (TypeError, "bias: dtype", lambda: fl(h, W, y, w, bias=b.double())),
        (ValueError, "bias: on meta", lambda: fl(h, W, y, w, bias=b.to("meta"))),
        (ValueError, "weights: has 6", lambda: fl(h, W, y, torch.rand(6))),
        (ValueError, "targets: value 7", lambda: fl(h, W, torch.full((5,), 7), w)),
        (ValueError, "targets: expected shape", lambda: fl(h, W, y[:4], w)),
        (TypeError, "targets: dtype", lambda: fl(h, W, y.float(), w)),
        (ValueError, "targets: on meta", lambda: fl(h, W, y.to("meta"), w)),
        (ValueError, "chunk_size", lambda: fl(h, W, y, w, chunk_size=0)),
        (ValueError, "memory_budget", lambda: fl(h, W, y, w, memory_budget=-1)),
        (ValueError, "normalizer", lambda: fl(h, W, y, w, normalizer=0.0)),
        (ValueError, "normalizer", lambda: fl(h, W, y, w, reduction="sum", normalizer=2.0)),
        (ValueError, "reduction", lambda: fl(h, W, y, w, reduction="avg")),
        (ValueError, "label_smoothing", lambda: fl(h, W, y, w, label_smoothing=1.5)),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_importable_from_the_old_place():
    from complexformer import pdl

    assert pdl.fused_linear_pdl_loss is cf.fused_linear_pdl_loss


def test_nan_weight_propagates_like_pdl_loss():
    # a NaN class weight is not rejected (as in pdl_loss and F.cross_entropy): the mean is NaN
    g = torch.Generator().manual_seed(0)
    h, W, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (7, 4), (7,)))
    y = torch.tensor([3, 0, 6, 3, 1])
    w = torch.rand(7, generator=g, dtype=torch.float64).index_fill_(0, torch.tensor([3]), float("nan"))
    got = cf.fused_linear_pdl_loss(h, W, y, w, bias=b)
    want = F.cross_entropy(F.linear(h, W, b), y, weight=w)
    assert torch.isnan(got) and torch.isnan(want)


def test_numpy_integer_ignore_index():
    # any operator.index-able ignore_index, as pdl_loss accepts
    np = pytest.importorskip("numpy")
    h, W, b, y, w = make(5, 4, 7, dtype=torch.float64, bias=True)
    y = y.clone()
    y[1] = -100
    got = cf.fused_linear_pdl_loss(h, W, y, w, bias=b, ignore_index=np.int64(-100))
    want = cf.pdl_loss(F.linear(h, W, b), y, w)
    torch.testing.assert_close(got, want)
