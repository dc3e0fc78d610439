"""Benchmark: complexformer.pdl_loss vs F.cross_entropy(weight=w), eager and torch.compile'd.

What it measures, per (N, V), on the same inputs in the same run:
  * forward + backward time (median over --reps, after --warmup) of
      pdl     complexformer.pdl_loss(z, y, w); loss.backward()
      eager   F.cross_entropy(z, y, weight=w); loss.backward()
      compile torch.compile(F.cross_entropy)(z, y, weight=w); loss.backward()
      liger   liger_kernel.transformers.LigerCrossEntropyLoss(weight=w)(z, y); loss.backward()
              (Liger-Kernel's triton CE: class-weighted, mean over the target weights, i.e. PDL;
              CUDA only, skipped when not importable; it writes its gradient into the logits in
              place, so it runs on its own copy of z; checked against pdl before it is timed)
  * peak extra memory of one forward + backward (above the inputs; see _util.peak_bytes: CUDA
    allocator statistics, CPU resident-set high-water mark)
  * ratios: time(baseline) / time(pdl) (> 1: pdl is faster) and memory in units of one N x V
    buffer of the logits' dtype
  * CUDA: achieved HBM bandwidth of pdl's forward + backward against the roofline traffic
    (read the logits once + write the gradient once), in GB/s and as a fraction of a measured
    device-to-device copy of the same size, synced per call and back to back.
  * host overhead (--overhead-size, default N=4096 V=32000): per call of pdl fwd+bwd, the host
    time without any sync (Python + dispatcher + launches), the time synced per call, back to
    back, and (CUDA, torch.profiler) the launches and GPU kernel time per call; next to the same
    numbers for one trivial launch, ``t.add_(1)`` on a 1-element tensor (one dispatcher call, one
    elementwise kernel). Host overhead = synced time - GPU kernel time, in units of that launch's
    synced time.
  * token_counts vs torch.bincount throughput on N * 256 random ids per vocabulary size.

The headline of issue 12 (N=16384, V=128256, bf16, synced per call, fraction of the copy-bandwidth
roofline) and pdl vs Liger are printed as one line each after the tables.

Usage:
  python benchmarks/pdl.py                                  # CPU, float32, sizes that fit
  python benchmarks/pdl.py --device cuda --dtype bfloat16   # GPU, all issue sizes
  python benchmarks/pdl.py --sizes 4096x32000 --threads 2 --no-compile
  python benchmarks/pdl.py --device cuda --no-compile --skip-counts     # gpu_run.sh round4
CPU sizes above --max-elems (default 2^28 logits: 1 GB per float32 buffer; N=16384 x V=128256
is 8.4 GB per buffer and eager needs several) are skipped unless --allow-large.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import (back_to_back_ms, fmt_bytes, gpu_kernel_times, host_ms, markdown_table, peak_bytes,  # noqa: E402
                   time_ms, triton_entry)

import complexformer as cf  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ISSUE_SIZES = [(4096, 32000), (4096, 128256), (16384, 32000), (16384, 128256)]
HEADLINE_SIZE = (16384, 128256)  # issue 12's roofline target


def parse_sizes(text):
    out = []
    for part in text.split(","):
        n, v = part.lower().split("x")
        out.append((int(n), int(v)))
    return out


def make_inputs(N, V, dtype, device):
    torch.manual_seed(0)
    with torch.no_grad():  # generated where they live, in their dtype (no 8 GB float32 host staging)
        z = torch.randn(N, V, device=device, dtype=dtype).mul_(2).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    y[::10] = -100  # some padding
    counts = torch.randint(0, 10_000, (V,), device=device)
    w = cf.pdl_weights(counts, max_weight=100.0)
    return z, y, w.to(torch.float64 if dtype == torch.float64 else torch.float32)


def fwd_bwd(loss_fn, z, y, w):
    def run():
        loss = loss_fn(z, y, w)
        loss.backward()
        z.grad = None
    return run


def pdl_fn(z, y, w):
    return cf.pdl_loss(z, y, w)


def eager_fn(z, y, w):
    return F.cross_entropy(z, y, weight=w.to(z.dtype))


def liger_loss(device):
    """fn(z, y, w) -> Liger-Kernel's weighted CE, or the reason it is skipped."""
    cls = triton_entry(device, "liger_kernel.transformers", "LigerCrossEntropyLoss")
    if isinstance(cls, str):
        return cls
    modules = {}  # one module per weights tensor, built outside the timed calls (like pdl's w)

    def fn(z, y, w):
        if id(w) not in modules:
            modules[id(w)] = (w, cls(weight=w))  # w kept alive, so its id is not reused
        return modules[id(w)][1](z, y)

    return fn


