"""The CMHA nn.Module: parameters and init, exactness against the float64 pair-by-pair reference,
the K/V cache, padded / packed batches, gradients, dtype handling, bad input, torch.compile."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

from complexformer import CMHA
from complexformer.module import CMHACache
from complexformer.reference import cmha_attention_pairwise, default_freqs
from oracles import assert_fa_rule


CPU_BACKENDS = ["auto", "fused", "sdpa", "reference"]


def make(E=32, H=4, Hkv=None, dtype=torch.float64, device="cpu", randomize=True, **kw):
    m = CMHA(E, H, num_kv_heads=Hkv, dtype=dtype, device=device, **kw)
    if randomize:  # beta = 0 and the small delta of the init would hide bugs in the phase terms
        with torch.no_grad():
            m.delta.normal_(0, 1.0)
            m.beta.uniform_(-math.pi, math.pi)
            if m.learnable_freqs:
                m.freqs.mul_(torch.empty_like(m.freqs).uniform_(0.5, 1.5))
    return m


def ref_forward(m, x, *, key_padding_mask=None, q_pos=None, k_pos=None, q_offset=None, cu_seqlens=None,
                past=None):
    """CMHA by hand in float64: projections, then reference.cmha_attention_pairwise, then o_proj.
    past: (k_x, v_x) extra raw inputs prepended to the keys (for the cache tests)."""
    B, L, E = x.shape
    H, Hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    x = x.double()

    def proj(lin, t, heads):
        y = t @ lin.weight.double().T
        if lin.bias is not None:
            y = y + lin.bias.double()
        return y.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    q, k, v = proj(m.q_proj, x, H), proj(m.k_proj, x, Hkv), proj(m.v_proj, x, Hkv)
    out, _ = cmha_attention_pairwise(q, k, v, m.delta.double(), m.beta.double(), m.freqs.double(),
                                     causal=m.causal, scale=m.scale, q_offset=q_offset,
                                     key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                     layout=m.layout, q_pos=q_pos, k_pos=k_pos)
    out = out.transpose(1, 2).reshape(B, L, H * d) @ m.o_proj.weight.double().T
    if m.o_proj.bias is not None:
        out = out + m.o_proj.bias.double()
    return out


# ---------------------------------------------------------------------------------------- params
def test_parameters_shapes_and_names():
    m = CMHA(64, 8, num_kv_heads=2)
    assert (m.head_dim, m.num_heads, m.num_kv_heads) == (8, 8, 2)
    assert m.q_proj.weight.shape == (64, 64) and m.o_proj.weight.shape == (64, 64)
    assert m.k_proj.weight.shape == (16, 64) and m.v_proj.weight.shape == (16, 64)
    assert all(p.bias is None for p in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))
    assert m.delta.shape == m.beta.shape == (8, 4)
    assert isinstance(m.delta, torch.nn.Parameter) and isinstance(m.beta, torch.nn.Parameter)
    assert not isinstance(m.freqs, torch.nn.Parameter) and m.freqs.shape == (4,)
    assert m.freqs.dtype == torch.float32
    torch.testing.assert_close(m.freqs, default_freqs(8, 10000.0))
    names = {n for n, _ in m.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "delta", "beta"}
    assert "freqs" not in m.state_dict()  # derived from rope_base

    m = CMHA(64, 8, learnable_freqs=True, bias=True, rope_base=500.0)
    assert isinstance(m.freqs, torch.nn.Parameter) and m.freqs.shape == (8, 4)
    torch.testing.assert_close(m.freqs, default_freqs(8, 500.0).expand(8, 4))
    assert "freqs" in m.state_dict()
    assert all(p.bias is not None and (p.bias == 0).all() for p in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))


def test_init_statistics():
    torch.manual_seed(1)
    m = CMHA(1024, 4)  # d = 256, h = 128: 512 delta samples
    h = m.head_dim // 2
    std = m.delta.std().item()
    assert abs(std - 1 / math.sqrt(h)) < 0.15 / math.sqrt(h), std  # std is 1/sqrt(h), not the variance
    assert abs(m.delta.mean().item()) < 0.2 / math.sqrt(h)
    assert (m.beta == 0).all()
    for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert lin.weight.abs().max() <= bound
        assert abs(lin.weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_extra_repr_and_reset():
    m = CMHA(32, 4, num_kv_heads=2, scale=1.0, layout="interleaved", backend="reference")
    r = repr(m)
    for s in ("embed_dim=32", "num_heads=4", "num_kv_heads=2", "head_dim=8", "causal=True", "scale=1",
              "layout='interleaved'", "backend='reference'", "q_proj", "o_proj"):
        assert s in r, (s, r)
    with torch.no_grad():
        m.beta.fill_(3.0)
    m.reset_parameters()
    assert (m.beta == 0).all()


def test_dtype_and_device_handling():
    m = CMHA(32, 4, dtype=torch.bfloat16)
    assert m.q_proj.weight.dtype == m.delta.dtype == m.beta.dtype == torch.bfloat16
    assert m.freqs.dtype == torch.float32  # omega * position needs float32
    m = CMHA(32, 4).to(torch.bfloat16)
    assert m.delta.dtype == torch.bfloat16 and m.freqs.dtype == torch.float32
    torch.testing.assert_close(m.freqs, default_freqs(8, 10000.0), rtol=0, atol=0)
    m = m.double()
    assert m.delta.dtype == torch.float64 and m.freqs.dtype == torch.float64
    torch.testing.assert_close(m.freqs, default_freqs(8, 10000.0, dtype=torch.float64), rtol=0, atol=0)
    m = CMHA(32, 4, learnable_freqs=True).to(torch.bfloat16)
    assert m.freqs.dtype == torch.bfloat16  # a parameter follows the module like any other
    m = CMHA(32, 4, device="meta")
    assert m.delta.device.type == "meta" and m.freqs.device.type == "meta"


# ---------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [
    dict(),
    dict(Hkv=2),
    dict(Hkv=1, layout="interleaved"),
    dict(learnable_freqs=True, bias=True),
    dict(causal=False, scale=1.0, rope_base=100.0),
], ids=["mha", "gqa", "mqa-interleaved", "learnable-bias", "noncausal-scale1"])
def test_forward_matches_reference(cfg, backend):
    m = make(backend=backend, **cfg)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref_forward(m, x), rtol=1e-9, atol=1e-9)


def test_forward_float32_close_to_reference():
    m = make(dtype=torch.float32, Hkv=2)
    x = torch.randn(2, 33, 32)
    err = (m(x).double() - ref_forward(m, x)).abs().max().item()
    assert err < 1e-4, err


def test_noncontiguous_input():
    m = make()
    x = torch.randn(7, 2, 32, dtype=torch.float64).transpose(0, 1)  # (2, 7, 32), non-contiguous
    torch.testing.assert_close(m(x), ref_forward(m, x.contiguous()), rtol=1e-9, atol=1e-9)


def test_empty_sequence():
    m = make()
    x = torch.randn(2, 0, 32, dtype=torch.float64)
    assert m(x).shape == (2, 0, 32)


# ---------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("prefill", [1, 5])
def test_cached_decoding_equals_full_forward(Hkv, prefill):
    m = make(Hkv=Hkv)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = m(x)
    out, cache = m(x[:, :prefill], use_cache=True)
    outs = [out]
    for t in range(prefill, 9):
        out, cache = m(x[:, t:t + 1], past_key_value=cache, use_cache=True)
        outs.append(out)
    assert isinstance(cache, CMHACache) and cache.positions is None
    assert cache.key.shape == (2, Hkv, 9, 8) and cache.value.shape == (2, Hkv, 9, 8)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


def test_cache_chunks_and_plain_tuple():
    m = make(Hkv=2, learnable_freqs=True)
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    full = m(x)
    a, cache = m(x[:, :4], use_cache=True)
    b, cache = m(x[:, 4:7], past_key_value=(cache.key, cache.value), use_cache=True)  # plain tuple
    c = m(x[:, 7:], past_key_value=cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-9, atol=1e-9)


def test_cache_stores_raw_keys():
    m = make(Hkv=2)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    _, cache = m(x, use_cache=True)
    k = (x @ m.k_proj.weight.T).view(2, 5, 2, 8).transpose(1, 2)
    v = (x @ m.v_proj.weight.T).view(2, 5, 2, 8).transpose(1, 2)
    torch.testing.assert_close(cache.key, k)
    torch.testing.assert_close(cache.value, v)


def test_cached_float32_decoding():
    m = make(dtype=torch.float32, Hkv=2)
    x = torch.randn(2, 12, 32)
    full = m(x)
    out, cache = m(x[:, :6], use_cache=True)
    outs = [out]
    for t in range(6, 12):
        out, cache = m(x[:, t:t + 1], past_key_value=cache, use_cache=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- padding, packing
def _left_padded(x_list, E):
    L = max(t.shape[1] for t in x_list)
    x = torch.zeros(len(x_list), L, E, dtype=x_list[0].dtype)
    mask = torch.zeros(len(x_list), L, dtype=torch.long)  # an HF-style 0/1 attention mask
    for b, t in enumerate(x_list):
        x[b, L - t.shape[1]:] = t[0]
        mask[b, L - t.shape[1]:] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return x, mask, pos


# (device, dtype, backend, tolerance): CPU in float64, tight; CUDA with the fused kernel in bfloat16
# (what "auto" takes with a padding mask on CUDA; the CUDA kernel is a tensor-core kernel, no float32)
# and with rotate + SDPA in float32.
PAD_CASES = [
    pytest.param("cpu", torch.float64, "auto", 1e-9, id="cpu-f64"),
    pytest.param("cuda", torch.bfloat16, "fused", 3e-2, id="cuda-bf16-fused", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float32, "sdpa", 1e-4, id="cuda-f32-sdpa", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("device,dtype,backend,tol", PAD_CASES)
@pytest.mark.parametrize("Hkv", [4, 2])
def test_left_padded_batch_equals_unpadded(Hkv, device, dtype, backend, tol):
    d = 8 if device == "cpu" else 64
    m = make(E=4 * d, Hkv=Hkv, dtype=dtype, device=device, backend=backend)
    lens = [6, 3, 1]
    seqs = [torch.randn(1, n, 4 * d, dtype=dtype) for n in lens]
    x, mask, pos = _left_padded(seqs, 4 * d)
    out = m(x.to(device), key_padding_mask=mask.to(device), position_ids=pos.to(device))
    for b, (s, n) in enumerate(zip(seqs, lens)):
        torch.testing.assert_close(out[b, 6 - n:], m(s.to(device))[0], rtol=tol, atol=tol)
    assert torch.isfinite(out).all()  # padded query rows see no key: 0 before o_proj, never NaN
    torch.testing.assert_close(out[2, :5].cpu(), torch.zeros(5, 4 * d, dtype=dtype))


@pytest.mark.parametrize("device,dtype,backend,tol", PAD_CASES)
def test_left_padded_generation_with_cache(device, dtype, backend, tol):
    d = 8 if device == "cpu" else 64
    m = make(E=4 * d, Hkv=2, dtype=dtype, device=device, backend=backend)
    lens, new = [5, 2], 3
    seqs = [torch.randn(1, n + new, 4 * d, dtype=dtype, device=device) for n in lens]
    x, mask, pos = _left_padded([s[:, :n].cpu() for s, n in zip(seqs, lens)], 4 * d)
    x, mask, pos = x.to(device), mask.to(device), pos.to(device)
    out, cache = m(x, key_padding_mask=mask, position_ids=pos, use_cache=True)
    assert cache.positions.shape == (2, 5)
    outs = [out]
    for t in range(new):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device=device)], 1)
        step = torch.stack([s[0, n + t] for s, n in zip(seqs, lens)])[:, None]
        pos_kw = {} if t == 0 else {"position_ids": cache.positions[:, -1:] + 1}  # both ways
        out, cache = m(step, key_padding_mask=mask, past_key_value=cache, use_cache=True, **pos_kw)
        outs.append(out)
    out = torch.cat(outs, 1)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        torch.testing.assert_close(out[b, 5 - n:], m(s)[0], rtol=tol, atol=tol)


def test_position_ids_shift_invariance():
    # scores depend on p_m - p_n only: shifting every position changes nothing
    m = make()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    pos = torch.arange(6)[None].expand(2, 6) + torch.tensor([[100], [7]])
    torch.testing.assert_close(m(x, position_ids=pos), m(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m(x, position_ids=torch.arange(6)), m(x), rtol=1e-9, atol=1e-9)


def test_position_ids_match_reference():
    m = make(Hkv=2)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    pos = torch.tensor([[0, 2, 3, 7, 8, 20], [5, 4, 3, 2, 1, 0]])
    torch.testing.assert_close(m(x, position_ids=pos), ref_forward(m, x, q_pos=pos, k_pos=pos),
                               rtol=1e-9, atol=1e-9)


def test_packed_batch_equals_separate_runs():
    m = make(Hkv=2)
    lens = [4, 1, 6]
    seqs = [torch.randn(1, n, 32, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    out = m(torch.cat(seqs, 1), cu_seqlens=cu)
    torch.testing.assert_close(out, torch.cat([m(s) for s in seqs], 1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, ref_forward(m, torch.cat(seqs, 1), cu_seqlens=cu), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("learnable", [False, True])
def test_backward_reaches_all_parameters(learnable):
    m = make(dtype=torch.float32, Hkv=2, learnable_freqs=learnable, bias=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    if not learnable:
        assert not m.freqs.requires_grad


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradients_match_reference(backend):
    m = make(Hkv=2, learnable_freqs=True, backend=backend)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    g = torch.randn(2, 5, 32, dtype=torch.float64)
    params = dict(m.named_parameters())
    got = torch.autograd.grad((m(x) * g).sum(), list(params.values()))
    want = torch.autograd.grad((ref_forward(m, x) * g).sum(), list(params.values()))
    for name, a, b in zip(params, got, want):
        # relative 1e-6, not 1e-12: the rotation kernel's bounded backward (docs/design.md, "Deviations")
        # differs from autograd of r = sqrt(re^2 + im^2 + eps_r) by O(eps_r / r^2) ~ 1e-8 in dq, dk.
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-6, (name, rel)


def test_gradcheck_tiny_module():
    m = make(E=8, H=2, Hkv=1, learnable_freqs=True)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    names = ["delta", "beta", "freqs", "q_proj.weight", "k_proj.weight"]
    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters() if n in names}
    mask = torch.tensor([[True, False, True]])

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(params, ps)), (x,), {"key_padding_mask": mask})

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args,kw,msg", [
    ((30, 4), {}, "divisible by num_heads"),
    ((12, 4), {}, "must be even"),
    ((32, 4), {"num_kv_heads": 3}, "divisible by num_kv_heads"),
    ((32, 0), {}, "num_heads"),
    ((32, 4), {"layout": "complex"}, "layout"),
    ((32, 4), {"backend": "flash"}, "backend"),
    ((32, 4), {"rope_base": -1.0}, "rope_base"),
])
def test_bad_constructor_args(args, kw, msg):
    with pytest.raises(ValueError, match=msg):
        CMHA(*args, **kw)


def test_bad_forward_inputs():
    m = make(Hkv=2)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 5, 31, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(5, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        m(x, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids"):
        m(x, position_ids=torch.zeros(2, 5))
    _, cache = m(x, use_cache=True)
    with pytest.raises(ValueError, match="key_padding_mask"):  # must cover the cached keys too
        m(x[:, :1], past_key_value=cache, key_padding_mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="past_key_value.key"):
        m(x[:1, :1], past_key_value=cache)
    with pytest.raises(ValueError, match="past_key_value.key"):
        m(x[:, :1], past_key_value=(cache.key.float(), cache.value))
    with pytest.raises(TypeError, match="past_key_value"):
        m(x[:, :1], past_key_value=cache.key)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x[:1], cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), use_cache=True)


# ---------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa", "reference"])
def test_compile_fullgraph_no_cache(backend):
    # aot_eager traces the full graph through the registered ops (fake kernels, autograd) without
    # paying for inductor code generation on a 2-core CI box; the CUDA test below uses inductor.
    torch._dynamo.reset()
    m = make(dtype=torch.float32, Hkv=2, backend=backend)
    x = torch.randn(2, 9, 32, requires_grad=True)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cm(x), m(x))
    cm(x).sum().backward()
    assert m.delta.grad is not None
    if backend == "auto":  # a left-padded batch (mask + position_ids) compiles too
        xp, mask, pos = _left_padded([torch.randn(1, 6, 32), torch.randn(1, 3, 32)], 32)
        torch.testing.assert_close(cm(xp, key_padding_mask=mask, position_ids=pos),
                                   m(xp, key_padding_mask=mask, position_ids=pos))


# ---------------------------------------------------------------------------------------- CUDA
def _bf16_torch(m32, x):
    """The same module run by PyTorch in bf16 (backend "reference"): the FlashAttention rule's baseline."""
    mb = CMHA(m32.embed_dim, m32.num_heads, num_kv_heads=m32.num_kv_heads, backend="reference",
              device=x.device, dtype=torch.bfloat16)
    mb.load_state_dict(m32.state_dict())
    return mb(x.bfloat16())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("Hkv", [4, 1])
