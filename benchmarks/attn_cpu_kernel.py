"""Kernel-level CPU benchmark of the fused CMHA attention (_C.attn_fwd + _C.attn_bwd on CPU tensors).

Measures forward and forward+backward wall time (median of --reps) for causal float32 attention at
B=1, H=8, d=64 (sizes via flags) against the baseline "rotate q and k in PyTorch, then
F.scaled_dot_product_attention" (torch's CPU flash kernel), both on the same inputs in the same run,
and prints ratios (baseline / fused: > 1 means fused is faster). The fused numbers are the two
kernel calls only (the glue's O(L*d) rotate backward is not included; the baseline's autograd
rotate backward is). Peak extra memory of the fused kernels (their workspaces; outputs are
allocated and touched beforehand) is reported from ru_maxrss growth.
"""
import argparse
import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from complexformer import _C
from complexformer._ext import dl
from complexformer.reference import default_freqs, split_pairs


def rotate(x, delta, beta, freqs, pos):
    re, im = split_pairs(x, "half")
    r = torch.sqrt(re * re + im * im + 1e-9)
    phi = delta[:, None, :] * torch.atan2(im, re) + freqs * pos[:, None].to(x.dtype)
    if beta is not None:
        phi = phi + beta[:, None, :]
    return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], -1)


def timeit(fn, reps):
    """(median wall seconds, median process CPU seconds) per call. On a shared, oversubscribed
    machine the wall time mostly measures the neighbours; CPU time (summed over threads) is the
    steadier estimate of the cost on an idle machine."""
    fn()
    ws, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ws.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return statistics.median(ws), statistics.median(cs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    a = ap.parse_args()
    causal = not a.no_causal
    if a.threads:
        torch.set_num_threads(a.threads)
    nt = torch.get_num_threads()
    print(f"B={a.B} H={a.H} Hkv={a.Hkv} d={a.d} float32 causal={causal} threads={nt}")
    print("times: wall ms / process CPU ms; ratio = sdpa / fused (> 1: fused faster), wall and CPU")
    print(f"{'L':>6} {'fused fwd':>15} {'sdpa fwd':>15} {'ratio':>11} {'fused f+b':>15} {'sdpa f+b':>15}"
          f" {'ratio':>11} {'fused peak MB':>13}")
    for L in map(int, a.lengths.split(",")):
        B, H, Hkv, d = a.B, a.H, a.Hkv, a.d
        G = H // Hkv
        q = torch.randn(B, H, L, d)
        k = torch.randn(B, Hkv, L, d)
        v = torch.randn(B, Hkv, L, d)
        delta = 1 + 0.1 * torch.randn(H, d // 2)
        beta = 0.1 * torch.randn(H, d // 2)
        freqs = default_freqs(d)
        pos = torch.arange(L)[None]
        scale = 1 / math.sqrt(d)
        out = torch.empty(B, H, L, d)
        lse = torch.empty(B, H, L)
        dout = torch.randn(B, H, L, d)
        dq, dk, dvf = torch.empty(B, H, L, d), torch.empty(B, H, L, d), torch.empty(B, H, L, d)
        for t in (out, lse, dq, dk, dvf):  # touch the outputs so the RSS growth is the kernels' own
            t.zero_()

        def fused_fwd():
            _C.attn_fwd(dl(q), dl(k), dl(v), dl(delta), dl(beta), dl(freqs), dl(pos), dl(pos), None, None,
                        dl(out), dl(lse), int(causal), scale, 0, 0, nt, 0)

        def fused_fb():
            fused_fwd()
            _C.attn_bwd(dl(q), dl(k), dl(v), dl(delta), dl(beta), dl(freqs), dl(pos), dl(pos), None, None,
                        dl(out), dl(dout), dl(lse), None, dl(dq), dl(dk), dl(dvf), int(causal), scale, 0, 0, nt, 0)

        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        p1 = pos[0]

        def sdpa_fwd():
            with torch.no_grad():
                qr = rotate(qg, delta, beta, freqs, p1)
                kr = rotate(kg.repeat_interleave(G, 1), delta, None, freqs, p1)
                return F.scaled_dot_product_attention(qr, kr, vg.repeat_interleave(G, 1), is_causal=causal)

        def sdpa_fb():
            qr = rotate(qg, delta, beta, freqs, p1)
            kr = rotate(kg.repeat_interleave(G, 1), delta, None, freqs, p1)
            o = F.scaled_dot_product_attention(qr, kr, vg.repeat_interleave(G, 1), is_causal=causal)
            o.backward(dout)

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tf = timeit(fused_fwd, a.reps)
        tfb = timeit(fused_fb, a.reps)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        ts = timeit(sdpa_fwd, a.reps)
        tsb = timeit(sdpa_fb, a.reps)
        def fmt(t):
            return f"{t[0]*1e3:.1f}/{t[1]*1e3:.1f}"

        def ratio(a_, b_):
            return f"{a_[0]/b_[0]:.2f}/{a_[1]/b_[1]:.2f}"

        print(f"{L:>6} {fmt(tf):>15} {fmt(ts):>15} {ratio(ts, tf):>11} {fmt(tfb):>15} {fmt(tsb):>15}"
              f" {ratio(tsb, tfb):>11} {peak:>13.1f}")


if __name__ == "__main__":
    main()
