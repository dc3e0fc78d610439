"""cmha_attention on CUDA: fused and sdpa backends in float16 / bfloat16 / float32 against the
pair-by-pair float64 reference, by the FlashAttention rule (error <= 2x the error of the same
math done by PyTorch in that dtype + a small floor). Skipped without a GPU (tests/conftest.py)."""
import math

import pytest
import torch

from complexformer import cmha_attention
from complexformer import attention as A

from oracles import assert_fa_rule, attn_inputs, max_err
from test_attn_api import CASES, _kpm, pairwise

pytestmark = pytest.mark.cuda
DEV = "cuda"
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5}
CUDA_CASES = ["causal", "noncausal", "decode", "chunked_prefill", "lq_gt_lk", "q_offset", "kpm", "cu_seqlens",
              "mqa", "mha", "interleaved", "per_head_freqs", "positions"]


def _dtypes(backend):
    return [torch.float16, torch.bfloat16] + ([torch.float32] if backend == "sdpa" else [])


def _inputs(case, d, grad=False):
    shape, kw = CASES[case]
    shape = {**shape, "d": d, "dv": d}
    shape["Lq"], shape["Lk"] = 3 * shape.get("Lq", 6) + 50, 3 * shape.get("Lk", 6) + 50  # cross tile edges
    if case == "decode":
        shape["Lq"] = 1
    kw = dict(kw)
    ts = attn_inputs(**shape, device=DEV, grad=grad)
    B, Lq, Lk = ts[0].shape[0], ts[0].shape[2], ts[1].shape[2]
    if kw.get("key_padding_mask") == "kpm":
        kw["key_padding_mask"] = _kpm(B, Lk).to(DEV)
    if kw.get("positions") == "custom":
        kw["positions"] = (torch.randint(0, 5000, (B, Lq), device=DEV), torch.arange(Lk, device=DEV) * 3)
    if "cu_seqlens" in kw:
        kw["cu_seqlens"] = torch.tensor([0, 7, 7, 40, Lq], dtype=torch.int32, device=DEV)
    return ts, kw


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_forward_backward_fa_rule(backend, d, case):
    ts64, kw = _inputs(case, d, grad=True)
    ref = pairwise(*ts64, **kw)
    gout = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, ts64, gout)
    for dtype in _dtypes(backend):
        # the parameters stay float32 (as a module keeps them); q, k, v in the low-precision dtype
        ts = [t.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(ts64)]
        out = cmha_attention(*ts, backend=backend, **kw)
        base = cmha_attention(*ts, backend="reference", **kw)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert_fa_rule(out, base, ref, floor=FLOOR[dtype], what=f"{backend} {dtype} fwd")
        g = torch.autograd.grad(out, ts, gout.to(dtype))
        gb = torch.autograd.grad(base, ts, gout.to(dtype))
        for name, a, b, r in zip("q k v delta beta freqs".split(), g, gb, gref):  # floor relative to max(1, |r|)
            assert_fa_rule(a, b, r, floor=FLOOR[dtype] * max(1.0, r.abs().max().item()),
                           what=f"{backend} {dtype} grad {name}")


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_cuda_fully_masked_rows(backend):
    q, k, v, delta, beta, freqs = attn_inputs(B=3, H=4, Hkv=2, Lq=70, Lk=90, d=64, device=DEV)
    q, k, v = (t.half().requires_grad_() for t in (q, k, v))
    kpm = torch.ones(3, 90, dtype=torch.bool, device=DEV)
    kpm[1] = False
    out = cmha_attention(q, k, v, delta.float(), beta.float(), freqs.float(), key_padding_mask=kpm, backend=backend)
    assert (out[1] == 0).all() and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_cuda_auto_choice():
    for dtype, d in [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 32)]:
        ts = attn_inputs(B=1, H=4, Hkv=2, Lq=64, Lk=64, d=d, device=DEV)
        ts = [t.to(dtype if i < 3 else torch.float32) for i, t in enumerate(ts)]
        p = A._validate(*ts, True, None, None, None, None, "half", "auto", None)
        choice = A._auto_backend(ts[0], p)
        assert choice in ("fused", "sdpa")
        if choice == "fused":
            assert A._fused_unsupported(ts[0], p) is None
        out = cmha_attention(*ts)
        ref = cmha_attention(*ts, backend="reference")
        assert max_err(out, ref) < 5e-2


