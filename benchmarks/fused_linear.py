"""Benchmark: complexformer.fused_linear_pdl_loss (LM head + PDL, no N x V logits) against the
unfused LM head + loss, forward + backward, on the same inputs in the same run.

Cases (h: (N, D), W: (V, D), both requiring grad; w: PDL class weights):
  fused      fused_linear_pdl_loss(h, W, y, w)                      (chunk size: the default rule)
  pdl        pdl_loss(F.linear(h, W), y, w)
  eager      F.cross_entropy(F.linear(h, W), y, weight=w)
  compile    torch.compile of the "eager" function
  liger      LigerFusedLinearCrossEntropyLoss(ce_weight=w)(W, h, y)  (CUDA, if importable)
  cce        cut_cross_entropy.linear_cross_entropy(h, W, y)          (CUDA, if importable;
             unweighted: for reference only, it computes plain CE)

Time: every repetition runs each case once, in turn (interleaved, so a load change on a shared
machine hits all of them alike); reported as the minimum and the median over --reps, after
--warmup rounds. Ratios are min(case) / min(eager): < 1 is faster than linear + CE.
Peak memory: the extra peak of one forward + backward above the inputs (gradients included;
benchmarks/_util.py): CUDA allocator statistics; on the CPU the resident-set high-water mark,
each case in a fresh process (so one case's freed memory does not hide another's peak).

Usage:
  python benchmarks/fused_linear.py                                   # CPU float32 4096x1024x32000
  python benchmarks/fused_linear.py --device cuda --dtype bfloat16 --sizes 16384x4096x128256
  python benchmarks/fused_linear.py --chunks 256,512,1024             # also time fused at fixed chunks
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import fmt_bytes, markdown_table, peak_bytes, run_worker, sync, triton_entry, worker_result  # noqa: E402

import complexformer as cf  # noqa: E402
from complexformer.fused_linear import fused_linear_chunk_rows  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_sizes(text):
    return [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",")]


def make_inputs(N, D, V, dtype, device):
    torch.manual_seed(0)
    with torch.no_grad():
        h = (torch.randn(N, D, device=device, dtype=dtype)).requires_grad_()
        W = (torch.randn(V, D, device=device, dtype=dtype) / D ** 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    y[::10] = -100  # some padding
    w = cf.pdl_weights(torch.randint(1, 10_000, (V,)), max_weight=100.0).to(device)
    return h, W, y, w


def eager_ce(h, W, y, w):
    return F.cross_entropy(F.linear(h, W), y, weight=w.to(h.dtype))


def triton_case(name, device):
    """Liger-Kernel's fused linear CE with ce_weight, or cut-cross-entropy (unweighted): the loss
    function, or why it is skipped."""
    if name == "liger":
        cls = triton_entry(device, "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
        return cls if isinstance(cls, str) else (lambda h, W, y, w: cls(ce_weight=w)(W, h, y))
    fn = triton_entry(device, "cut_cross_entropy", "linear_cross_entropy")
    return fn if isinstance(fn, str) else (lambda h, W, y, w: fn(h, W, y))


def case_fns(names, device):
    """name -> loss(h, W, y, w), or a string saying why it is skipped."""
    out = {}
    for name in names:
        if name == "fused":
            out[name] = lambda h, W, y, w: cf.fused_linear_pdl_loss(h, W, y, w)
        elif name.startswith("fused@"):
            c = int(name[6:])
            out[name] = lambda h, W, y, w, c=c: cf.fused_linear_pdl_loss(h, W, y, w, chunk_size=c)
        elif name == "pdl":
            out[name] = lambda h, W, y, w: cf.pdl_loss(F.linear(h, W), y, w)
        elif name == "eager":
            out[name] = eager_ce
        elif name == "compile":
            out[name] = torch.compile(eager_ce)
        elif name in ("liger", "cce"):
            out[name] = triton_case(name, device)
        else:
            raise ValueError(f"unknown case {name!r}")
    return out


def step(fn, h, W, y, w):
    def run():
        loss = fn(h, W, y, w)
        loss.backward()
        h.grad = W.grad = None
    return run


def interleaved_times(runs, device, reps, warmup):
    """name -> list of seconds; each repetition runs every case once, in turn."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for name, run in runs.items():
            sync(device)
            t = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def peak_of(name, size, dtype, device):
    """Extra peak bytes of one forward + backward of case ``name`` (after one warm-up run)."""
    N, D, V = size
    h, W, y, w = make_inputs(N, D, V, dtype, device)
    fn = case_fns([name], device)[name]
    run = step(fn, h, W, y, w)
    run()  # compile / allocate workspaces first
    return peak_bytes(run, device=device)


def worker(payload):
    torch.set_num_threads(payload["threads"])
    dtype = DTYPES[payload["dtype"]]
    worker_result({"peak": peak_of(payload["case"], tuple(payload["size"]), dtype, torch.device("cpu"))})


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        import json

        return worker(json.loads(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--sizes", default=None, help="comma-separated NxDxV (default: 4096x1024x32000 on the CPU, "
                                                  "16384x4096x128256 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", default="fused,pdl,eager,compile,liger,cce")
    p.add_argument("--chunks", default="", help="also time fused_linear_pdl_loss at these fixed chunk sizes")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    sizes = parse_sizes(args.sizes) if args.sizes else [(16384, 4096, 128256) if device.type == "cuda"
                                                        else (4096, 1024, 32000)]
    names = [c for c in args.cases.split(",") if c] + [f"fused@{c}" for c in args.chunks.split(",") if c]
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {dtype}")
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {dtype} "
              f"(timings on a shared machine are noisy: compare within this run)")
    from tqdm.auto import tqdm

    for size in sizes:
        N, D, V = size
        print(f"\nN={N} D={D} V={V}: default chunk {fused_linear_chunk_rows(N, D, V, dtype, device)} rows; "
              f"one N x V logits buffer = {fmt_bytes(N * V * torch.empty(0, dtype=dtype).element_size())}")
        fns = case_fns(names, device)
        for k, v in list(fns.items()):
            if isinstance(v, str):
                print(f"skip {k}: {v}")
                del fns[k]
        h, W, y, w = make_inputs(N, D, V, dtype, device)
        runs = {k: step(f, h, W, y, w) for k, f in fns.items()}
        times = interleaved_times(runs, device, args.reps, args.warmup)
        del runs, h, W, y, w
        peaks = {}
        if not args.no_memory:
            for k in tqdm(list(fns), desc="peak memory", leave=False):
                if device.type == "cuda":
                    peaks[k] = peak_of(k, size, dtype, device)
                else:
                    payload = {"case": k, "size": list(size), "dtype": str(dtype).split(".")[-1],
                               "threads": torch.get_num_threads()}
                    peaks[k] = run_worker(os.path.abspath(__file__), payload)["peak"]
        base_t = min(times["eager"]) if "eager" in times else None
        base_m = peaks.get("eager")
        rows = []
        for k, ts in times.items():
            m = peaks.get(k)
            rows.append([k, f"{min(ts) * 1e3:.0f}", f"{statistics.median(ts) * 1e3:.0f}",
                         f"{min(ts) / base_t:.2f}" if base_t else "-", fmt_bytes(m),
                         f"{m / base_m:.3f}" if m is not None and base_m else "-"])
        print(markdown_table(["case", "min ms", "median ms", "time / eager", "peak mem", "mem / eager"], rows))


if __name__ == "__main__":
    main()
