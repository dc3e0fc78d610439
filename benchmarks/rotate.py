"""euler_rotate against the same math in plain PyTorch, on the same inputs in the same run.

Measures, per sequence length: the rotation of queries (H heads) and of GQA keys (Hkv heads,
expanded to H), forward only and forward + backward (grads to x, delta, beta), median wall time.
Baseline "torch": complexformer.rotate.rotate_reference (the polar-form formula in eager PyTorch,
autograd for the backward). On CUDA also q and k in one launch (euler_rotate_qk) against two calls.
Ratios are torch / ours (> 1: ours faster). Extra peak memory of one fwd+bwd step for both.

    python benchmarks/rotate.py                                   # CPU float32, B=1 H=8 d=64
    python benchmarks/rotate.py --device cuda --dtype bfloat16 --L 1024 4096 16384
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import fmt_bytes, markdown_table, peak_bytes, time_ms  # noqa: E402

from complexformer import euler_rotate  # noqa: E402
from complexformer.reference import default_freqs  # noqa: E402
from complexformer.rotate import euler_rotate_qk, rotate_reference  # noqa: E402


def torch_rotate(x, delta, beta, freqs, pos):
    return rotate_reference(x, delta, beta, freqs, pos, dtype=torch.float32).to(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--L", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=5.0)
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    print(f"euler_rotate: B={a.B} H={a.H} Hkv={a.Hkv} d={a.d} {a.dtype} on {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    h = a.d // 2
    delta = (torch.randn(a.H, h, device=dev) / h**0.5).requires_grad_()
    beta = (0.1 * torch.randn(a.H, h, device=dev)).requires_grad_()
    freqs = default_freqs(a.d, device=dev)
    rows = []
    for L in a.L:
        pos = torch.arange(L, device=dev)
        for name, heads, is_q in (("q", a.H, True), ("k (GQA)", a.Hkv, False)):
            x = torch.randn(a.B, heads, L, a.d, device=dev, dtype=dtype, requires_grad=True)
            gy = torch.randn(a.B, a.H, L, a.d, device=dev, dtype=dtype)
            b = beta if is_q else None
            ours = lambda: euler_rotate(x, delta, b, freqs, positions=pos, is_query=is_q)  # noqa: E731
            ref = lambda: torch_rotate(x, delta, b, freqs, pos[None])  # noqa: E731
            res = {}
            for tag, fn in (("ours", ours), ("torch", ref)):
                with torch.no_grad():
                    fwd = time_ms(fn, device=dev, reps=a.reps, max_seconds=a.max_seconds)
                step = lambda: fn().backward(gy)  # noqa: E731
                fb = time_ms(step, device=dev, reps=a.reps, max_seconds=a.max_seconds)
                res[tag] = (fwd, fb, peak_bytes(step, device=dev))
            (f1, b1, m1), (f2, b2, m2) = res["ours"], res["torch"]
            rows.append([L, name, f"{f1:.3f}", f"{f2:.3f}", f"{f2 / f1:.1f}x", f"{b1:.3f}", f"{b2:.3f}",
                         f"{b2 / b1:.1f}x", fmt_bytes(m1), fmt_bytes(m2)])
        if dev.type == "cuda":
            q = torch.randn(a.B, a.H, L, a.d, device=dev, dtype=dtype)
            k = torch.randn(a.B, a.Hkv, L, a.d, device=dev, dtype=dtype)
            with torch.no_grad():
                one = time_ms(lambda: euler_rotate_qk(q, k, delta, beta, freqs), device=dev, reps=a.reps)
                two = time_ms(lambda: (euler_rotate(q, delta, beta, freqs),
                                       euler_rotate(k, delta, None, freqs, is_query=False)), device=dev, reps=a.reps)
            rows.append([L, "q+k one launch", f"{one:.3f}", f"{two:.3f} (2 calls)", f"{two / one:.1f}x",
                         "-", "-", "-", "-", "-"])
    print(markdown_table(["L", "rotate", "fwd ms", "torch fwd ms", "fwd ratio", "fwd+bwd ms",
                          "torch fwd+bwd ms", "fwd+bwd ratio", "peak", "torch peak"], rows))


if __name__ == "__main__":
    main()
