"""One small, odd-shaped call of every CUDA kernel (forward and backward), each checked against
the CPU path. Small enough to run under compute-sanitizer memcheck and racecheck, which
benchmarks/gpu_run.sh does with this file."""
import pytest
import torch

from complexformer import cmha_attention, euler_rotate, pdl_loss, token_counts
from complexformer.reference import default_freqs

pytestmark = pytest.mark.cuda


def _close(a, b, tol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # ||a - b|| / ||b||
    assert err <= tol, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pdl_kernels(dtype):
    N, V = 37, 1003  # odd sizes: tails of the vectorised loops
    logits = torch.randn(N, V, device="cuda").to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::5] = -100
    w = torch.rand(V, device="cuda") + 0.1
    loss = pdl_loss(logits, targets, w, label_smoothing=0.1)
    (loss * 1.5).backward()  # grad_output != 1: the scaling kernel runs
    ref_logits = logits.detach().float().cpu().requires_grad_()
    ref = pdl_loss(ref_logits, targets.cpu(), w.cpu(), label_smoothing=0.1)
    (ref * 1.5).backward()
    _close(loss, ref, 2e-2 if dtype == torch.bfloat16 else 1e-5)
    _close(logits.grad.float(), ref_logits.grad, 2e-2 if dtype == torch.bfloat16 else 1e-5)
    ids = torch.randint(0, V, (4097,), device="cuda")
    assert torch.equal(token_counts(ids, V).cpu(), torch.bincount(ids.cpu(), minlength=V))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_kernels(dtype):
    B, H, Hkv, L, d = 3, 4, 2, 19, 64
    x = torch.randn(B, Hkv, L, d, device="cuda").to(dtype).requires_grad_()
    delta = torch.randn(H, d // 2, device="cuda", requires_grad=True)
    beta = torch.randn(H, d // 2, device="cuda", requires_grad=True)
    f = default_freqs(d, device="cuda")
    y = euler_rotate(x, delta, beta, f, is_query=False)
    g = torch.randn(y.shape, device="cuda")  # |y|^2 would not depend on delta: weight by g
    (y.float() * g).sum().backward()
    xc = x.detach().float().cpu().requires_grad_()
    dc = delta.detach().cpu().requires_grad_()
    yc = euler_rotate(xc, dc, beta.detach().cpu(), f.cpu(), is_query=False)
    (yc * g.cpu()).sum().backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    _close(y.float(), yc, tol)
    _close(x.grad.float(), xc.grad, tol)
    _close(delta.grad, dc.grad, tol)


# GQA (H=4, Hkv=2: the forward rotates key tiles per CTA, the backward pre-rotates) with a mask of
# each kind, then H == Hkv (every kernel on pre-rotated q~, k~) at both head dims over several tiles.
@pytest.mark.parametrize("mode,H,Hkv,L,d", [("causal", 4, 2, 67, 64), ("kpm", 4, 2, 67, 64), ("varlen", 4, 2, 67, 64),
                                            ("causal", 2, 2, 300, 64), ("causal", 2, 2, 200, 128)])
def test_fused_attention_kernels(mode, H, Hkv, L, d):
    B = 1 if mode == "varlen" or L > 100 else 2
    q = torch.randn(B, H, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, L, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    delta = torch.randn(H, d // 2, device="cuda", requires_grad=True)
    beta = torch.randn(H, d // 2, device="cuda", requires_grad=True)
    f = default_freqs(d, device="cuda")
    kw = {}
    if mode == "kpm":
        kpm = torch.rand(B, L, device="cuda") > 0.3
        kpm[0, :5] = False
        kw["key_padding_mask"] = kpm
    if mode == "varlen":
        kw["cu_seqlens"] = torch.tensor([0, 20, 21, 67], dtype=torch.int32, device="cuda")
    out = cmha_attention(q, k, v, delta, beta, f, backend="fused", **kw)
    g = torch.randn(out.shape, device="cuda")
    (out.float() * g).sum().backward()
    ts = [t.detach().float().cpu().requires_grad_() for t in (q, k, v, delta, beta)]
    kwc = {n: t.cpu() for n, t in kw.items()}
    ref = cmha_attention(*ts, f.cpu(), backend="reference", **kwc)
    (ref * g.cpu()).sum().backward()
    _close(out.float(), ref, 3e-2)
    for g, t in zip((q.grad, k.grad, v.grad, delta.grad, beta.grad), ts):
        _close(g.float(), t.grad, 6e-2)
