"""euler_rotate (CPU kernels): float64 against the polar-form formula, gradients, bounded backward,
RoPE, float32 by the FlashAttention rule, op registration, torch.compile, properties, bad inputs."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from complexformer import euler_rotate
from complexformer import rotate as R
from complexformer.reference import cmha_scores_pairwise, default_freqs, rotate_backward_reference, split_pairs
from oracles import assert_fa_rule

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# independent reference: straight from the polar form, per query head, no code shared with rotate.py

def polar_rotate(x, delta, beta, freqs, pos, layout="half"):
    """r cos(delta*theta + beta + omega*p), r sin(...) in float64, each query head on its kv head."""
    x = x.double()
    B, Hx, L, d = x.shape
    H, h = delta.shape
    G = H // Hx
    pos = pos.to(x.device).double().reshape(-1, L).expand(B, L)
    out = torch.empty(B, H, L, d, dtype=F64, device=x.device)
    idx_re = torch.arange(h, device=x.device) * (1 if layout == "half" else 2)
    idx_im = idx_re + h if layout == "half" else idx_re + 1
    for i in range(H):
        re, im = x[:, i // G][..., idx_re], x[:, i // G][..., idx_im]  # (B, L, h)
        r = torch.sqrt(re**2 + im**2 + 1e-9)
        omega = (freqs[i] if freqs.dim() == 2 else freqs).double()
        phi = delta[i].double() * torch.atan2(im, re) + omega * pos[..., None]
        if beta is not None:
            phi = phi + beta[i].double()
        out[:, i][..., idx_re] = r * torch.cos(phi)
        out[:, i][..., idx_im] = r * torch.sin(phi)
    return out


def away_from_origin(x, layout, rmin=0.3):
    """Push pairs with r < rmin outwards: there the exact derivative of the eps-regularised
    function and the bounded one we implement differ by eps/r^2, which is not what a test of the
    generic path is about (the r -> 0 behaviour has its own tests)."""
    re, im = split_pairs(x, layout)
    small = (re**2 + im**2) < rmin**2
    re.add_(torch.where(small, torch.full_like(re, 2 * rmin), torch.zeros_like(re)))
    return x


def make(B=2, H=4, Hx=2, L=7, d=16, *, dtype=F64, per_head_freqs=False, batch_pos=False, seed=0,
         layout="half"):
    g = torch.Generator().manual_seed(seed)
    h = d // 2
    x = away_from_origin(torch.randn(B, Hx, L, d, generator=g, dtype=F64), layout).to(dtype)
    delta = (torch.randn(H, h, generator=g, dtype=F64) / math.sqrt(h)).to(dtype)
    beta = (0.3 * torch.randn(H, h, generator=g, dtype=F64)).to(dtype)
    freqs = default_freqs(d, dtype=dtype)
    if per_head_freqs:
        freqs = (freqs * (1 + 0.1 * torch.rand(H, h, generator=g, dtype=F64))).to(dtype)
    if batch_pos:
        pos = torch.randint(0, 3 * L + 1, (B, L), generator=g)
    else:
        pos = torch.arange(L) + 3
    return x, delta, beta, freqs, pos


# ------------------------------------------------------------------------------------------------
# forward in float64

@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("H,Hx", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("per_head_freqs,batch_pos", [(False, False), (True, True)])
@pytest.mark.parametrize("is_query", [True, False])
def test_forward_matches_polar_form(layout, H, Hx, per_head_freqs, batch_pos, is_query):
    x, delta, beta, freqs, pos = make(H=H, Hx=Hx, per_head_freqs=per_head_freqs, batch_pos=batch_pos,
                                      layout=layout)
    out = euler_rotate(x, delta, beta, freqs, positions=pos, is_query=is_query, layout=layout)
    ref = polar_rotate(x, delta, beta if is_query else None, freqs, pos, layout)
    assert out.shape == (2, H, 7, 16) and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_default_positions_and_int32_positions():
    x, delta, beta, freqs, _ = make(L=9)
    out = euler_rotate(x, delta, beta, freqs)
    torch.testing.assert_close(out, polar_rotate(x, delta, beta, freqs, torch.arange(9)), rtol=1e-12, atol=1e-12)
    p32 = torch.arange(9, dtype=torch.int32) * 5
    torch.testing.assert_close(euler_rotate(x, delta, beta, freqs, positions=p32),
                               polar_rotate(x, delta, beta, freqs, p32.long()), rtol=1e-12, atol=1e-12)


def test_keys_ignore_beta():
    x, delta, beta, freqs, pos = make()
    a = euler_rotate(x, delta, beta, freqs, positions=pos, is_query=False)
    b = euler_rotate(x, delta, None, freqs, positions=pos, is_query=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotated_dot_products_equal_pairwise_cmha_scores(layout):
    """The factorization itself: <q~_m, k~_n> equals the score of docs/design.md evaluated pair by pair."""
    q, delta, beta, freqs, _ = make(B=2, H=4, Hx=4, L=6, d=8, layout=layout, per_head_freqs=True)
    k = make(B=2, H=4, Hx=2, L=5, d=8, layout=layout, seed=1)[0]
    q_pos, k_pos = (torch.arange(6) + 4)[None], torch.arange(5)[None]
    qr = euler_rotate(q, delta, beta, freqs, positions=q_pos[0], layout=layout)
    kr = euler_rotate(k, delta, None, freqs, positions=k_pos[0], is_query=False, layout=layout)
    scores = qr @ kr.transpose(-1, -2) * 0.5
    ref = cmha_scores_pairwise(q, k, delta, beta, freqs, q_pos, k_pos, scale=0.5, layout=layout)
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-10)


def test_rope_special_case():
    """delta = 1, beta = 0 is RoPE (up to eps_r = 1e-9 inside r)."""
    B, H, L, d = 2, 3, 11, 16
    x = away_from_origin(away_from_origin(torch.randn(B, H, L, d, dtype=F64), "half"), "interleaved")
    freqs = default_freqs(d, dtype=F64)
    ones, zeros = torch.ones(H, d // 2, dtype=F64), torch.zeros(H, d // 2, dtype=F64)
    ang = torch.arange(L, dtype=F64)[:, None] * freqs  # (L, h)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    rotate_half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    rope = x * cos + rotate_half * sin
    out = euler_rotate(x, ones, zeros, freqs)
    torch.testing.assert_close(out, rope, rtol=1e-8, atol=1e-8)
    # interleaved: the GPT-J / original LLaMA "rotate every two" form
    xi = x
    re, im = xi[..., 0::2], xi[..., 1::2]
    rope_i = torch.stack([re * ang.cos() - im * ang.sin(), re * ang.sin() + im * ang.cos()], -1).flatten(-2)
    torch.testing.assert_close(euler_rotate(xi, ones, zeros, freqs, layout="interleaved"), rope_i,
                               rtol=1e-8, atol=1e-8)


def test_large_positions_float32_keep_phase_accuracy():
    """omega * p is reduced in float64 before the float32 math: p ~ 1e6 stays accurate."""
    x, delta, beta, freqs, _ = make(dtype=torch.float32, L=16)
    pos = torch.arange(16) + 1_000_000
    out = euler_rotate(x, delta, beta, freqs, positions=pos)
    ref = polar_rotate(x, delta, beta, freqs, pos)
    assert (out.double() - ref).abs().max().item() < 5e-5


# ------------------------------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("H,Hx,per_head,batch_pos", [(2, 2, False, False), (4, 2, True, True), (3, 1, True, False)])
def test_gradcheck(layout, H, Hx, per_head, batch_pos):
    x, delta, beta, freqs, pos = make(B=2, H=H, Hx=Hx, L=4, d=6, per_head_freqs=per_head,
                                      batch_pos=batch_pos, layout=layout)
    pos = pos % 7  # keep omega * p in a range where finite differences of cos(omega p) are well conditioned
    inputs = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    fn = lambda x, d, b, f: euler_rotate(x, d, b, f, positions=pos, layout=layout)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)
    fk = lambda x, d, f: euler_rotate(x, d, None, f, positions=pos, is_query=False, layout=layout)  # noqa: E731
    assert torch.autograd.gradcheck(fk, [inputs[0], inputs[1], inputs[3]], atol=1e-6, rtol=1e-5)


def test_gradients_match_autograd_of_polar_form():
    x, delta, beta, freqs, pos = make(B=3, H=4, Hx=2, L=10, d=12, per_head_freqs=True, batch_pos=True)
    a = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    b = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    gy = torch.randn(3, 4, 10, 12, dtype=F64)
    (euler_rotate(*a, positions=pos) * gy).sum().backward()
    (polar_rotate(*b, pos) * gy).sum().backward()
    for u, v, name in zip(a, b, ("x", "delta", "beta", "freqs")):
        # differences of order eps_r / r^2 <= 1.1e-8 (r >= 0.3): the bounded d theta of rotate_math.h
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-7, atol=1e-7, msg=name)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-12, 1e-6])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_backward_bounded_near_origin(scale, layout):
    """|d out / d x| <= 1 + |delta| for every pair, also at r = 0 exactly (docs/design.md, "Deviations")."""
    B, H, L, d = 2, 3, 5, 8
    x = scale * torch.randn(B, H, L, d, dtype=F64)
    delta = 3.0 * torch.randn(H, d // 2, dtype=F64)
    beta = torch.randn(H, d // 2, dtype=F64)
    freqs = default_freqs(d, dtype=F64)
    xs = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    gy = torch.randn(B, H, L, d, dtype=F64)
    (euler_rotate(*xs, layout=layout) * gy).sum().backward()
    for t in xs:
        assert torch.isfinite(t.grad).all()
    g_re, g_im = split_pairs(gy, layout)
    dre, dim = split_pairs(xs[0].grad, layout)
    bound = (1 + delta.abs())[None, :, None, :] * torch.sqrt(g_re**2 + g_im**2) * (1 + 1e-12)
    assert (dre.abs() <= bound).all() and (dim.abs() <= bound).all()
    if scale == 0.0:  # r = sqrt(eps_r): theta = 0, c = s = 0, so d x = 0 exactly
        assert torch.equal(xs[0].grad, torch.zeros_like(x))
    # float32 too
    xf = [t.float().clone().requires_grad_() for t in (x, delta, beta, freqs)]
    (euler_rotate(*xf, layout=layout) * gy.float()).sum().backward()
    for t in xf:
        assert torch.isfinite(t.grad).all()
    dre, dim = split_pairs(xf[0].grad.double(), layout)
    assert (dre.abs() <= bound * (1 + 1e-5)).all() and (dim.abs() <= bound * (1 + 1e-5)).all()


def test_parameter_gradients_deterministic():
    x, delta, beta, freqs, pos = make(B=3, H=8, Hx=2, L=300, d=64, dtype=torch.float32, per_head_freqs=True)
    gy = torch.randn(3, 8, 300, 64)
    runs = []
    threads = torch.get_num_threads()
    try:
        for nt in (threads, 1, threads):
            torch.set_num_threads(nt)
            runs.append(R._rotate_backward(x, gy, delta, beta, freqs, pos[None], layout="half", need_freqs_grad=True))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# float32 / half inputs by the FlashAttention rule

@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_float32_flash_attention_rule(layout):
    x, delta, beta, freqs, pos = make(B=2, H=8, Hx=2, L=64, d=64, layout=layout, per_head_freqs=True)
    gy = torch.randn(2, 8, 64, 64, dtype=F64)
    p2 = pos[None]
    x32, d32, b32, f32, g32 = (t.float() for t in (x, delta, beta, freqs, gy))
    ref = polar_rotate(x, delta, beta, freqs, pos, layout)
    torch32 = R.rotate_reference(x32, d32, b32, f32, p2, layout=layout)
    assert_fa_rule(euler_rotate(x32, d32, b32, f32, positions=pos, layout=layout), torch32, ref, floor=1e-6)
    rb = rotate_backward_reference(x, gy, delta, beta, freqs, p2, layout=layout, need_freqs_grad=True)
    tb = rotate_backward_reference(x32, g32, d32, b32, f32, p2, layout=layout, need_freqs_grad=True)
    kb = R._rotate_backward(x32, g32, d32, b32, f32, p2, layout=layout, need_freqs_grad=True)
    for k_, t_, r_ in zip(kb, tb, rb):
        assert_fa_rule(k_, t_, r_, floor=1e-5 * max(1.0, r_.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_cpu(dtype):
    x, delta, beta, freqs, pos = make(dtype=F64)
    xl = x.to(dtype).requires_grad_()
    out = euler_rotate(xl, delta.float(), beta.float(), freqs.float(), positions=pos)
    assert out.dtype == dtype
    ref = polar_rotate(xl.detach(), delta, beta, freqs, pos)
    same = R.rotate_reference(xl.detach(), delta.float(), beta.float(), freqs.float(), pos[None], dtype=torch.float32)
    assert_fa_rule(out, same.to(dtype), ref, floor=1e-6)
    out.sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad.float()).all()


def test_param_dtypes_follow_parameters():
    x, delta, beta, freqs, pos = make(dtype=torch.float32)
    d64 = delta.double().requires_grad_()
    b16 = beta.bfloat16().requires_grad_()
    out = euler_rotate(x, d64, b16, freqs, positions=pos)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert d64.grad.dtype == F64 and b16.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# the internal API of docs/design.md, "Attention"

def test_internal_api_contract():
    x, delta, beta, freqs, pos = make(B=2, H=4, Hx=2, L=5, d=8, dtype=torch.float32, per_head_freqs=True)
    p = pos[None]
    out = R._rotate_forward(x, delta, beta, freqs, p, layout="half")
    assert out.shape == (2, 4, 5, 8) and out.dtype == torch.float32
    assert torch.equal(R._rotate_forward(x, delta, beta, freqs, p, layout=0), out)
    g = torch.randn(2, 4, 5, 8)
    dx, dd, db, df = R._rotate_backward(x, g, delta, beta, freqs, p, layout="half", need_freqs_grad=True)
    assert dx.shape == x.shape and dx.dtype == torch.float32
    assert dd.shape == (4, 4) and db.shape == (4, 4) and df.shape == freqs.shape
    dx2, dd2, db2, df2 = R._rotate_backward(x, g, delta, None, freqs, p, layout="half", need_freqs_grad=False)
    assert db2 is None and df2 is None
    # the grads of a single op call (autograd) equal the internal backward
    xs = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    (euler_rotate(*xs, positions=pos) * g).sum().backward()
    for a, b in zip((dx, dd, db, df), xs):
        assert torch.equal(a, b.grad)


def test_rotate_qk_one_call_matches_two():
    q, delta, beta, freqs, _ = make(B=2, H=4, Hx=4, L=6, d=8)
    k = make(B=2, H=4, Hx=1, L=9, d=8, seed=3)[0]
    qp, kp = torch.arange(6) + 3, torch.arange(9)
    a = [t.clone().requires_grad_() for t in (q, k, delta, beta, freqs)]
    b = [t.clone().requires_grad_() for t in (q, k, delta, beta, freqs)]
    qr, kr = R.euler_rotate_qk(*a, q_positions=qp, k_positions=kp)
    qr2 = euler_rotate(b[0], b[2], b[3], b[4], positions=qp)
    kr2 = euler_rotate(b[1], b[2], None, b[4], positions=kp, is_query=False)
    assert torch.equal(qr, qr2) and torch.equal(kr, kr2)
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    ((qr * gq).sum() + (kr * gk).sum()).backward()
    ((qr2 * gq).sum() + (kr2 * gk).sum()).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 2, 0, 8)])
def test_empty_inputs(shape):
    x = torch.zeros(shape, dtype=F64, requires_grad=True)
    delta = torch.randn(4, 4, dtype=F64, requires_grad=True)
    beta = torch.randn(4, 4, dtype=F64, requires_grad=True)
    out = euler_rotate(x, delta, beta, default_freqs(8, dtype=F64))
    assert out.shape == (shape[0], 4, shape[2], 8)
    out.sum().backward()
    assert torch.equal(delta.grad, torch.zeros_like(delta)) and torch.equal(beta.grad, torch.zeros_like(beta))


# ------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile

def test_opcheck():
    x, delta, beta, freqs, pos = make(B=2, H=4, Hx=2, L=5, d=8, per_head_freqs=True)
    p = pos[None]
    for args in ((x, delta, beta, freqs, p, 0), (x.float(), delta.float(), None, freqs.float(), p, 1)):
        rg = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
        torch.library.opcheck(torch.ops.complexformer.euler_rotate.default, tuple(rg))
    g = torch.randn(2, 4, 5, 8, dtype=F64)
    torch.library.opcheck(torch.ops.complexformer.euler_rotate_backward.default,
                          (x, g, delta, beta, freqs, p, 0, True))
    torch.library.opcheck(torch.ops.complexformer.euler_rotate_backward.default,
                          (x, g, delta, None, freqs, p, 1, False))
    k = make(B=2, H=4, Hx=1, L=3, d=8, seed=2)[0]
    qk_args = tuple(t.clone().requires_grad_() for t in (x, k, delta, beta, freqs)) + (p, torch.arange(3)[None], 0)
    torch.library.opcheck(torch.ops.complexformer.euler_rotate_qk.default, qk_args)


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, delta, beta, freqs, pos = make(B=2, H=4, Hx=2, L=5, d=8, dtype=torch.float32)

    def f(x, delta, beta, freqs):
        q = euler_rotate(x, delta, beta, freqs, positions=pos, layout="interleaved")
        k = euler_rotate(x, delta, None, freqs, is_query=False)
        return (q * k).sum()

    a = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    b = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(*a).backward()
    f(*b).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# properties over shapes, strides and layouts

@st.composite
def cases(draw):
    B = draw(st.sampled_from([1, 3]))
    L = draw(st.integers(1, 130))
    d = draw(st.sampled_from([2, 8, 32, 64, 128]))
    H, Hx = draw(st.sampled_from([(1, 1), (2, 1), (4, 4), (4, 2), (6, 3), (8, 1)]))
    layout = draw(st.sampled_from(["half", "interleaved"]))
    strided = draw(st.sampled_from(["contiguous", "bhld_from_blhd", "sliced", "last_dim_strided"]))
    per_head = draw(st.booleans())
    batch_pos = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return B, L, d, H, Hx, layout, strided, per_head, batch_pos, seed


def strided_view(x, kind):
    B, Hx, L, d = x.shape
    if kind == "bhld_from_blhd":  # what a (B, L, H*d) projection viewed as heads gives
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":
        big = torch.zeros(B + 1, Hx + 2, L + 3, d + 4, dtype=x.dtype)
        big[1:, 1:Hx + 1, 2:L + 2, 4:] = x
        return big[1:, 1:Hx + 1, 2:L + 2, 4:]
    if kind == "last_dim_strided":
        big = torch.zeros(B, Hx, L, 2 * d, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


@given(cases())
def test_property_forward_backward(case):
    B, L, d, H, Hx, layout, strided, per_head, batch_pos, seed = case
    x, delta, beta, freqs, pos = make(B=B, H=H, Hx=Hx, L=L, d=d, per_head_freqs=per_head,
                                      batch_pos=batch_pos, seed=seed, layout=layout)
    xv = strided_view(x, strided).detach().requires_grad_()  # a leaf that keeps the view's strides
    assert torch.equal(xv, x)
    params = [t.clone().requires_grad_() for t in (delta, beta, freqs)]
    out = euler_rotate(xv, *params, positions=pos, layout=layout)
    ref_in = [t.clone().requires_grad_() for t in (x, delta, beta, freqs)]
    ref = polar_rotate(*ref_in, pos, layout)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    gy = torch.randn(B, H, L, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    (out * gy).sum().backward()
    (ref * gy).sum().backward()
    for u, v in zip([xv] + params, ref_in):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-8, atol=1e-8 * max(1, B * L))


# ------------------------------------------------------------------------------------------------
# bad inputs

def _bad_cases():
    x, delta, beta, freqs, pos = make(B=2, H=4, Hx=2, L=5, d=8)
    return [
        (dict(x=x[..., :7]), ValueError, "x: the head dimension"),
        (dict(x=x[0]), ValueError, "x: expected 4"),
        (dict(x=x.long()), TypeError, "x: dtype"),
        (dict(delta=delta[:, :3]), ValueError, "delta: expected shape"),
        (dict(delta=delta[None]), ValueError, "delta: expected 2"),
        (dict(beta=beta[:3]), ValueError, "beta: expected shape"),
        (dict(beta=None), ValueError, "beta: required"),
        (dict(freqs=freqs[:3]), ValueError, "freqs: expected shape"),
        (dict(freqs=torch.ones(3, 4, dtype=F64)), ValueError, "freqs: expected shape"),
        (dict(delta=delta[:3], beta=beta[:3]), ValueError, "x: its 2 heads must divide"),
        (dict(positions=pos[:3]), ValueError, "positions: expected shape"),
        (dict(positions=pos.float()), TypeError, "positions: dtype"),
        (dict(positions=torch.zeros(3, 5, dtype=torch.long)), ValueError, "positions: expected shape"),
        (dict(layout="rope"), ValueError, "layout"),
        (dict(delta=delta.long()), TypeError, "delta: dtype"),
    ]


@pytest.mark.parametrize("i", range(15))
def test_bad_inputs_raise(i):
    x, delta, beta, freqs, pos = make(B=2, H=4, Hx=2, L=5, d=8)
    kw = dict(x=x, delta=delta, beta=beta, freqs=freqs, positions=pos, layout="half")
    over, exc, match = _bad_cases()[i]
    kw.update(over)
    with pytest.raises(exc, match=match):
        euler_rotate(kw.pop("x"), kw.pop("delta"), kw.pop("beta"), kw.pop("freqs"), **kw)


def test_bad_cases_count():
    assert len(_bad_cases()) == 15


def test_kernel_bindings_reject_bad_tensors():
    """The C layer checks shapes itself (a wrong internal call raises, never reads out of bounds)."""
    from complexformer import _C
    from complexformer._ext import dl, dl_opt
    x, delta, beta, freqs, pos = make(B=2, H=4, Hx=2, L=5, d=8)
    out = torch.empty(2, 4, 5, 8, dtype=F64)
    with pytest.raises(ValueError, match="out"):
        _C.rotate_fwd(dl(x), dl(delta), dl(beta), dl(freqs), dl(pos[None]), dl(out[:, :3]), 0, 1, 0)
    with pytest.raises(TypeError, match="delta"):
        _C.rotate_fwd(dl(x), dl(delta.float()), dl(beta), dl(freqs), dl(pos[None]), dl(out), 0, 1, 0)
    with pytest.raises(ValueError, match="positions"):
        _C.rotate_fwd(dl(x), dl(delta), dl_opt(None), dl(freqs), dl(pos[None, :4]), dl(out), 0, 1, 0)
    with pytest.raises(ValueError, match="layout"):
        _C.rotate_fwd(dl(x), dl(delta), dl(beta), dl(freqs), dl(pos[None]), dl(out), 2, 1, 0)
