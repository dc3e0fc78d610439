"""euler_rotate on CUDA: float32 / float16 / bfloat16 against float64 by the FlashAttention rule,
backward, vector and scalar load paths, wide GQA groups, q and k in one launch, CUDA graphs,
non-default streams, no host synchronisation, determinism. Skipped without a GPU."""
import math

import pytest
import torch

from complexformer import euler_rotate
from complexformer import rotate as R
from complexformer.reference import default_freqs, rotate_backward_reference
from oracles import assert_fa_rule, max_err
from test_rotate import F64, away_from_origin, polar_rotate

pytestmark = pytest.mark.cuda
DT = [torch.float32, torch.float16, torch.bfloat16]


def make_cuda(B=2, H=8, Hx=2, L=33, d=64, *, dtype=torch.float32, layout="half", per_head=False,
              batch_pos=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = d // 2
    x = away_from_origin(torch.randn(B, Hx, L, d, generator=g, dtype=F64), layout)
    delta = torch.randn(H, h, generator=g, dtype=F64) / math.sqrt(h)
    beta = 0.3 * torch.randn(H, h, generator=g, dtype=F64)
    freqs = default_freqs(d, dtype=F64)
    if per_head:
        freqs = freqs * (1 + 0.1 * torch.rand(H, h, generator=g, dtype=F64))
    pos = torch.randint(0, 4 * L, (B, L), generator=g) if batch_pos else torch.arange(L)[None] + 7
    c = lambda t, dt=torch.float32: t.to("cuda", dt)  # noqa: E731
    return c(x, dtype), c(delta), c(beta), c(freqs), pos.cuda()


def cpu64(*ts):
    """float64 CPU copies: the references run there (few GPU launches, fast under memcheck)."""
    return [t.detach().double().cpu() if t.is_floating_point() else t.cpu() for t in ts]


FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("H,Hx,d", [(8, 2, 64), (4, 4, 128), (6, 1, 6), (96, 1, 32)])
@pytest.mark.parametrize("grad_dtype", ["float32", "same"])
def test_forward_backward_vs_float64(dtype, layout, H, Hx, d, grad_dtype):
    """d = 6 takes the scalar path, the others the vector path; H/Hx = 96 the 32-column backward."""
    if dtype == torch.float32 and grad_dtype == "same":
        pytest.skip("same as float32 gradients")
    x, delta, beta, freqs, pos = make_cuda(H=H, Hx=Hx, d=d, dtype=dtype, layout=layout, per_head=True,
                                           batch_pos=True)
    ref = polar_rotate(*cpu64(x, delta, beta, freqs, pos), layout)
    out = R._rotate_forward(x, delta, beta, freqs, pos, layout=layout)
    assert out.dtype == dtype and out.shape == (2, H, 33, d)
    same = R.rotate_reference(x, delta, beta, freqs, pos, layout=layout, dtype=torch.float32).to(dtype)
    assert_fa_rule(out, same, ref, what="forward", floor=FLOOR[dtype])

    gy = torch.randn(2, H, 33, d, device="cuda", dtype=torch.float64)
    gk = gy.float() if grad_dtype == "float32" else gy.to(dtype)
    refs = rotate_backward_reference(*cpu64(x, gk, delta, beta, freqs, pos), layout=layout, need_freqs_grad=True)
    same = rotate_backward_reference(x, gk, delta, beta, freqs, pos, layout=layout, need_freqs_grad=True)
    outs = R._rotate_backward(x, gk, delta, beta, freqs, pos, layout=layout, need_freqs_grad=True)
    assert outs[0].dtype == dtype and outs[0].shape == x.shape
    for name, o, r, s in zip(("dx", "ddelta", "dbeta", "dfreqs"), outs, refs, same):
        scale = max(1.0, r.abs().max().item())
        assert_fa_rule(o, s, r, what=name, floor=FLOOR[dtype] * scale if name == "dx" else 1e-5 * scale)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_float32_matches_polar_form_closely(layout):
    x, delta, beta, freqs, pos = make_cuda(layout=layout, per_head=True)
    out = euler_rotate(x, delta, beta, freqs, positions=pos[0], layout=layout)
    ref = polar_rotate(*cpu64(x, delta, beta, freqs, pos), layout)
    assert max_err(out, ref) < 1e-5


def test_shared_freqs_keys_and_cpu_agreement():
    """Keys (no beta), shared freqs: CUDA float32 agrees with the CPU float32 kernel."""
    x, delta, beta, freqs, pos = make_cuda(H=8, Hx=2)
    xs = [t.clone().requires_grad_() for t in (x, delta, freqs)]
    xc = [t.detach().cpu().clone().requires_grad_() for t in (x, delta, freqs)]
    gy = torch.randn(2, 8, 33, 64, device="cuda")
    (euler_rotate(xs[0], xs[1], None, xs[2], positions=pos, is_query=False) * gy).sum().backward()
    (euler_rotate(xc[0], xc[1], None, xc[2], positions=pos.cpu(), is_query=False) * gy.cpu()).sum().backward()
    for a, b in zip(xs, xc):
        assert max_err(a.grad.cpu(), b.grad) <= 1e-4 * max(1.0, b.grad.abs().max().item())


def test_strided_and_misaligned_inputs():
    x, delta, beta, freqs, pos = make_cuda(B=3, H=4, Hx=4, L=17, d=64)
    big = torch.zeros(3, 17, 4, 64 + 1, device="cuda")  # odd row stride: no vector loads possible
    big[..., 1:] = x.transpose(1, 2)
    xv = big[..., 1:].transpose(1, 2)
    assert not xv.is_contiguous()
    ref = polar_rotate(*cpu64(x, delta, beta, freqs, pos), "half")
    for xin in (xv, x.transpose(1, 2).contiguous().transpose(1, 2)):
        out = euler_rotate(xin, delta, beta, freqs, positions=pos)
        assert max_err(out, ref) < 1e-5
    gy = torch.randn(3, 4, 17, 64, device="cuda")
    a = R._rotate_backward(xv, gy.transpose(1, 2).contiguous().transpose(1, 2), delta, beta, freqs, pos,
                           layout="half", need_freqs_grad=True)
    b = R._rotate_backward(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_very_wide_group_falls_back_to_expanded_keys():
    x, delta, beta, freqs, pos = make_cuda(H=160, Hx=1, L=5, d=8)
    gy = torch.randn(2, 160, 5, 8, device="cuda")
    got = R._rotate_backward(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=True)
    ref = rotate_backward_reference(*cpu64(x, gy, delta, beta, freqs, pos), layout="half", need_freqs_grad=True)
    for u, v in zip(got, ref):
        assert max_err(u, v) <= 1e-4 * max(1.0, v.abs().max().item())


@pytest.mark.slow
def test_long_sequence_many_chunks():
    x, delta, beta, freqs, pos = make_cuda(B=2, H=8, Hx=8, L=4096, d=128, batch_pos=True)
    gy = torch.randn(2, 8, 4096, 128, device="cuda")
    got = R._rotate_backward(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=True)
    ref = rotate_backward_reference(x.double(), gy.double(), delta.double(), beta.double(), freqs.double(), pos,
                                   layout="half", need_freqs_grad=True)
    same = rotate_backward_reference(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=True)
    for name, u, v, s in zip(("dx", "ddelta", "dbeta", "dfreqs"), got, ref, same):
        assert_fa_rule(u, s, v, what=name, floor=1e-5 * max(1.0, v.abs().max().item()))


def test_deterministic_backward():
    x, delta, beta, freqs, pos = make_cuda(B=4, H=8, Hx=2, L=1000, d=64, dtype=torch.bfloat16)
    gy = torch.randn(4, 8, 1000, 64, device="cuda")
    a = R._rotate_backward(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=True)
    b = R._rotate_backward(x, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_float64_on_cuda_uses_torch_math():
    x, delta, beta, freqs, pos = make_cuda(dtype=torch.float64)
    d64 = [t.double() for t in (delta, beta, freqs)]
    out = euler_rotate(x, *d64, positions=pos)
    torch.testing.assert_close(out, polar_rotate(x, *d64, pos, "half"), rtol=1e-12, atol=1e-12)


def test_q_and_k_in_one_launch():
    q, delta, beta, freqs, pos = make_cuda(H=8, Hx=8, L=40, d=64)
    k = make_cuda(H=8, Hx=2, L=50, d=64, seed=1)[0]
    kp = torch.arange(50, device="cuda")
    qr, kr = R.euler_rotate_qk(q, k, delta, beta, freqs, q_positions=pos, k_positions=kp)
    assert torch.equal(qr, euler_rotate(q, delta, beta, freqs, positions=pos))
    assert torch.equal(kr, euler_rotate(k, delta, None, freqs, positions=kp, is_query=False))
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            R.euler_rotate_qk(q, k, delta, beta, freqs, q_positions=pos, k_positions=kp)
            torch.cuda.synchronize()
        events = prof.events()
    except Exception:  # no CUPTI, or a sanitizer holding it: the equalities above still ran
        return
    launches = [e for e in events if "rot_fwd_kernel" in e.name]
    if events:  # a profiler that records nothing has nothing to count
        assert len(launches) == 1, [e.name for e in events]


def test_cuda_graph_capture_forward_backward():
    x, delta, beta, freqs, pos = make_cuda(H=8, Hx=2, L=64, d=64, dtype=torch.bfloat16)
    xs = x.clone().requires_grad_()
    ps = [t.clone().requires_grad_() for t in (delta, beta, freqs)]
    gy = torch.randn(2, 8, 64, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in [xs] + ps:
            t.grad = None
        out = euler_rotate(xs, *ps, positions=pos)
        out.backward(gy)
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    new_x = make_cuda(H=8, Hx=2, L=64, d=64, dtype=torch.bfloat16, seed=5)[0]
    with torch.no_grad():
        xs.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    eager_x = new_x.clone().requires_grad_()
    eager_p = [t.clone().requires_grad_() for t in (delta, beta, freqs)]
    eager = euler_rotate(eager_x, *eager_p, positions=pos)
    eager.backward(gy)
    assert torch.equal(static_out, eager)
    assert torch.equal(xs.grad, eager_x.grad)
    for a, b in zip(ps, eager_p):
        assert torch.equal(a.grad, b.grad)


def test_non_default_stream():
    x, delta, beta, freqs, pos = make_cuda(B=4, H=8, Hx=2, L=512, d=128)
    expect = euler_rotate(x, delta, beta, freqs, positions=pos)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x2 = x * 1.0  # produced on s: a kernel on the default stream would race with it
        out = euler_rotate(x2, delta, beta, freqs, positions=pos)
        gy = torch.ones_like(out)
        dx = R._rotate_backward(x2, gy, delta, beta, freqs, pos, layout="half", need_freqs_grad=False)[0]
    s.synchronize()
    assert torch.equal(out, expect)
    assert torch.equal(dx, R._rotate_backward(x, gy, delta, beta, freqs, pos, layout="half",
                                              need_freqs_grad=False)[0])


def test_no_host_sync():
    x, delta, beta, freqs, pos = make_cuda(dtype=torch.float16)
    xs = x.clone().requires_grad_()
    ps = [t.clone().requires_grad_() for t in (delta, beta, freqs)]
    euler_rotate(xs, *ps, positions=pos).sum().backward()  # warm up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = euler_rotate(xs, *ps, positions=pos)
        out.backward(torch.ones_like(out))
        R.euler_rotate_qk(xs.detach(), x, delta, beta, freqs, q_positions=pos, k_positions=pos)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_torch_compile_cuda():
    torch._dynamo.reset()
    x, delta, beta, freqs, pos = make_cuda(H=4, Hx=2, L=16, d=32)

    def f(x, d, b, fr):
        return (euler_rotate(x, d, b, fr, positions=pos) ** 2).sum()

    a = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    b = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    torch.compile(f, fullgraph=True)(*a).backward()
    f(*b).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-5, atol=1e-5)


def test_opcheck_cuda():
    x, delta, beta, freqs, pos = make_cuda(H=4, Hx=2, L=5, d=8)
    args = tuple(t.clone().requires_grad_() for t in (x, delta, beta, freqs)) + (pos, 0)
    torch.library.opcheck(torch.ops.complexformer.euler_rotate.default, args)
    gy = torch.randn(2, 4, 5, 8, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.complexformer.euler_rotate_backward.default,
                          (x.bfloat16(), gy, delta, beta, freqs, pos, 1, True))


def test_device_mismatch_raises():
    x, delta, beta, freqs, pos = make_cuda()
    with pytest.raises(ValueError, match="delta"):
        euler_rotate(x, delta.cpu(), beta, freqs, positions=pos)
    with pytest.raises(ValueError, match="positions"):
        euler_rotate(x, delta, beta, freqs, positions=pos.cpu())
