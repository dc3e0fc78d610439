"""cmha_attention backends head to head: the numbers behind backend="auto" (attention._auto_backend).

Measures forward + backward (grads to q, k, v, delta, beta) of causal CMHA, median wall time,
for each backend on the same inputs in the same run, and the ratio fused / sdpa (< 1: fused
faster). Also the extra peak memory of one step (CUDA: allocator peak; CPU: RSS high-water mark
in this process, coarse).

    python benchmarks/cmha_backends.py                      # CPU, float32, B=1 H=8 d=64
    python benchmarks/cmha_backends.py --device cuda --dtype bfloat16 --L 512 1024 2048 4096
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import fmt_bytes, markdown_table, peak_bytes, time_ms  # noqa: E402

from complexformer import cmha_attention  # noqa: E402
from complexformer.reference import default_freqs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--L", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=None)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--backends", nargs="+", default=["fused", "sdpa", "reference"])
    ap.add_argument("--mask", choices=["causal", "kpm", "varlen"], default="causal",
                    help="causal only; + a key padding mask (20%% padded); packed: 4 sequences in B=1")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="cap per case (fewer reps when slow)")
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    Hkv = a.Hkv or a.H
    print(f"cmha_attention {a.mask} {'fwd' if a.fwd_only else 'fwd+bwd'}: B={a.B} H={a.H} Hkv={Hkv} d={a.d} "
          f"{a.dtype} on {dev} (threads {torch.get_num_threads()}); median ms of {a.reps} runs")
    rows = []
    for L in a.L:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(a.B, a.H, L, a.d, generator=g).to(dev, dtype).requires_grad_()
        k = torch.randn(a.B, Hkv, L, a.d, generator=g).to(dev, dtype).requires_grad_()
        v = torch.randn(a.B, Hkv, L, a.d, generator=g).to(dev, dtype).requires_grad_()
        delta = (torch.randn(a.H, a.d // 2, generator=g) / (a.d // 2) ** 0.5).to(dev).requires_grad_()
        beta = torch.zeros(a.H, a.d // 2, device=dev, requires_grad=True)
        freqs = default_freqs(a.d, device=dev)
        gout = torch.randn(a.B, a.H, L, a.d, generator=g).to(dev, dtype)
        kw = {}
        if a.mask == "kpm":
            kw["key_padding_mask"] = (torch.rand(a.B, L, generator=g) > 0.2).to(dev)
        elif a.mask == "varlen":
            if a.B != 1:
                ap.error("--mask varlen needs --B 1")
            kw["cu_seqlens"] = torch.tensor([0, L // 8, L // 2, 3 * L // 4, L], dtype=torch.int32, device=dev)
        res = {}
        for b in a.backends:
            if b == "reference" and L > 2048:
                continue

            def step(b=b):
                out = cmha_attention(q, k, v, delta, beta, freqs, backend=b, **kw)
                if not a.fwd_only:
                    torch.autograd.grad(out, (q, k, v, delta, beta), gout)

            try:
                ms = time_ms(step, device=dev, reps=a.reps, warmup=1, max_seconds=a.max_seconds)
                res[b] = (ms, peak_bytes(step, device=dev))
            except (RuntimeError, NotImplementedError) as e:
                print(f"  {b} L={L}: {type(e).__name__}: {e}")
        row = [L]
        for b in a.backends:
            row += [f"{res[b][0]:.2f}" if b in res else "-", fmt_bytes(res[b][1]) if b in res else "-"]
        ratio = res["fused"][0] / res["sdpa"][0] if "fused" in res and "sdpa" in res else None
        rows.append(row + ["-" if ratio is None else f"{ratio:.2f}"])
        print(f"  L={L} done", flush=True)
    hdr = ["L"] + [x for b in a.backends for x in (f"{b} ms", f"{b} peak")] + ["fused/sdpa"]
    print(markdown_table(hdr, rows))


if __name__ == "__main__":
    main()
