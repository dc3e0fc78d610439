"""CMHA attention: forward + backward time and extra peak memory per backend, same inputs, same run.

What is measured: one training step of the attention op alone, out = f(q, k, v, ...) followed by
autograd.grad(out, inputs, dout), on q, k, v of shape (B, H, L, d), causal, no GQA (--kv-heads
to change). Rows:
  fused, auto, sdpa, reference  complexformer.cmha_attention(backend=...): "sdpa" is the project's
                                rotation kernel + torch SDPA ("rotate+SDPA").
  authors                       the published ComplexFormer formulation in plain torch: Euler
                                transform, then per query chunk a (B, H, chunk, Lk, d/2) cosine
                                tensor cos(delta (theta_q - theta_k) + beta + omega (p_m - p_n))
                                * r_q r_k summed over j, softmax, P @ V. The O(L^2 d) path
                                docs/design.md does not copy, here with the causal mask applied (fair timing).
  rope+sdpa                     the cost floor: plain RoPE (cos/sin tables precomputed) + torch
                                SDPA of the same shape (no delta, beta or their gradients).
  sdpa-only (CUDA)              torch SDPA alone on the same q, k, v: the flash kernel's TFLOP/s.
Timing: all paths of one size run in one process on the same input tensors, round-robin (rep 1 of
every path, then rep 2, ...), so that load from other processes hits every path alike; median ms.
Columns: median ms, ratios vs the rope+sdpa floor and vs rotate+SDPA, extra peak memory (what
the step allocates beyond its inputs: CUDA allocator peak; on CPU the RSS high-water mark of one
step in a fresh process per path), and on CUDA the attention TFLOP/s (causal fwd 2*B*H*L^2*d, fwd+bwd 3.5x
that, the FlashAttention convention). Paths whose estimated memory would not fit are skipped.
Before timing, every path is checked against the float64 pair-by-pair reference at a small size.

    python benchmarks/cmha.py                          # CPU preset (float32, B=1, H=8, d=64)
    python benchmarks/cmha.py --device cuda            # GPU preset (bf16, B*L = 16k, H*d = 2048)
    python benchmarks/cmha.py --sizes 1x1024x8x64 --backends fused sdpa --out results/
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import fmt_bytes, markdown_table, peak_bytes, run_worker, sync, time_ms, worker_result  # noqa: E402

from complexformer import cmha_attention  # noqa: E402
from complexformer.reference import EPS_R, cmha_attention_pairwise, default_freqs  # noqa: E402

CMHA_BACKENDS = ["fused", "auto", "sdpa", "reference"]
ALL = CMHA_BACKENDS + ["authors", "rope+sdpa", "sdpa-only"]

# (B, L, H, d, backends or None for all that fit). CPU: the sizes of the issue. GPU: 16k tokens,
# H * d = 2048, the plot's L sweep at d = 64 plus d = 128 at L = 4096.
PRESETS = {
    "cpu": [(1, 512, 8, 64, None), (1, 2048, 8, 64, ["fused", "auto", "sdpa", "reference", "rope+sdpa"]),
            (1, 16384, 8, 64, ["fused", "rope+sdpa"])],
    "cuda": [(16, 1024, 32, 64, None), (4, 4096, 32, 64, None), (1, 16384, 32, 64, None),
             (4, 4096, 16, 128, None)],
}


# ------------------------------------------------------------------------------------------- paths
def authors_cmha(q, k, v, delta, beta, freqs, *, causal=True, scale=None, chunk=64):
    """The published formulation (O(L^2 d) memory and transcendentals), causal mask applied."""
    B, H, Lq, d = q.shape
    Lk, h = k.shape[2], d // 2
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if k.shape[1] != H:  # GQA: every query head reads its kv head (a full copy, as such code does)
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    rq, tq = torch.sqrt(q[..., :h] ** 2 + q[..., h:] ** 2 + EPS_R), torch.atan2(q[..., h:], q[..., :h])
    rk, tk = torch.sqrt(k[..., :h] ** 2 + k[..., h:] ** 2 + EPS_R), torch.atan2(k[..., h:], k[..., :h])
    dl, bt = delta[None, :, None, None, :], beta[None, :, None, None, :]
    om = freqs.expand(H, h)[None, :, None, None, :]
    pq = torch.arange(Lq, device=q.device) + (Lk - Lq)
    pk = torch.arange(Lk, device=q.device)
    rows = []
    for s in range(0, Lq, chunk):
        e = min(Lq, s + chunk)
        dp = (pq[s:e, None] - pk[None, :]).to(q.dtype)[None, None, :, :, None]  # (1, 1, c, Lk, 1)
        ang = dl * (tq[:, :, s:e, None, :] - tk[:, :, None, :, :]) + bt + om * dp  # (B, H, c, Lk, h)
        rows.append((rq[:, :, s:e, None, :] * rk[:, :, None, :, :] * torch.cos(ang)).sum(-1))
    scores = torch.cat(rows, 2) * scale
    if causal:
        vis = pk[None, :] <= pq[:, None]
        scores = scores.masked_fill(~vis, float("-inf"))
    p = torch.softmax(scores.float(), -1).to(v.dtype)
    return p @ v


def rope_tables(L, d, device, dtype):
    ang = torch.arange(L, device=device, dtype=torch.float32)[:, None] * default_freqs(d, device=device)[None]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def rope(x, cos, sin):
    """Standard RoPE, half layout (rotate_half)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _sdpa(q, k, v, causal):
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # torch >= 2.5 for GQA
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def make_path(name, causal=True):
    """fn(q, k, v, delta, beta, freqs, tables) -> out, and whether delta/beta get gradients."""
    if name in CMHA_BACKENDS:
        return (lambda q, k, v, dl, bt, fr, tb: cmha_attention(q, k, v, dl, bt, fr, causal=causal, backend=name)), True
    if name == "authors":
        return (lambda q, k, v, dl, bt, fr, tb: authors_cmha(q, k, v, dl, bt, fr, causal=causal)), True
    if name == "rope+sdpa":
        return (lambda q, k, v, dl, bt, fr, tb: _sdpa(rope(q, *tb), rope(k, *tb), v, causal)), False
    if name == "sdpa-only":
        return (lambda q, k, v, dl, bt, fr, tb: _sdpa(q, k, v, causal)), False
    raise ValueError(name)


