"""Benchmark: the fused CMHA kernel with GQA (H != Hkv) against SDPA-flash on an expanded K.

Through the public API, causal, on the same inputs in the same run:
  fused GQA       cmha_attention(q, k, v, ..., backend="fused") with k, v of Hkv = H / --groups heads
                  (the kernel rotates K per query head itself; no (B, H, L, d) K is written)
  fused H==Hkv    the same with Hkv = H (the pre-rotated path), for reference
  flash expanded  torch SDPA under sdpa_kernel(FLASH_ATTENTION), is_causal, on q~ and k~ rotated
                  beforehand, k~ per query head (B, H, L, d) and v repeated to H heads: the
                  rotation and the expansion are not timed (issue 12's baseline)
Forward (the issue's target: fused GQA TFLOP/s >= 0.60 of flash expanded) and forward + backward.
FLOPs: causal forward 2 B H L^2 d, forward + backward 3.5x (the FlashAttention convention). Extra
peak memory per call (benchmarks/_util.py). The fused outputs are checked against flash first.

    python benchmarks/cmha_gqa.py --device cuda     # bf16, B*L = 16k, L = 2048, H*d = 2048, d 64 and 128
    python benchmarks/cmha_gqa.py --device cpu      # float32, smoke-sized
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import fmt_bytes, markdown_table  # noqa: E402
from cmha import make_inputs  # noqa: E402
from cmha_padded import (add_shape_args, causal_flops, flash_sdpa, leaf, measure, pre_rotated,  # noqa: E402
                         resolve_shape_args)

from complexformer import cmha_attention  # noqa: E402


def bench(d, args, dev, dtype):
    H, L = args.hd // d, args.seqlen
    B, Hkv = max(1, args.tokens // L), H // args.groups
    q, k, v, dout, delta, beta, freqs = make_inputs(B, L, H, Hkv, d, dev, dtype, seed=0)
    _, k1, v1, *_ = make_inputs(B, L, H, H, d, dev, dtype, seed=0)
    params = [leaf(delta), leaf(beta)]
    gqa, mha = [leaf(t) for t in (q, k, v)], [leaf(t) for t in (q, k1, v1)]
    flash = pre_rotated(q, k, v, delta, beta, freqs)
    cases = {"fused GQA": (lambda: cmha_attention(*gqa, *params, freqs, backend="fused"), gqa + params),
             "fused H==Hkv": (lambda: cmha_attention(*mha, *params, freqs, backend="fused"), mha + params),
             "flash expanded": (lambda: flash_sdpa(*flash), flash)}
    tag = f"d={d} H={H} Hkv={Hkv} B={B} L={L}"
    try:
        with torch.no_grad():
            diff = (cases["fused GQA"][0]().float() - cases["flash expanded"][0]().float()).abs().max().item()
        print(f"{tag}: max |fused GQA - flash expanded| forward = {diff:.2e}", flush=True)
    except Exception as e:  # reported again by its timing rows
        print(f"{tag}: check failed: {type(e).__name__}: {e}", flush=True)
    fl = causal_flops([L] * B, H, d)
    rows, lines = [], []
    for backward in ([False] if args.fwd_only else [False, True]):
        pname, mult = ("fwd+bwd", 3.5) if backward else ("fwd", 1.0)
        res = {}
        for name, (fn, leaves) in cases.items():
            if backward:
                run = lambda fn=fn, leaves=leaves: torch.autograd.grad(fn(), leaves, dout)  # noqa: E731
            else:
                run = torch.no_grad()(fn)
            r = measure(run, dev, args)
            res[name] = r if isinstance(r, str) else (r[0], mult * fl / (r[0] / 1e3), r[1])
        base = res["flash expanded"]
        for name, r in res.items():
            if isinstance(r, str):
                rows.append([tag, pname, name, r, "", "", ""])
                continue
            rows.append([tag, pname, name, f"{r[0]:.3f}", f"{r[1] / 1e12:.3g}",
                         "-" if isinstance(base, str) else f"{r[1] / base[1]:.2f}", fmt_bytes(r[2])])
        if not isinstance(base, str) and not isinstance(res["fused GQA"], str):
            lines.append(f"{tag} {pname}: fused GQA TFLOP/s / flash expanded = {res['fused GQA'][1] / base[1]:.2f}"
                         + (" (target >= 0.60)" if not backward else ""))
    return rows, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap, reps=20)
    ap.add_argument("--groups", type=int, default=4, help="H / Hkv")
    args = ap.parse_args(argv)
    dev, dtype = resolve_shape_args(args)
    print(f", H/Hkv={args.groups}")
    rows, lines = [], []
    for d in args.dims:
        r, ln = bench(d, args, dev, dtype)
        rows += r
        lines += ln
    print()
    print("CMHA GQA through cmha_attention(backend='fused') vs SDPA-flash on pre-rotated, expanded K and V "
          "(ratio: TFLOP/s of the case / of flash expanded)")
    print(markdown_table(["shape", "pass", "case", "ms", "TFLOP/s", "vs flash expanded", "extra peak"], rows))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