def check_against_pdl(name, fn, z, y, w):
    """|loss - pdl's| and max |grad - pdl's| on fresh copies of z (fn may overwrite its input)."""
    out = []
    for f in (pdl_fn, fn):
        zc = z.detach().clone().requires_grad_()
        loss = f(zc, y, w)
        loss.backward()
        out.append((loss.detach().float(), zc.grad.float()))
        del zc
    (lp, gp), (lo, go) = out
    print(f"  check {name} vs pdl: |loss diff| {abs(lo - lp).item():.2e} (loss {lp.item():.4f}), "
          f"max |grad diff| {(go - gp).abs().max().item():.2e} (max |grad| {gp.abs().max().item():.2e})", flush=True)


def copy_bandwidth(nbytes, device, warmup, reps):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device=device, reps=reps, warmup=warmup) / 1e3
    return 2 * nbytes / t


def bench_loss(args, dtype, device):
    sizes = parse_sizes(args.sizes) if args.sizes else ISSUE_SIZES
    compiled_ce = None if args.no_compile else torch.compile(eager_fn)
    liger = "not asked for (--no-liger)" if args.no_liger else liger_loss(device)
    if isinstance(liger, str):
        print(f"liger: skipped ({liger})")
    rows, vrows, lines = [], [], []
    for N, V in sizes:
        if device.type == "cpu" and N * V > args.max_elems and not args.allow_large:
            print(f"skip N={N} V={V}: {N * V} logits > --max-elems {args.max_elems} on the CPU (use --allow-large)")
            continue
        z, y, w = make_inputs(N, V, dtype, device)
        buf = N * V * z.element_size()
        fns = {"pdl": fwd_bwd(pdl_fn, z, y, w), "eager": fwd_bwd(eager_fn, z, y, w)}
        if compiled_ce is not None:
            fns["compile"] = fwd_bwd(compiled_ce, z, y, w)
        if not isinstance(liger, str):
            check_against_pdl("liger", liger, z, y, w)
            fns["liger"] = fwd_bwd(liger, z.detach().clone().requires_grad_(), y, w)  # its own z: written in place
        res = {}
        for name, fn in fns.items():
            try:
                t = time_ms(fn, device=device, reps=args.reps, warmup=args.warmup) / 1e3
                m = peak_bytes(fn, device=device)
                res[name] = (t, m)
            except torch.OutOfMemoryError:
                res[name] = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"  N={N} V={V} {name:8s} " + ("OOM" if res[name] is None else
                  f"{res[name][0] * 1e3:9.2f} ms  peak +{fmt_bytes(res[name][1])}"), flush=True)
        fns.pop("liger", None)  # frees liger's copy of z
        t_pdl, m_pdl = res["pdl"]
        ms = lambda t: f"{t * 1e3:.2f}"  # noqa: E731
        row = [N, V, ms(t_pdl)]
        for base in ("eager", "compile", "liger"):
            if res.get(base) is not None:
                row += [ms(res[base][0]), f"{res[base][0] / t_pdl:.2f}"]
            else:
                row += ["skipped" if base == "liger" and isinstance(liger, str) else "-", "-"]
        if res.get("liger") is not None:
            lines.append(f"pdl vs Liger-Kernel N={N} V={V}: time(liger) / time(pdl) = {res['liger'][0] / t_pdl:.2f} "
                         "(synced per call; target >= 1.2)")
        mem = lambda m: "n/a" if m is None else f"{m / buf:.2f}"  # noqa: E731
        row += [mem(m_pdl)] + [mem(res[b][1]) if res.get(b) else "-" for b in ("eager", "liger")]
        if device.type == "cuda":
            roof = 2 * buf  # read the logits once + write the gradient once
            copy_bw = copy_bandwidth(buf, device, args.warmup, args.reps)
            bw = roof / t_pdl
            row += [f"{bw / 1e9:.0f}", f"{bw / copy_bw:.2f}"]
            # the same call synced per call and back to back
            fn = fwd_bwd(pdl_fn, z, y, w)
            t = time_ms(fn, device=device, reps=args.reps, warmup=args.warmup) / 1e3
            tb = back_to_back_ms(fn, device=device, reps=max(args.reps, 10), warmup=args.warmup) / 1e3
            vrows.append([N, V, f"{t * 1e3:.3f}", f"{roof / t / copy_bw:.2f}", f"{tb * 1e3:.3f}",
                          f"{roof / tb / copy_bw:.2f}", f"{copy_bw / 1e9:.0f}"])
            if (N, V) == HEADLINE_SIZE:
                lines.insert(0, f"HEADLINE pdl_loss fwd+bwd N={N} V={V} {str(dtype).replace('torch.', '')}, synced per "
                                f"call: {t * 1e3:.3f} ms, {roof / t / 1e9:.0f} GB/s = {roof / t / copy_bw:.2f} of the HBM "
                                f"roofline (measured copy, {copy_bw / 1e9:.0f} GB/s; target >= 0.85, stretch 0.90); "
                                f"back to back {roof / tb / copy_bw:.2f}")
        rows.append(row)
        del z, y, w, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    headers = ["N", "V", "pdl ms", "eager ms", "eager/pdl", "compile ms", "compile/pdl", "liger ms", "liger/pdl",
               "pdl mem/buf", "eager mem/buf", "liger mem/buf"]
    if device.type == "cuda":
        headers += ["pdl GB/s", "of copy BW"]
    print()
    print(f"pdl_loss forward+backward, {str(dtype).replace('torch.', '')} on {device}"
          f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; "
          "ratios > 1: pdl faster; mem/buf: peak extra memory in N x V buffers of the logits' dtype")
    print(markdown_table(headers, rows))
    if vrows:
        print()
        print("pdl_loss forward+backward against the copy bandwidth: synced = one sync per call (as above, "
              "includes host dispatch gaps), b2b = calls back to back, one sync (the device's throughput); "
              "roofline traffic = read the logits once + write the gradient once")
        print(markdown_table(["N", "V", "synced ms", "synced of copy BW", "b2b ms", "b2b of copy BW", "copy GB/s"],
                             vrows))
    if lines:
        print()
        print("\n".join(lines))