def test_cuda_bf16_forward_backward(d, Hkv, backend):
    H = 4
    m = make(E=H * d, H=H, Hkv=Hkv, dtype=torch.float32, device="cuda", backend=backend)
    x = torch.randn(2, 300, H * d, device="cuda")
    ref = ref_forward(m.cpu(), x.cpu()).cuda()
    m.cuda()
    torch_bf16 = _bf16_torch(m, x)
    mb = m.to(torch.bfloat16)
    assert mb.freqs.dtype == torch.float32
    xb = x.bfloat16().requires_grad_()
    out = mb(xb)
    assert out.dtype == torch.bfloat16
    assert_fa_rule(out, torch_bf16, ref, rel_floor=1e-2)
    out.float().square().sum().backward()
    for name, p in mb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name
    assert torch.isfinite(xb.grad.float()).all()


@pytest.mark.cuda
def test_cuda_bf16_grads_close_to_float32():
    m = make(E=512, H=4, Hkv=2, dtype=torch.float32, device="cuda")
    x = torch.randn(2, 200, 512, device="cuda")
    g = torch.randn(2, 200, 512, device="cuda")
    grads32 = torch.autograd.grad((m(x) * g).sum(), [m.delta, m.beta, m.q_proj.weight])
    mb = m.to(torch.bfloat16)
    gradsb = torch.autograd.grad((mb(x.bfloat16()).float() * g).sum(), [mb.delta, mb.beta, mb.q_proj.weight])
    for a, b in zip(grads32, gradsb):
        rel = ((a - b.float()).norm() / a.norm()).item()
        assert rel < 5e-2, rel


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cache_decoding(dtype, backend):
    m = make(E=512, H=8, Hkv=2, dtype=dtype, device="cuda", backend=backend)
    x = torch.randn(2, 40, 512, device="cuda", dtype=dtype)
    if backend == "fused" and dtype == torch.float32:  # no float32 tensor-core kernel: a clear error
        with pytest.raises(RuntimeError, match="not supported by the fused CUDA kernel"):
            m(x)
        return
    with torch.no_grad():
        full = m(x)
        out, cache = m(x[:, :17], use_cache=True)
        outs = [out]
        for t in range(17, 40):
            out, cache = m(x[:, t:t + 1], past_key_value=cache, use_cache=True)
            outs.append(out)
    tol = 1e-4 if dtype == torch.float32 else 6e-2  # bf16: a few ulps of O(1) outputs
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_cuda_compile_inductor(backend):
    torch._dynamo.reset()
    m = make(E=512, H=4, dtype=torch.bfloat16, device="cuda", backend=backend)
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cm = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(cm(x), m(x), rtol=2e-2, atol=2e-2)
    cm(x).float().sum().backward()
    assert m.delta.grad is not None and torch.isfinite(m.delta.grad.float()).all()


# ---------------------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 12), split=st.integers(0, 12),
       hd=st.sampled_from([(4, 2), (4, 1), (2, 2), (6, 3)]), d=st.sampled_from([2, 6, 8]),
       layout=st.sampled_from(["half", "interleaved"]), causal=st.booleans())
def test_property_cache_split_equals_full(B, L, split, hd, d, layout, causal):
    """Any prefill/decode split, any head layout: the cached result equals one full forward, and
    the full forward equals the float64 reference."""
    H, Hkv = hd
    torch.manual_seed(B * 100 + L)
    m = make(E=H * d, H=H, Hkv=Hkv, layout=layout, causal=causal)
    x = torch.randn(B, L, H * d, dtype=torch.float64)
    full = m(x)
    torch.testing.assert_close(full, ref_forward(m, x), rtol=1e-9, atol=1e-9)
    if not causal:
        return  # a non-causal prefix cannot see the future tokens: not a decoding setting
    s = min(split, L)
    outs, cache = [], None
    if s:
        out, cache = m(x[:, :s], use_cache=True)
        outs.append(out)
    for t in range(s, L):
        out, cache = m(x[:, t:t + 1], past_key_value=cache, use_cache=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
