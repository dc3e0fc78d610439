"""PDL on CUDA (skipped without a GPU): equality with F.cross_entropy in float32/float16/bfloat16
by the FlashAttention rule, rows longer than
the shared-memory row cache, alignment/stride cases, the backward's grad_output == 1 early exit and
scaling, CUDA graphs, no host synchronisation, streams, token_counts, out-of-range targets,
fused_linear_pdl_loss, torch.compile and opcheck, N x V > 2^31.

Run: PYTHONPATH=. pytest tests/test_pdl_cuda.py -v -rs
"""
import math

import pytest
import torch
import torch.nn.functional as F

import complexformer as cf
from oracles import assert_fa_rule

pytestmark = pytest.mark.cuda
DEV = "cuda"
REDUCTIONS = ["mean", "sum", "none"]
LOW = [torch.float32, torch.float16, torch.bfloat16]


def make(N, V, dtype, ignore_every=0, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    z64 = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    w = cf.pdl_weights(torch.randint(0, 1000, (V,), generator=g), alpha=0.7, max_weight=10.0)
    return z64.to(dtype).to(DEV), y.to(DEV), w.to(DEV)


def ce(z, y, w, **kw):
    out = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1).long(), weight=w.to(z.dtype), **kw)
    return out.view(y.shape) if kw.get("reduction") == "none" else out


def loss_and_grad(fn, z, *args, go_seed=5, **kw):
    z = z.detach().requires_grad_()  # detach keeps the strides (clone would compact them)
    out = fn(z, *args, **kw)
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(go_seed), dtype=torch.float32) + 0.5
    (g,) = torch.autograd.grad(out, z, go.to(out.device, out.dtype))
    return out.detach(), g





FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("N,V", [(64, 32000), (33, 1031), (7, 3), (5, 1), pytest.param(16, 128256, marks=pytest.mark.slow)])
def test_matches_cross_entropy(dtype, reduction, smoothing, N, V):
    z, y, w = make(N, V, dtype, ignore_every=5 if V > 1 else 0)
    ref, gref = loss_and_grad(ce, z.double(), y, w.double(), reduction=reduction, label_smoothing=smoothing)
    ours, g_ours = loss_and_grad(cf.pdl_loss, z, y, w, reduction=reduction, label_smoothing=smoothing)
    low, g_low = loss_and_grad(ce, z, y, w, reduction=reduction, label_smoothing=smoothing)
    assert g_ours.dtype == dtype and ours.dtype == torch.float32
    assert_fa_rule(ours, low, ref, rel_floor=FLOOR[dtype], what="loss")
    assert_fa_rule(g_ours, g_low, gref, rel_floor=FLOOR[dtype], what="grad")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("layout", ["shift", "offset", "wide", "3d"])