def bench_overhead(args, dtype, device):
    """Host overhead of one pdl fwd+bwd next to one trivial launch (module docstring)."""
    (N, V), = parse_sizes(args.overhead_size)
    z, y, w = make_inputs(N, V, dtype, device)
    t1 = torch.zeros(1, device=device)
    calls = {"one launch: t.add_(1), 1 element": lambda: t1.add_(1), "pdl_loss fwd+bwd": fwd_bwd(pdl_fn, z, y, w)}
    is_cuda = device.type == "cuda"
    res = {}
    for name, fn in calls.items():
        r = {"host": host_ms(fn, device=device, reps=args.overhead_reps),
             "synced": time_ms(fn, device=device, reps=args.overhead_reps, warmup=args.warmup),
             "b2b": back_to_back_ms(fn, device=device, reps=args.overhead_reps, warmup=args.warmup)}
        kernels = gpu_kernel_times(fn, calls=10) if is_cuda else None
        r["gpu"] = sum(k[0] for k in kernels) if kernels else None
        r["launches"] = sum(k[1] for k in kernels) if kernels else None
        res[name] = r
    us = lambda x: "n/a" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    rows = [[name, us(r["host"]), us(r["synced"]), us(r["b2b"]), us(r["gpu"]),
             "n/a" if r["launches"] is None else f"{r['launches']:.1f}"] for name, r in res.items()]
    print()
    print(f"host overhead per call, N={N} V={V} {str(dtype).replace('torch.', '')} on {device}: host = wall time of "
          "the call without any sync (Python + dispatcher + launches); synced = CUDA events around one call, "
          "synced after it; b2b = back to back, one sync; GPU = kernel time by torch.profiler")
    print(markdown_table(["call", "host us", "synced us", "b2b us", "GPU kernel us", "launches"], rows))
    one, pdl = res["one launch: t.add_(1), 1 element"], res["pdl_loss fwd+bwd"]
    print(f"pdl host dispatch time = {pdl['host'] / one['host']:.1f} x one launch's host time "
          f"({pdl['host'] * 1e3:.1f} vs {one['host'] * 1e3:.1f} us)")
    if is_cuda:
        over = pdl["synced"] - pdl["gpu"]
        buf = N * V * z.element_size()
        copy_bw = copy_bandwidth(buf, device, args.warmup, args.reps)
        print(f"pdl host overhead (synced - GPU kernel time) = {over * 1e3:.1f} us = {over / one['synced']:.1f} x one "
              f"launch synced ({one['synced'] * 1e3:.1f} us) (target <= 2); roofline fraction at this size: synced "
              f"{2 * buf / (pdl['synced'] / 1e3) / copy_bw:.2f}, b2b {2 * buf / (pdl['b2b'] / 1e3) / copy_bw:.2f}")


