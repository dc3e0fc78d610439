"""Benchmark: padded and packed batches through the fused CMHA kernel, speed per real token.

A batch of B sequences of seeded random lengths, uniform in [--min-frac * L, L] (right padded to
L), causal, forward and forward + backward, on the same inputs in the same run. Cases:
  fused unpadded   cmha_attention(backend="fused") on B sequences all of full length L: the speed
                   the padded cases are compared with, per real token
  fused kpm        the padded batch (B, H, L, d) with key_padding_mask (B, L)
  fused packed     the real tokens packed into (1, H, T, d) with cu_seqlens
  sdpa+mask        torch SDPA (torch's choice of kernel) on the padded batch with a dense boolean
                   (B, 1, L, L) causal-and-padding mask
  flash loop       torch SDPA under sdpa_kernel(FLASH_ATTENTION), is_causal, on each real
                   sequence alone, one call per sequence
The SDPA cases run on q and k rotated beforehand (euler_rotate_qk; for GQA k and v expanded to H
heads, as CMHA rotates keys per query head) and the rotation is not timed: plain attention, the
floor. The fused cases rotate inside the kernel; their gradients include delta and beta.
Columns: median ms; real tokens per second (padding not counted); useful TFLOP/s (causal FLOPs of
the real sequences only: 2 H len^2 d per sequence forward, x3.5 for forward + backward); ratios
"per real token" = real tok/s of the case / real tok/s of the named baseline (the issue's target:
fused kpm and packed >= 0.9 of fused unpadded); the FLOP-rate ratio too, since shorter sequences
cost less per token under a causal mask; extra peak memory (benchmarks/_util.py: CUDA allocator
peak; CPU in-process resident-set high-water mark, rough). Every case is checked on the real rows
against the others before timing.

    python benchmarks/cmha_padded.py --device cuda           # bf16, B*L = 16k, L = 2048, H*d = 2048
    python benchmarks/cmha_padded.py --device cpu            # float32, 512 tokens, smoke-sized
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import fmt_bytes, markdown_table, peak_bytes, time_ms  # noqa: E402
from cmha import make_inputs  # noqa: E402

from complexformer import cmha_attention  # noqa: E402
from complexformer.rotate import euler_rotate_qk  # noqa: E402

PRESETS = {"cuda": dict(dtype="bfloat16", tokens=16384, seqlen=2048, hd=2048, dims=[64, 128]),
           "cpu": dict(dtype="float32", tokens=512, seqlen=128, hd=256, dims=[64])}


def add_shape_args(ap, reps):
    """The options cmha_padded.py and cmha_gqa.py share (None: the device's preset)."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tokens", type=int, default=None, help="B * L (default 16384 CUDA, 512 CPU)")
    ap.add_argument("--seqlen", type=int, default=None, help="L (default 2048 CUDA, 128 CPU)")
    ap.add_argument("--hd", type=int, default=None, help="H * d (default 2048 CUDA, 256 CPU)")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="head dims d (default 64 128 CUDA, 64 CPU)")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--warmup", type=int, default=3 if reps >= 20 else 2)
    ap.add_argument("--max-seconds", type=float, default=3.0, help="time budget per case and pass (fewer reps)")
    ap.add_argument("--fwd-only", action="store_true")


def resolve_shape_args(args):
    """Fill the preset defaults; returns (device, dtype) and prints the start of the header line."""
    dev = torch.device(args.device)
    for key, val in PRESETS["cuda" if dev.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, {args.dtype}, causal, B*L={args.tokens}, L={args.seqlen}, "
          f"H*d={args.hd}", end="")
    return dev, getattr(torch, args.dtype)


def measure(fn, dev, args):
    """(median ms, extra peak bytes) of fn(), or the error that stopped it (the run goes on)."""
    try:
        return (time_ms(fn, device=dev, reps=args.reps, warmup=args.warmup, max_seconds=args.max_seconds),
                peak_bytes(fn, device=dev))
    except Exception as e:  # OOM, an unsupported case: one row says so
        return f"error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:100]}"
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def causal_flops(lens, H, d):
    """Forward FLOPs of causal attention over sequences of these lengths (FlashAttention's count)."""
    return sum(2.0 * H * n * n * d for n in lens)


def flash_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def pre_rotated(q, k, v, delta, beta, freqs):
    """q~, k~ (k per query head, so (B, H, L, d)) and v expanded to H heads: detached leaves."""
    with torch.no_grad():
        qr, kr = euler_rotate_qk(q, k, delta, beta, freqs)
        vr = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return [t.contiguous().requires_grad_() for t in (qr, kr, vr)]


def leaf(t):
    return t.detach().contiguous().requires_grad_()


def build_cases(q, k, v, dout, delta, beta, freqs, lens):
    """name -> (fn() -> list of outputs, leaves, list of output gradients, real tokens)."""
    B, H, L, d = q.shape
    dev = q.device
    lens_t = torch.tensor(lens, device=dev)
    kpm = torch.arange(L, device=dev)[None, :] < lens_t[:, None]  # (B, L), True = attend
    cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
    pack = lambda t: leaf(torch.cat([t[b, :, :n] for b, n in enumerate(lens)], 1)[None])  # noqa: E731
    params = [leaf(delta), leaf(beta)]
    full = [leaf(t) for t in (q, k, v)]
    packed = [pack(t) for t in (q, k, v)]
    cmha = lambda qkv, **kw: [cmha_attention(*qkv, *params, freqs, causal=True, backend="fused", **kw)]  # noqa: E731
    qr, kr, vr = pre_rotated(q, k, v, delta, beta, freqs)
    mask = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None, None] & kpm[:, None, None, :]
    seqs = [[leaf(t[b:b + 1, :, :n]) for t in (qr, kr, vr)] for b, n in enumerate(lens)]
    real = sum(lens)
    return {
        "fused unpadded": (lambda: cmha(full), full + params, [dout], B * L),
        "fused kpm": (lambda: cmha(full, key_padding_mask=kpm), full + params, [dout], real),
        "fused packed": (lambda: cmha(packed, cu_seqlens=cu), packed + params, [pack(dout).detach()], real),
        "sdpa+mask": (lambda: [F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)], [qr, kr, vr], [dout], real),
        "flash loop": (lambda: [flash_sdpa(*s) for s in seqs], [t for s in seqs for t in s],
                       [dout[b:b + 1, :, :n].contiguous() for b, n in enumerate(lens)], real),
    }


