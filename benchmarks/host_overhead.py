"""Benchmark: the host cost of one call (Python glue + dispatch), on inputs so small that the
kernels themselves cost next to nothing.

Each op runs forward + backward on tiny inputs, timed on the host without synchronisation
(_util.host_ms: on CUDA that is the time the host needs to enqueue the work), three ways in the
same run:
  eager       the default: plain autograd.Functions around the op bodies (complexformer/_ext.py,
              eager_plain), as every eager call on plain tensors runs
  registered  the same call forced through the registered torch.library custom ops (the path
              torch.compile, dispatch modes and tensor subclasses take)
  torch       the nearest torch op: F.cross_entropy(weight=w) for pdl_loss,
              F.scaled_dot_product_attention for cmha_attention (no rotation), and x * cos + y * sin
              style rotation math for euler_rotate
and prints ratios registered / eager and eager / torch. No memory column: nothing here allocates
more than a few KiB.

Each variant keeps the best median of --rounds interleaved rounds (a shared machine is noisy).

Usage: python benchmarks/host_overhead.py [--device cpu|cuda] [--reps 300] [--rounds 3]
"""
import argparse
import os
import sys
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import host_ms, markdown_table  # noqa: E402

import complexformer as cf  # noqa: E402
from complexformer import _ext  # noqa: E402
from complexformer.reference import default_freqs, rotate_reference  # noqa: E402


def cases(device):
    g = torch.Generator().manual_seed(0)
    dt = torch.float16 if device == "cuda" else torch.float32

    def leaf(*shape, dtype=dt):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    z = leaf(64, 512, dtype=torch.float32)
    y = torch.randint(0, 512, (64,), generator=g).to(device)
    w = (torch.rand(512, generator=g) + 0.5).to(device)
    q, k, v = leaf(1, 4, 32, 64), leaf(1, 4, 32, 64), leaf(1, 4, 32, 64)
    delta, beta = leaf(4, 32, dtype=torch.float32), leaf(4, 32, dtype=torch.float32)
    freqs = default_freqs(64).to(device)
    pos = torch.arange(32, device=device)[None]

    def fb(fn):
        def run():
            out = fn()
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        return run

    return [
        ("pdl_loss (64 x 512)", fb(lambda: cf.pdl_loss(z, y, w)), fb(lambda: F.cross_entropy(z, y, weight=w)),
         "F.cross_entropy"),
        ("cmha_attention fused (1x4x32x64)", fb(lambda: cf.cmha_attention(q, k, v, delta, beta, freqs, backend="fused")),
         fb(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), "F.sdpa"),
        ("cmha_attention sdpa (1x4x32x64)", fb(lambda: cf.cmha_attention(q, k, v, delta, beta, freqs, backend="sdpa")),
         fb(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), "F.sdpa"),
        ("euler_rotate (1x4x32x64)", fb(lambda: cf.euler_rotate(q, delta, beta, freqs)),
         fb(lambda: rotate_reference(q, delta, beta, freqs, pos)), "torch rotation math"),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the host cost, not the kernels' threading
    rows = []
    for name, ours, base, base_name in cases(args.device):
        # rounds interleave the three so that a burst of noise on a shared machine hits all of them;
        # each keeps its best median
        best = {}
        for _ in range(args.rounds):
            for key, fn in (("eager", ours), ("registered", ours), ("torch", base)):
                forced = mock.patch.object(_ext, "eager_plain", lambda *a: False) if key == "registered" else nullcontext()
                with forced:
                    ms = host_ms(fn, device=args.device, reps=args.reps, warmup=20)
                best[key] = min(best.get(key, float("inf")), ms)
        eager, registered, torch_ms = best["eager"], best["registered"], best["torch"]
        rows.append([name, f"{eager * 1e3:.0f}", f"{registered * 1e3:.0f}", f"{torch_ms * 1e3:.0f} ({base_name})",
                     f"{registered / eager:.2f}", f"{eager / torch_ms:.2f}"])
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          "host us per forward + backward (median)")
    print(markdown_table(["op", "eager us", "registered us", "torch us", "registered / eager", "eager / torch"],
                         rows))


if __name__ == "__main__":
    main()
