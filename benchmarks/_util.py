"""Shared benchmark helpers: wall-clock timing, peak memory, markdown tables.

Timing: median of ``reps`` runs after ``warmup`` runs; CUDA runs are timed with events on the
current stream, CPU runs with perf_counter.

Peak memory ("extra peak"): the most memory held at any point while ``fn`` runs, minus what was
held just before it (so inputs that already exist are not counted; outputs and gradients are).
CUDA: torch.cuda.max_memory_allocated (the caching allocator's own count). CPU: the process's
resident-set high-water mark (VmHWM in /proc/self/status), reset to the current RSS first through
/proc/self/clear_refs; run each CPU case in a fresh process (``run_worker``) so that one case's
allocator caches and imports do not hide another's peak.
"""
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns, reps, device, desc=None):
    """{name: [ms, ...]} of ``fns`` ({name: fn}) timed in turns: rep 1 of every fn, then rep 2, ...
    (a load change on a shared machine hits every fn alike). ``desc``: a tqdm progress bar."""
    from tqdm.auto import tqdm

    times = {p: [] for p in fns}
    for _ in tqdm(range(reps), desc=desc, disable=desc is None):
        for p, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[p].append((time.perf_counter() - t) * 1e3)
    return times


def time_ms(fn, *, device, reps=10, warmup=2, max_seconds=None):
    """Median milliseconds of fn() over ``reps`` runs. ``max_seconds`` caps the total: slow cases
    get fewer repetitions (at least one), so a run stays bounded on slow machines."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(dev)
    first = (time.perf_counter() - t0) / max(warmup, 1)
    if max_seconds is not None and warmup:
        reps = max(1, min(reps, int(max_seconds / max(first, 1e-9))))
    times = []
    if dev.type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def triton_entry(device, module, attr):
    """``module.attr`` of an optional triton package (Liger-Kernel, cut-cross-entropy), or a string
    saying why it is skipped: such packages run on CUDA only and may be absent (the GPU machine gets
    them as wheels: benchmarks/fetch_wheels.sh). Any import failure is reported, never raised."""
    if torch.device(device).type != "cuda":
        return "CUDA only (triton)"
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, or triton failing to initialise: a skipped row, not a crash
        return f"not importable ({e.__class__.__name__}: {e})"


def host_ms(fn, *, device, reps=50, warmup=3):
    """Median host-side milliseconds of one fn() call, no synchronisation around it: the Python +
    dispatcher + launch cost the host pays per call while the device runs behind (on CUDA that is
    the dispatch time as long as fn itself never waits for the device)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    sync(device)
    return statistics.median(times)


def back_to_back_ms(fn, *, device, reps=20, warmup=2):
    """Milliseconds per call of ``reps`` calls issued back to back, one sync at the end: on CUDA the
    device's throughput once the host enqueues ahead (time_ms syncs after every call, so it also
    counts the host's dispatch gaps, which dominate small sizes)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if torch.device(device).type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e3 / reps


def gpu_kernel_times(fn, calls=5):
    """CUDA: [(GPU ms per call, launches per call, name)] of every kernel (and memset / memcpy) that
    fn() runs, by torch.profiler over ``calls`` calls after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        t = ev.cuda_time_total if t is None else t
        if t > 0:
            rows.append((t / calls / 1e3, ev.count / calls, ev.key))
    return sorted(rows, reverse=True)


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_rss_reset():
    """Reset VmHWM to the current RSS; returns the current RSS in bytes (the baseline)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then includes earlier allocations
        pass
    return _proc_status_kb("VmRSS") * 1024


def cpu_rss_peak():
    return _proc_status_kb("VmHWM") * 1024


def peak_bytes(fn, *, device):
    """Extra peak memory of one fn() call (see the module docstring), in bytes."""
    dev = torch.device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    base = cpu_rss_reset()
    fn()
    return max(0, cpu_rss_peak() - base)


def run_worker(script, payload, *, timeout=None):
    """Run ``python script --_worker JSON`` in a fresh process; return the dict it printed on its
    last ``RESULT {...}`` line (raises with the worker's stderr tail on failure)."""
    cmd = [sys.executable, script, "--_worker", json.dumps(payload)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed (rc={r.returncode}): {r.stderr[-2000:]}")


def worker_result(d):
    print("RESULT " + json.dumps(d), flush=True)


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def markdown_table(headers, rows):
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])