def test_strided_and_misaligned_rows(dtype, layout):
    """Rows that start off 16-byte alignment, gradient rows aligned differently from the logits."""
    B, T, V = 3, 9, 1031
    g = torch.Generator().manual_seed(1)
    big = (torch.randn(B, T + 1, V + 5, generator=g, dtype=torch.float64) * 3).to(dtype).to(DEV)
    if layout == "shift":
        z = big[:, :-1, :V]
    elif layout == "offset":
        z = big[:, :T, 1:V + 1]  # storage offset 1 element
    elif layout == "wide":
        z = big[0, :, 3:V + 3]  # 2-D, row stride V + 5
    else:
        z = big[:, :T, :V].contiguous()
    y = torch.randint(0, V, z.shape[:-1], generator=g).to(DEV)
    w = (torch.rand(V, generator=g) + 0.1).to(DEV)
    ref, gref = loss_and_grad(ce, z.double(), y, w.double(), reduction="none")
    ours, g_ours = loss_and_grad(cf.pdl_loss, z, y, w, reduction="none")
    low, g_low = loss_and_grad(ce, z, y, w, reduction="none")
    assert_fa_rule(ours, low, ref, rel_floor=FLOOR[dtype], what="loss")
    assert_fa_rule(g_ours, g_low, gref, rel_floor=FLOOR[dtype], what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_common_offset(dtype):
    """Logits around +40: the kernel subtracts the row max before scaling, like torch."""
    z, y, w = make(64, 32000, torch.float64, ignore_every=5, scale=3.0)
    z = (z + 40).to(dtype)
    ref, gref = loss_and_grad(ce, z.double(), y, w.double(), reduction="sum", label_smoothing=0.1)
    ours, g_ours = loss_and_grad(cf.pdl_loss, z, y, w, reduction="sum", label_smoothing=0.1)
    low, g_low = loss_and_grad(ce, z, y, w, reduction="sum", label_smoothing=0.1)
    assert_fa_rule(ours, low, ref, rel_floor=FLOOR[dtype], what="loss")
    assert_fa_rule(g_ours, g_low, gref, rel_floor=FLOOR[dtype], what="grad")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("V,offset", [(128256, 0), (100003, 3), (32000, 1)])
def test_row_cache_whole_and_partial(dtype, V, offset):
    """Rows longer than a block's row cache (128256 x 2 or 4 bytes > ~112 KB on sm_90): the kernel
    keeps the start of the row on chip and re-reads the rest; odd V and a storage
    offset move the 16-byte packs and the scalar head / tail; enough rows that blocks reuse it."""
    N = 24 if V > 32000 else 600
    z, y, w = make(N, V + offset, dtype, ignore_every=7)
    z = z[:, offset:]
    y = y.clamp(max=V - 1)
    w = w[:V].contiguous()
    ref, gref = loss_and_grad(ce, z.double(), y, w.double(), reduction="sum", label_smoothing=0.1)
    ours, g_ours = loss_and_grad(cf.pdl_loss, z, y, w, reduction="sum", label_smoothing=0.1)
    low, g_low = loss_and_grad(ce, z, y, w, reduction="sum", label_smoothing=0.1)
    assert_fa_rule(ours, low, ref, rel_floor=FLOOR[dtype], what="loss")
    assert_fa_rule(g_ours, g_low, gref, rel_floor=FLOOR[dtype], what="grad")
    with torch.no_grad():  # the loss-only path (no cache) gives the same loss bits
        assert torch.equal(cf.pdl_loss(z, y, w, reduction="sum", label_smoothing=0.1), ours)


def test_no_grad_path():
    z, y, w = make(64, 32000, torch.bfloat16, ignore_every=3)
    want = cf.pdl_loss(z.clone().requires_grad_(), y, w, reduction="none", label_smoothing=0.1).detach()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        got = cf.pdl_loss(z, y, w, reduction="none", label_smoothing=0.1)
    assert torch.cuda.max_memory_allocated() - base < z.numel() * z.element_size() // 4  # no gradient buffer
    assert torch.equal(got, want)


def test_int32_targets_and_all_ignored():
    z, y, w = make(20, 100, torch.bfloat16, ignore_every=3)
    torch.testing.assert_close(cf.pdl_loss(z, y.int(), w), cf.pdl_loss(z, y, w))
    zz = z.clone().requires_grad_()
    out = cf.pdl_loss(zz, torch.full_like(y, -100), w, label_smoothing=0.1)
    out.backward()
    assert out.item() == 0 and torch.all(zz.grad == 0)


def test_grad_output_one_and_not_one():
    z, y, w = make(32, 5000, torch.bfloat16, ignore_every=4)
    _, g1 = loss_and_grad(lambda t: cf.pdl_loss(t, y, w), z)
    z1 = z.clone().requires_grad_()
    cf.pdl_loss(z1, y, w).backward()  # grad_output == 1: the scale kernel returns at once
    z2 = z.clone().requires_grad_()
    (cf.pdl_loss(z2, y, w) * 2.5).backward()  # != 1: scaled in place
    z3 = z.clone().requires_grad_()
    zr = z.float().clone().requires_grad_()
    ce(zr, y, w).backward()
    assert_fa_rule(z1.grad, zr.grad.bfloat16(), zr.grad, rel_floor=FLOOR[torch.bfloat16], what="g=1")
    torch.testing.assert_close(z2.grad.float(), 2.5 * z1.grad.float(), rtol=1e-2, atol=1e-6)
    rows = torch.rand(32, device=DEV) + 0.5
    cf.pdl_loss(z3, y, w, reduction="none").backward(rows)
    zr.grad = None
    ce(zr, y, w, reduction="none").backward(rows)
    assert_fa_rule(z3.grad, zr.grad.bfloat16(), zr.grad, rel_floor=FLOOR[torch.bfloat16], what="per-row")


def test_retain_graph_double_backward():
    z, y, w = make(16, 3000, torch.float32, ignore_every=4)
    z.requires_grad_()
    loss = cf.pdl_loss(z, y, w) * 3.0
    loss.backward(retain_graph=True)
    g1 = z.grad.clone()
    z.grad = None
    loss.backward()
    torch.testing.assert_close(z.grad, g1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_host_sync(reduction):
    z, y, w = make(64, 4099, torch.bfloat16, ignore_every=4)
    z.requires_grad_()
    S = w[y.clamp(min=0)].sum()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in ({}, {"label_smoothing": 0.1}, {"normalizer": S} if reduction == "mean" else {}):
            out = cf.pdl_loss(z, y, w, reduction=reduction, **kw)
            (out.sum() * 2 if reduction == "none" else out).backward()
            out = cf.pdl_loss(z, y, w, reduction=reduction, **kw)
            out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_capture_and_replay():
    N, V = 128, 8192
    z, y, w = make(N, V, torch.bfloat16, ignore_every=7)
    static_z = z.clone().requires_grad_()
    static_y = y.clone()

    def step():
        loss = cf.pdl_loss(static_z, static_y, w, label_smoothing=0.05)
        (gz,) = torch.autograd.grad(loss * 1.0, static_z)
        return loss, gz

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    for seed in (1, 2):
        z2, y2, _ = make(N, V, torch.bfloat16, ignore_every=5, seed=seed)
        with torch.no_grad():
            static_z.copy_(z2)
        static_y.copy_(y2)
        graph.replay()
        zz = z2.clone().requires_grad_()
        (gz,) = torch.autograd.grad(cf.pdl_loss(zz, y2, w, label_smoothing=0.05), zz)
        torch.testing.assert_close(static_loss, cf.pdl_loss(z2, y2, w, label_smoothing=0.05))
        torch.testing.assert_close(static_grad, gz)


def test_non_default_stream():
    z, y, w = make(64, 10007, torch.float16, ignore_every=3)
    a, ga = loss_and_grad(cf.pdl_loss, z, y, w, label_smoothing=0.1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        b, gb = loss_and_grad(cf.pdl_loss, z, y, w, label_smoothing=0.1)
        c = cf.token_counts(y, 10007)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.equal(c.cpu(), cf.token_counts(y.cpu(), 10007))


def test_deterministic():
    z, y, w = make(256, 32000, torch.bfloat16, ignore_every=3)
    a, ga = loss_and_grad(cf.pdl_loss, z, y, w, label_smoothing=0.1)
    b, gb = loss_and_grad(cf.pdl_loss, z, y, w, label_smoothing=0.1)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_out_of_range_target_is_nan_or_raises(monkeypatch):
    z, y, w = make(6, 50, torch.float32)
    y[2] = 50
    zz = z.clone().requires_grad_()
    out = cf.pdl_loss(zz, y, w, reduction="none")
    out.sum().backward()
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(zz.grad[2]).all() and torch.isfinite(zz.grad[[0, 1, 3]]).all()
    assert torch.isnan(cf.pdl_loss(z, y, w))
    monkeypatch.setenv("COMPLEXFORMER_SYNC_CHECKS", "1")
    with pytest.raises(ValueError, match="targets: value 50"):
        cf.pdl_loss(z, y, w)


def test_normalizer_contract_on_device():
    z, y, w = make(40, 2000, torch.float32, ignore_every=3)
    S = w.double()[y[y != -100]].sum().float()  # a device tensor: read on the device, no sync
    full = cf.pdl_loss(z, y, w)
    parts = cf.pdl_loss(z[:17], y[:17], w, normalizer=S) + cf.pdl_loss(z[17:], y[17:], w, normalizer=S)
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-6)
    zero = torch.zeros((), device=DEV)  # not checkable without a sync: NaN, never a silent 0
    assert torch.isnan(cf.pdl_loss(z, y, w, normalizer=zero))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("V", [7, 12288, 12289, 128256])
def test_token_counts(dtype, V):
    g = torch.Generator().manual_seed(V)
    ids = torch.randint(0, V, (1_000_003,), generator=g)
    ids[::13] = -100
    got = cf.token_counts(ids.to(dtype).to(DEV), V)
    assert got.device.type == "cuda" and got.dtype == torch.int64
    assert torch.equal(got.cpu(), torch.bincount(ids[ids >= 0], minlength=V))
    with pytest.raises(ValueError, match="ids: .*out of range"):
        cf.token_counts(torch.tensor([1, V], dtype=dtype, device=DEV), V)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear(dtype, reduction):
    g = torch.Generator().manual_seed(4)
    N, H, V = 300, 64, 5003
    h = (torch.randn(N, H, generator=g) * 0.5).to(dtype).to(DEV)
    W = (torch.randn(V, H, generator=g) * 0.2).to(dtype).to(DEV)
    y = torch.randint(0, V, (N,), generator=g).to(DEV)
    y[::7] = -100
    w = (torch.rand(V, generator=g) + 0.1).to(DEV)
    go = (torch.rand((N,) if reduction == "none" else (), generator=g) + 0.5).to(DEV)

    def run(fn, hh, WW):
        hh, WW = hh.clone().requires_grad_(), WW.clone().requires_grad_()
        out = fn(hh, WW)
        out.backward(go.to(out.dtype))
        return out.detach(), hh.grad, WW.grad

    ref = run(lambda a, b: ce(a @ b.T, y, w.double(), reduction=reduction), h.double(), W.double())
    ours = run(lambda a, b: cf.fused_linear_pdl_loss(a, b, y, w, reduction=reduction, chunk_size=64), h, W)
    low = run(lambda a, b: ce(a @ b.T, y, w, reduction=reduction), h, W)
    for o, l, r, what in zip(ours, low, ref, ("loss", "grad_hidden", "grad_weight")):
        assert_fa_rule(o, l, r, rel_floor=FLOOR[dtype], what=what)


def test_torch_compile_and_opcheck():
    torch._dynamo.reset()
    z, y, w = make(48, 4096, torch.bfloat16, ignore_every=5)
    fn = torch.compile(lambda t: cf.pdl_loss(t, y, w, label_smoothing=0.1) * 2.0, fullgraph=True)
    a, ga = loss_and_grad(lambda t: cf.pdl_loss(t, y, w, label_smoothing=0.1) * 2.0, z)
    b, gb = loss_and_grad(fn, z)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    ops = torch.ops.complexformer
    zz = z.float().requires_grad_()
    for red in (0, 1, 2):
        torch.library.opcheck(ops.pdl_loss_fwd, (zz, y, w, None, -100, red, 0.1))
    torch.library.opcheck(ops.pdl_scale_, (torch.randn(9, 11, device=DEV), torch.tensor(2.0, device=DEV)))
    torch.library.opcheck(ops.token_counts, (y.clamp(min=0), 4096, -100))


@pytest.mark.slow  # 8.6 GB: runs in the plain CUDA test step, not under compute-sanitizer
def test_more_than_2_31_elements():
    N, V = 2**16 + 1, 2**15 + 3  # bf16: 4.3 GB of logits + 4.3 GB of gradient
    assert N * V > 2**31
    z = torch.zeros(N, V, dtype=torch.bfloat16, device=DEV)
    z[-2:] = torch.randn(2, V, device=DEV).bfloat16()
    y = torch.zeros(N, dtype=torch.long, device=DEV)
    y[-1], y[-2] = V - 1, 5
    w = torch.ones(V, device=DEV)
    z.requires_grad_()
    out = cf.pdl_loss(z, y, w, reduction="none")
    torch.testing.assert_close(out[-2:], F.cross_entropy(z.detach()[-2:].float(), y[-2:], reduction="none"), rtol=1e-4, atol=1e-4)
    assert abs(out[0].item() - math.log(V)) < 1e-4
    out.sum().backward()
    zr = z.detach()[-2:].float().requires_grad_()
    F.cross_entropy(zr, y[-2:], reduction="sum").backward()
    torch.testing.assert_close(z.grad[-2:].float(), zr.grad, rtol=2e-2, atol=1e-6)
    del z, out
    torch.cuda.empty_cache()


def test_row_offsets_past_2_31_elements():
    V = 1003
    big = torch.empty(2**31 + 2 * V + 64, dtype=torch.bfloat16, device=DEV)  # 4 GB
    rows = big.as_strided((2, V), (2**31 + 17, 1), storage_offset=5)
    rows.copy_(torch.randn(2, V, device=DEV))
    y = torch.tensor([3, V - 1], device=DEV)
    w = torch.rand(V, device=DEV) + 0.5
    a, ga = loss_and_grad(cf.pdl_loss, rows, y, w, reduction="none")
    b, gb = loss_and_grad(cf.pdl_loss, rows.clone(), y, w, reduction="none")
    # not bitwise: the kernel's vector path depends on the row's alignment, which differs between
    # the two buffers (a 32-bit offset overflow would give garbage, not a last-bit difference)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=8e-3, atol=1e-7)
    ref = F.cross_entropy(rows.float(), y, weight=w, reduction="none")
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)
    del big, rows
    torch.cuda.empty_cache()