def pass_fn(case, backward):
    fn, leaves, douts, _ = case
    if backward:
        return lambda: torch.autograd.grad(fn(), leaves, douts)

    def fwd():
        with torch.no_grad():
            fn()
    return fwd


def check_cases(cases, lens):
    """Max |difference| of every case's forward output from fused kpm's, on the real rows only."""
    with torch.no_grad():
        outs = {}
        for name, (fn, *_rest) in cases.items():
            try:
                o = fn()
            except Exception as e:
                outs[name] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:100]}"
                continue
            if name == "fused packed":
                o = list(torch.split(o[0][0], lens, 1))
            elif name != "flash loop":
                o = [o[0][b, :, :n] for b, n in enumerate(lens)]
            outs[name] = [t.reshape(t.shape[-3:]).float() for t in o]
    ref = outs.get("fused kpm")
    res = {}
    for name, o in outs.items():
        if isinstance(o, str) or isinstance(ref, str) or name == "fused kpm":
            res[name] = o if isinstance(o, str) else None
        else:
            res[name] = max((a - b).abs().max().item() for a, b in zip(o, ref))
    return res


def bench_config(d, Hkv_div, args, dev, dtype):
    H = args.hd // d
    Hkv = H // Hkv_div
    L, B = args.seqlen, max(1, args.tokens // args.seqlen)
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(max(1, int(L * args.min_frac)), L + 1, (B,), generator=g).tolist()
    q, k, v, dout, delta, beta, freqs = make_inputs(B, L, H, Hkv, d, dev, dtype, seed=args.seed)
    cases = build_cases(q, k, v, dout, delta, beta, freqs, lens)
    tag = f"d={d} H={H} Hkv={Hkv} B={B} L={L}"
    checks = check_cases(cases, lens)
    print(f"{tag}: real tokens {sum(lens)} of {B * L} ({sum(lens) / (B * L):.0%}); forward vs fused kpm on real rows: "
          + ", ".join(f"{k} {'-' if v is None else v if isinstance(v, str) else f'{v:.1e}'}"
                      for k, v in checks.items()), flush=True)
    rows, lines = [], []
    for backward in ([False] if args.fwd_only else [False, True]):
        pname = "fwd+bwd" if backward else "fwd"
        res = {}
        for name, case in cases.items():
            if isinstance(checks.get(name), str):
                res[name] = checks[name]
                continue
            res[name] = measure(pass_fn(case, backward), dev, args)
        mult = 3.5 if backward else 1.0
        rate = {}
        for name, r in res.items():
            if isinstance(r, str):
                continue
            real = cases[name][3]
            fl = mult * causal_flops([L] * B if name == "fused unpadded" else lens, H, d)
            rate[name] = (real / (r[0] / 1e3), fl / (r[0] / 1e3))
        ratio = lambda n, base, i=0: (f"{rate[n][i] / rate[base][i]:.2f}" if n in rate and base in rate  # noqa: E731
                                      else "-")
        for name, r in res.items():
            if isinstance(r, str):
                rows.append([tag, pname, name, r] + [""] * 7)
                continue
            tok, fl = rate[name]
            rows.append([tag, pname, name, f"{r[0]:.3f}", f"{tok / 1e6:.3g}", f"{fl / 1e12:.3g}",
                         ratio(name, "fused unpadded"), ratio(name, "fused unpadded", 1), ratio(name, "sdpa+mask"),
                         ratio(name, "flash loop"), fmt_bytes(r[1])])
        lines.append(f"{tag} {pname}: per real token vs fused unpadded: kpm {ratio('fused kpm', 'fused unpadded')}, "
                     f"packed {ratio('fused packed', 'fused unpadded')} (target >= 0.9); vs sdpa+mask: kpm "
                     f"{ratio('fused kpm', 'sdpa+mask')}, packed {ratio('fused packed', 'sdpa+mask')}; vs flash loop: "
                     f"kpm {ratio('fused kpm', 'flash loop')}, packed {ratio('fused packed', 'flash loop')}")
    return rows, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap, reps=10)
    ap.add_argument("--gqa", type=int, default=4, help="the GQA configuration's H / Hkv (0: H == Hkv only)")
    ap.add_argument("--min-frac", type=float, default=0.25, help="shortest sequence, as a fraction of L")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dev, dtype = resolve_shape_args(args)
    print(f", lengths uniform in [{args.min_frac:g} L, L], seed {args.seed}")
    rows, lines = [], []
    for d in args.dims:
        for div in [1] + ([args.gqa] if args.gqa > 1 else []):
            r, ln = bench_config(d, div, args, dev, dtype)
            rows += r
            lines += ln
    print()
    print("CMHA padded / packed batches, per real token (ratios: real tok/s of the case / of the baseline; "
          "FLOP/s ratio: useful TFLOP/s of the case / of fused unpadded)")
    print(markdown_table(["shape", "pass", "case", "ms", "real Mtok/s", "useful TFLOP/s", "vs fused unpadded",
                          "FLOP/s vs unpadded", "vs sdpa+mask", "vs flash loop", "extra peak"], rows))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