def test_cuda_fused_unsupported_raises_and_auto_falls_back():
    ts = attn_inputs(B=1, H=2, Hkv=1, Lq=8, Lk=8, d=32, device=DEV)
    ts = [t.to(torch.float16 if i < 3 else torch.float32) for i, t in enumerate(ts)]
    with pytest.raises(RuntimeError, match="fused"):
        cmha_attention(*ts, backend="fused")
    ts32 = [t.float() for t in ts]
    with pytest.raises(RuntimeError, match="fused"):
        cmha_attention(*ts32[:3], *ts32[3:], backend="fused")
    assert torch.isfinite(cmha_attention(*ts)).all()


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("masking", ["kpm", "cu_seqlens"])
def test_cuda_graph_capture(backend, masking):
    B = 2 if masking == "kpm" else 1
    ts = attn_inputs(B=B, H=4, Hkv=2, Lq=96, Lk=96, d=64, device=DEV)
    q, k, v = (t.half().requires_grad_() for t in ts[:3])
    delta, beta, freqs = (t.float().requires_grad_() for t in ts[3:])
    if masking == "kpm":
        kw = dict(key_padding_mask=_kpm(2, 96).to(DEV))
    else:  # no host sync while capturing: cu_seqlens' value checks are skipped then
        kw = dict(cu_seqlens=torch.tensor([0, 10, 50, 96], dtype=torch.int32, device=DEV))
    args = (q, k, v, delta, beta, freqs)

    def step():
        out = cmha_attention(*args, backend=backend, **kw)
        return out, torch.autograd.grad(out.float().square().sum(), args)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()  # warm up (allocator, lazy init) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        s_out, s_grads = step()
    with torch.no_grad():
        for t in args:
            t.copy_(torch.randn_like(t) * (0.3 if t.dim() == 2 else 1.0))
    g.replay()
    torch.cuda.synchronize()
    e_out, e_grads = step()
    # fused: deterministic, so bitwise equal; torch's SDPA backward may use atomics
    tol = dict(atol=0, rtol=0) if backend == "fused" else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(s_out, e_out, **tol)
    for a, b in zip(s_grads, e_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_cuda_compile_fullgraph(backend):
    ts = attn_inputs(B=1, H=4, Hkv=2, Lq=80, Lk=80, d=64, device=DEV)
    ts = [t.to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(ts)]

    def f(*xs):
        return cmha_attention(*xs, backend=backend)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(*ts)
    ref = f(*ts)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(torch.autograd.grad(out.float().sum(), ts), torch.autograd.grad(ref.float().sum(), ts)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["fused"])  # sdpa: torch's flash backward may use atomics
def test_cuda_param_grads_deterministic(backend):
    ts = attn_inputs(B=2, H=8, Hkv=2, Lq=257, Lk=257, d=64, device=DEV)
    ts = [t.to(torch.float16 if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(ts)]
    gout = torch.randn(2, 8, 257, 64, device=DEV, dtype=torch.float16)
    runs = [torch.autograd.grad(cmha_attention(*ts, backend=backend), ts[3:], gout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_side_stream_and_device_index():
    """Work runs on the caller's current stream (no implicit sync with the default stream)."""
    ts = attn_inputs(B=1, H=4, Hkv=4, Lq=128, Lk=128, d=128, device=DEV)
    ts = [t.to(torch.bfloat16 if i < 3 else torch.float32) for i, t in enumerate(ts)]
    ref = cmha_attention(*ts, backend="fused")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = cmha_attention(*ts, backend="fused")
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_cuda_long_sequence_fused():
    ts = attn_inputs(B=1, H=2, Hkv=1, Lq=2048, Lk=2048, d=64, device=DEV)
    ts16 = [t.to(torch.float16 if i < 3 else torch.float32) for i, t in enumerate(ts)]
    out = cmha_attention(*ts16, backend="fused")
    ref = cmha_attention(*ts, backend="reference")  # float64 factorised form: exact to ~1e-15 (tested on CPU)
    base = cmha_attention(*ts16, backend="reference")
    e, _ = assert_fa_rule(out, base, ref, floor=FLOOR[torch.float16])
    assert math.isfinite(e)


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_cuda_non_contiguous_bshd(backend):
    """q, k, v as (B, L, H, d) storage viewed as (B, H, L, d), as a projection reshape gives them."""
    ts = attn_inputs(B=2, H=4, Hkv=2, Lq=70, Lk=70, d=64, device=DEV)
    ref = pairwise(*ts)
    q, k, v = (t.half().transpose(1, 2).contiguous().transpose(1, 2) for t in ts[:3])
    out = cmha_attention(q, k, v, *ts[3:], backend=backend)
    base = cmha_attention(q, k, v, *ts[3:], backend="reference")
    assert_fa_rule(out, base, ref, floor=FLOOR[torch.float16])


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["causal", "kpm", "lq_gt_lk", "mqa", "cu_seqlens"])
def test_cuda_return_lse_fa_rule(backend, d, case):
    """lse and the gradients through out and lse (the kernels' dlse) against the float64 pairwise
    reference, by the FlashAttention rule; then a key split in two halves merged by the lse."""
    from complexformer.reference import cmha_attention_pairwise
    from test_attn_lse import run_split

    ts64, kw = _inputs(case, d, grad=True)
    pkw = dict(kw)
    if pkw.get("positions") is not None:
        pkw["q_pos"], pkw["k_pos"] = pkw.pop("positions")
    ref, ref_lse = cmha_attention_pairwise(*ts64, **pkw)
    fin = torch.isfinite(ref_lse)
    gout, glse = torch.randn_like(ref), torch.randn_like(ref_lse)
    gref = torch.autograd.grad((ref * gout).sum() + (ref_lse.where(fin, 0) * glse).sum(), ts64)
    for dtype in (torch.float16, torch.bfloat16):
        ts = [t.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(ts64)]
        out, lse = cmha_attention(*ts, backend=backend, return_lse=True, **kw)
        base, base_lse = cmha_attention(*ts, backend="reference", return_lse=True, **kw)
        assert lse.dtype == torch.float32 and torch.equal(torch.isneginf(lse), ~fin)
        assert_fa_rule(lse.where(fin, 0), base_lse.where(fin, 0), ref_lse.where(fin, 0), floor=FLOOR[dtype],
                       what=f"{backend} {dtype} lse")
        loss = lambda o, s: (o.float() * gout).sum() + (s.where(fin, 0) * glse).sum()  # noqa: E731
        g = torch.autograd.grad(loss(out, lse), ts)
        gb = torch.autograd.grad(loss(base, base_lse), ts)
        for name, a, b, r in zip("q k v delta beta freqs".split(), g, gb, gref):  # floor relative to max(1, |r|)
            assert_fa_rule(a, b, r, floor=FLOOR[dtype] * max(1.0, r.abs().max().item()),
                           what=f"{backend} {dtype} grad {name}")
        if case != "cu_seqlens":  # packed calls cannot be split by key index
            Lk = ts[1].shape[2]
            mo, ml = run_split(ts, kw, [0, Lk // 2, Lk], backend)
            assert mo.dtype == dtype
            assert_fa_rule(mo, base, ref, floor=FLOOR[dtype], what="split out")
            assert_fa_rule(ml.where(fin, 0), base_lse.where(fin, 0), ref_lse.where(fin, 0), floor=FLOOR[dtype],
                           what="split lse")