def bench_counts(args, device):
    sizes = parse_sizes(args.sizes) if args.sizes else ISSUE_SIZES
    rows = []
    for V in sorted({v for _, v in sizes}):
        n = args.count_tokens
        ids = torch.randint(0, V, (n,), device=device)
        t_cf = time_ms(lambda: cf.token_counts(ids, V), device=device, reps=args.reps, warmup=args.warmup)
        t_bc = time_ms(lambda: torch.bincount(ids, minlength=V), device=device, reps=args.reps, warmup=args.warmup)
        rows.append([n, V, f"{n / t_cf / 1e6:.3g}", f"{n / t_bc / 1e6:.3g}", f"{t_bc / t_cf:.2f}"])
    print()
    print(f"token_counts vs torch.bincount on {device} (int64 ids; CUDA token_counts includes its one host sync)")
    print(markdown_table(["ids", "V", "token_counts Gid/s", "bincount Gid/s", "bincount time / ours"], rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--sizes", default=None, help="comma-separated NxV, default: N in {4096,16384} x V in {32000,128256}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--max-elems", type=int, default=2**28, help="CPU: skip sizes with more logits than this")
    p.add_argument("--allow-large", action="store_true", help="CPU: run sizes above --max-elems")
    p.add_argument("--count-tokens", type=int, default=1 << 24, help="ids per token_counts measurement")
    p.add_argument("--skip-counts", action="store_true")
    p.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel row")
    p.add_argument("--overhead-size", default="4096x32000", help="NxV of the host-overhead measurement")
    p.add_argument("--overhead-reps", type=int, default=50)
    p.add_argument("--skip-overhead", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads (timings on a shared machine are noisy)")
    bench_loss(args, dtype, device)
    if not args.skip_overhead:
        bench_overhead(args, dtype, device)
    if not args.skip_counts:
        bench_counts(args, device)


if __name__ == "__main__":
    main()
