"""Fused CMHA attention CUDA kernels vs torch SDPA (FlashAttention backend), kernel level.

What it measures: the fused kernels (_C.attn_fwd, _C.attn_bwd on CUDA tensors) rotate q and k on the fly
inside the attention; the baseline is F.scaled_dot_product_attention under
sdpa_kernel(FLASH_ATTENTION) on inputs rotated beforehand (the rotation is not timed for SDPA, so
the ratio is attention-with-fused-rotation vs plain flash attention). Backward: the fused numbers
are the three backward launches (gradients w.r.t. the rotated q~, k~ and v, per query head); the
glue's back-rotation and GQA sum are not included. SDPA fwd+bwd is one autograd forward + backward.

Shapes: bf16, B * L = 16k tokens (L = 2048 by default), H * d = 2048, d in {64, 128}, causal.
FLOPs: forward 4 B H L^2 d, halved for causal; backward 2.5 x forward (the FlashAttention convention).
Peak memory: extra bytes held by the CUDA caching allocator during one call (inputs excluded).
The kernels run as the glue runs them for H == Hkv: the q_ws / k_ws workspaces are passed (a
pre-pass writes q~ and k~ and the attention kernels copy tiles with cp.async), allocated inside the
timed call as the glue does, so time and peak memory include them.
--profile adds, per shape, the GPU time of every kernel of one forward + backward (torch.profiler,
mean of 5 calls): ours next to SDPA's, to see which launch to work on.
Usage: python benchmarks/attn_cuda_kernel.py [--seqlen 2048] [--tokens 16384] [--hd 2048] [--dims 64 128]
                                             [--fwd-only] [--profile]
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import fmt_bytes, gpu_kernel_times, markdown_table, peak_bytes, time_ms  # noqa: E402

from complexformer import _C, _ext  # noqa: E402
from complexformer.reference import default_freqs, split_pairs  # noqa: E402


def rotate(x, delta, beta, freqs, pos):
    """Euler rotation (layout "half") in float32 torch math, for the SDPA baseline's inputs."""
    xf = x.float()
    re, im = split_pairs(xf, "half")
    a = freqs.double()[None, None, None, :] * pos.double()[:, None, :, None]
    off = (a - 2 * math.pi * torch.round(a / (2 * math.pi))).float()
    if beta is not None:
        off = off + beta[None, :, None, :]
    r = torch.sqrt(re * re + im * im + 1e-9)
    phi = delta[None, :, None, :] * torch.atan2(im, re) + off
    return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], -1).to(x.dtype)


def profile_kernels(label, fns, calls=5):
    """Mean GPU time per call of every kernel each fn launches (torch.profiler, after a warm-up)."""
    for name, fn in fns.items():
        rows = gpu_kernel_times(fn, calls)
        print(f"\n{label} {name}: GPU time per forward+backward {sum(r[0] for r in rows):.3f} ms")
        for t, n, key in rows:
            print(f"  {t:8.3f} ms  x{n:g}  {key[:150]}")


def bench(d, args):
    dev, dt = "cuda", torch.bfloat16
    H, L = args.hd // d, args.seqlen
    B = max(1, args.tokens // L)
    h = d // 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, d, device=dev, dtype=dt) for _ in range(3))
    delta = 1.0 + 0.3 * torch.randn(H, h, device=dev)
    beta = 0.1 * torch.randn(H, h, device=dev)
    freqs = default_freqs(d).to(dev)
    pos = torch.arange(L, device=dev)[None]
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(B, H, L, d, device=dev, dtype=dt)
    lse = torch.empty(B, H, L, device=dev)
    dout = torch.randn(B, H, L, d, device=dev, dtype=dt)
    dq, dk, dv = (torch.empty(B, H, L, d, device=dev) for _ in range(3))
    s = _ext.stream(q)
    common = lambda: (_ext.dl(q), _ext.dl(k), _ext.dl(v), _ext.dl(delta), _ext.dl(beta), _ext.dl(freqs),  # noqa: E731
                      _ext.dl(pos), _ext.dl(pos), None, None)

    def ws():  # (B, H, L, d) q~ / k~ workspaces, allocated per call like the glue does
        return tuple(_ext.dl(torch.empty(B, H, L, d, device=dev, dtype=dt)) for _ in range(2))

    def fused_fwd():
        _C.attn_fwd(*common(), _ext.dl(out), _ext.dl(lse), 1, scale, 0, 0, 1, s, *ws())

    def fused_bwd():
        _C.attn_bwd(*common(), _ext.dl(out), _ext.dl(dout), _ext.dl(lse), None, _ext.dl(dq), _ext.dl(dk),
                    _ext.dl(dv), 1, scale, 0, 0, 1, s, *ws())

    def fused_fwd_bwd():
        fused_fwd()
        fused_bwd()

    qr, kr = rotate(q, delta, beta, freqs, pos), rotate(k, delta, None, freqs, pos)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (qr, kr, v))

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            return F.scaled_dot_product_attention(qr, kr, v, is_causal=True, scale=scale)

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
        o.backward(dout)
        qg.grad = kg.grad = vg.grad = None

    if args.profile:
        profile_kernels(f"d={d}", {"cmha": fused_fwd_bwd, "sdpa": sdpa_fwd_bwd})
    ref = sdpa_fwd()
    flops_fwd = 4.0 * B * H * L * L * d / 2
    passes = [("fwd", fused_fwd, sdpa_fwd, flops_fwd)]
    if not args.fwd_only:
        passes.append(("fwd+bwd", fused_fwd_bwd, sdpa_fwd_bwd, 3.5 * flops_fwd))
    base = {name: (time_ms(fn_s, device=dev, reps=args.reps, warmup=3, max_seconds=4), peak_bytes(fn_s, device=dev))
            for name, _, fn_s, _ in passes}
    # sanity: both compute the same attention (bf16 rounding apart)
    out.fill_(float("nan"))
    fused_fwd()
    torch.cuda.synchronize()
    diff = (out.float() - ref.float()).abs().max().item()
    rows = []
    for name, fn_f, _, fl in passes:
        tf = time_ms(fn_f, device=dev, reps=args.reps, warmup=3, max_seconds=4)
        pf = peak_bytes(fn_f, device=dev)
        ts, ps = base[name]
        rows.append([f"d={d} H={H} B={B} L={L}", name, f"{tf:.3f}", f"{fl / tf / 1e9:.1f}", f"{ts:.3f}",
                     f"{fl / ts / 1e9:.1f}", f"{ts / tf:.2f}", fmt_bytes(pf), fmt_bytes(ps)])
    return rows, diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hd", type=int, default=2048, help="H * d")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times of one forward+backward")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not _ext.HAS_CUDA_KERNELS:
        sys.exit("needs a CUDA GPU and a build of complexformer with CUDA kernels")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16, causal, "
          f"B*L={args.tokens}, H*d={args.hd}")
    rows = []
    for d in args.dims:
        r, diff = bench(d, args)
        print(f"d={d}: max |fused - sdpa| on the forward output = {diff:.3e}")
        rows += r
    print("fused = CMHA kernel (rotation included); sdpa = FlashAttention on pre-rotated inputs; "
          "ratio = fused TFLOP/s / sdpa TFLOP/s (target >= 0.60 for fwd+bwd)")
    print(markdown_table(["shape", "pass", "fused ms", "fused TFLOP/s", "sdpa ms", "sdpa TFLOP/s",
                          "ratio", "fused peak", "sdpa peak"], rows), flush=True)


if __name__ == "__main__":
    main()