def make_inputs(B, L, H, Hkv, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v, dout = mk(B, H, L, d), mk(B, Hkv, L, d), mk(B, Hkv, L, d), mk(B, H, L, d)
    delta = (torch.randn(H, d // 2, generator=g) / math.sqrt(d // 2) + 1.0).to(device, pdt)
    beta = (0.1 * torch.randn(H, d // 2, generator=g)).to(device, pdt)
    freqs = default_freqs(d, dtype=pdt, device=device)
    return q, k, v, dout, delta, beta, freqs


def estimated_bytes(name, B, L, H, d, dtype):
    """A rough upper estimate of a path's extra memory, used only to skip what cannot fit."""
    es = torch.finfo(dtype).bits // 8
    if name == "authors":  # angle, cosine, r_q r_k products of every chunk are kept for backward
        return 4 * B * H * L * L * (d // 2) * max(es, 4)
    if name == "reference":  # float32 scores, probabilities and their gradients
        return 6 * B * H * L * L * 4
    return 16 * B * H * L * d * 4


def memory_budget(device):
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024
    return 0.6 * avail


# ------------------------------------------------------------------------------------------- cases
def make_step(path, inputs, tables):
    """One training step of ``path`` on ``inputs``: forward, then the gradients of all inputs."""
    q, k, v, dout, delta, beta, freqs = inputs
    fn, has_params = make_path(path)
    leaves = [q, k, v] + ([delta, beta] if has_params else [])

    def step():
        out = fn(q, k, v, delta, beta, freqs, tables)
        torch.autograd.grad(out, leaves, dout)

    return step


def size_inputs(c, L=None):
    dev, dtype = torch.device(c["device"]), getattr(torch, c["dtype"])
    L = c["L"] if L is None else L
    inputs = make_inputs(c["B"], L, c["H"], c["Hkv"], c["d"], dev, dtype)
    for t in inputs[:3] + inputs[4:6]:  # q, k, v, delta, beta
        t.requires_grad_(True)
    return inputs, rope_tables(L, c["d"], dev, dtype)


def warm_up(c, path):
    """Lazy init (thread pools, kernels, caches) on a short sequence, so that the slow cases pay
    for one full-size run less."""
    make_step(path, *size_inputs(c, min(c["L"], 256)))()


def measure_peak(c):
    """Extra peak memory of one full-size step of c["path"] (run in a fresh process on CPU)."""
    warm_up(c, c["path"])
    return {"peak": peak_bytes(make_step(c["path"], *size_inputs(c)), device=c["device"])}


def time_paths(cases, on_done=None):
    """Median ms per path of one size, all on the SAME inputs, round-robin over the paths so that
    load from other processes hits every path alike. A path whose first run takes longer than
    max_seconds keeps that single sample."""
    c0 = cases[0]
    dev = torch.device(c0["device"])
    inputs, tables = size_inputs(c0)
    steps, samples, want = {}, {}, {}
    for c in cases:
        p = c["path"]
        warm_up(c, p)
        steps[p] = make_step(p, inputs, tables)
        sync(dev)
        t0 = time.perf_counter()
        steps[p]()
        sync(dev)
        first = (time.perf_counter() - t0) * 1e3
        samples[p] = [first]
        want[p] = 1 + max(0, min(c["reps"] - 1, int(c["max_seconds"] * 1e3 / first)))
        if on_done:
            on_done()
    for r in range(1, max(want.values())):
        for p in steps:
            if r < want[p]:
                if len(samples[p]) == 1:
                    samples[p] = []  # drop the first (cold) sample once there are others
                samples[p].append(time_ms(steps[p], device=dev, reps=1, warmup=0))
    return {p: statistics.median(v) for p, v in samples.items()}


def case_list(args):
    if args.sizes:
        sizes = []
        for s in args.sizes:
            B, L, H, d = (int(t) for t in s.lower().split("x"))
            sizes.append((B, L, H, d, None))
    else:
        sizes = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]
    cases = []
    for B, L, H, d, paths in sizes:
        Hkv = args.kv_heads or H
        for p in args.backends:
            if p == "sdpa-only" and not args.device.startswith("cuda"):
                continue
            if paths is not None and p not in paths and p != "sdpa-only":
                continue
            cases.append(dict(device=args.device, dtype=args.dtype, B=B, L=L, H=H, Hkv=Hkv, d=d, path=p,
                              reps=args.reps, max_seconds=args.max_seconds))
    return cases


def check_paths(args):
    """Max error of every path against the float64 pair-by-pair reference at a small size."""
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    q, k, v, _, delta, beta, freqs = make_inputs(1, 96, 4, 2, 64, dev, dtype, seed=1)  # GQA too
    want, _ = cmha_attention_pairwise(q.cpu(), k.cpu(), v.cpu(), delta.cpu(), beta.cpu(), freqs.cpu(), causal=True)
    errs = {}
    for p in args.backends:
        if p in ("rope+sdpa", "sdpa-only"):
            continue
        fn, _ = make_path(p)
        try:
            with torch.no_grad():
                got = fn(q, k, v, delta, beta, freqs, None)
            errs[p] = f"{(got.double().cpu() - want).abs().max().item():.1e}"
        except Exception as e:  # report, keep benchmarking the others
            errs[p] = f"error: {type(e).__name__}: {str(e)[:80]}"
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--sizes", nargs="+", help="BxLxHxd ... (default: the device's preset)")
    ap.add_argument("--kv-heads", type=int, default=None, help="Hkv (default H: no GQA)")
    ap.add_argument("--backends", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=8.0, help="time budget per case (fewer reps)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    ap.add_argument("--out", default=None, help="folder for cmha_<device>.md and cmha_<device>.png")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        import json
        worker_result(measure_peak(json.loads(args._worker)))
        return
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    is_cuda = dev.type == "cuda"

    from tqdm import tqdm

    checks = check_paths(args)
    print(f"check vs float64 pair-by-pair reference (B=1, H=4, Hkv=2, L=96, d=64, {args.dtype}): "
          + ", ".join(f"{k} {v}" for k, v in checks.items()), flush=True)

    budget = memory_budget(dev)
    results = {}
    cases = case_list(args)
    by_size = {}
    for c in cases:
        key = (c["B"], c["L"], c["H"], c["d"])
        est = estimated_bytes(c["path"], c["B"], c["L"], c["H"], c["d"], dtype)
        if est > budget:
            results[key, c["path"]] = {"skip": f"skipped: needs ~{fmt_bytes(est)}"}
        elif str(checks.get(c["path"], "")).startswith("error"):
            results[key, c["path"]] = {"skip": checks[c["path"]]}
        else:
            by_size.setdefault(key, []).append(c)
    n_runs = sum(2 * len(v) for v in by_size.values())
    bar = tqdm(total=n_runs, desc="cmha bench (peak memory, then timing)", file=sys.stderr)
    err = lambda e: {"skip": f"error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:100]}"}  # noqa: E731
    for key, group in by_size.items():
        ok = []
        for c in group:  # peak memory: CUDA in process; CPU in a fresh process per path
            try:
                if is_cuda:
                    try:
                        r = measure_peak(c)
                    finally:  # also after an out-of-memory error: the next case starts clean
                        torch.cuda.empty_cache()
                else:
                    r = run_worker(os.path.abspath(__file__), c, timeout=900)
                ok.append(c)
            except Exception as e:
                r = err(e)
            results[key, c["path"]] = r
            bar.update(1 if "skip" not in r else 2)
        if ok:
            try:
                for p, ms in time_paths(ok, on_done=lambda: bar.update(1)).items():
                    results[key, p]["ms"] = ms
            except Exception as e:
                for c in ok:
                    results[key, c["path"]] = err(e)
            if is_cuda:
                torch.cuda.empty_cache()
    bar.close()

    headers = ["B", "L", "H", "d", "path", "ms", "vs rope+sdpa", "vs rotate+sdpa", "extra peak"]
    if is_cuda:
        headers.append("TFLOP/s")
    rows, seen = [], []
    for c in cases:
        key = (c["B"], c["L"], c["H"], c["d"])
        r = results[key, c["path"]]
        floor, rot = results.get((key, "rope+sdpa"), {}), results.get((key, "sdpa"), {})
        if "skip" in r:
            row = [*key, c["path"], r["skip"], "", "", ""]
        else:
            ratio = lambda base: f"{r['ms'] / base['ms']:.2f}x" if "ms" in base else "-"  # noqa: E731
            row = [*key, c["path"], f"{r['ms']:.2f}", ratio(floor), ratio(rot), fmt_bytes(r["peak"])]
        if is_cuda:
            B, L, H, d = key
            flops = 3.5 * 2 * B * H * L * L * d  # causal: half of 4 B H L^2 d, fwd + bwd = 3.5 fwd
            row.append(f"{flops / r['ms'] / 1e9:.1f}" if "ms" in r else "")
        rows.append(row)
        seen.append(key)
    title = (f"CMHA attention, forward + backward, causal, {args.dtype} on "
             f"{torch.cuda.get_device_name(dev) if is_cuda else 'CPU (%d threads)' % torch.get_num_threads()}"
             f", Hkv={'H' if not args.kv_heads else args.kv_heads}")
    table = markdown_table(headers, rows)
    print("\n" + title + "\n\n" + table + "\n")
    for line in summary(results, is_cuda):
        print(line)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "cuda" if is_cuda else "cpu"
        with open(os.path.join(args.out, f"cmha_{tag}.md"), "w") as f:
            f.write(f"{title}\n\n{table}\n\n" + "\n".join(summary(results, is_cuda)) + "\n")
        plot(results, os.path.join(args.out, f"cmha_{tag}.png"), title)


def summary(results, is_cuda):
    """The issue's targets, stated as measured (no pass/fail judgement beyond the numbers)."""
    out = []
    keys = sorted({k for k, _ in results})
    get = lambda k, p: results.get((k, p), {}).get("ms")  # noqa: E731
    for k in keys:
        B, L, H, d = k
        tag = f"B={B} L={L} H={H} d={d}:"
        best = get(k, "auto") or get(k, "fused")
        if get(k, "authors") and best:
            out.append(f"{tag} authors' formulation / auto = {get(k, 'authors') / best:.1f}x (target >= 20x)")
        if get(k, "sdpa") and get(k, "auto"):
            out.append(f"{tag} rotate+SDPA / auto = {get(k, 'sdpa') / get(k, 'auto'):.2f}x (target >= 1.0x)")
        if get(k, "rope+sdpa") and get(k, "auto") and is_cuda:
            out.append(f"{tag} auto / RoPE+SDPA = {get(k, 'auto') / get(k, 'rope+sdpa'):.2f}x (target <= 1.10x)")
        if get(k, "sdpa-only") and get(k, "fused"):
            out.append(f"{tag} fused TFLOP/s / SDPA-flash TFLOP/s = {get(k, 'sdpa-only') / get(k, 'fused'):.0%} "
                       "(target >= 60%)")
        fused_peak = results.get((k, "fused"), {}).get("peak")
        if fused_peak is not None and L >= 16384:
            out.append(f"{tag} fused extra peak memory = {fmt_bytes(fused_peak)} (target <= 2 GiB)")
    return out


def plot(results, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_path = {}
    for (key, p), r in results.items():
        if "ms" in r:
            by_path.setdefault((p, key[3]), []).append((key[1], r["ms"]))
    for (p, d), pts in sorted(by_path.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} (d={d})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("forward + backward ms")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
