"""Small helpers shared by the benchmarks: timing, peak memory, a text table.

Timing: ``time_fn`` runs ``fn`` ``warmup`` times, then ``reps`` timed runs, and returns the
median in seconds (CUDA: each run is bracketed by CUDA events on the current stream, so only
device time between the two events is counted; CPU: wall-clock perf_counter).

Peak memory: ``peak_memory`` returns the bytes ``fn`` allocates *above* what is live when it
starts (inputs excluded), at its peak:
  * CUDA: torch's caching-allocator statistics (max_memory_allocated - memory_allocated).
  * CPU: torch has no CPU allocator statistics, and tracemalloc cannot see torch's allocations,
    so this is the process's resident-set high-water mark: the kernel's VmHWM is reset by
    writing "5" to /proc/self/clear_refs, ``fn`` runs, and VmHWM - VmRSS(before) is reported.
    Large tensors (> 32 MB) are mmap'ed and unmapped by glibc on free, so each benchmark buffer
    is counted; small allocations recycled from the heap may be missed (an underestimate by at
    most a few MB). Where /proc/self/clear_refs is not writable, None is returned.
"""
import statistics
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, warmup=3, reps=10, device="cpu"):
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn, device="cpu"):
    """Peak bytes allocated by ``fn()`` above the memory live when it starts (None: unavailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(rows, headers):
    """Print rows (lists of values; floats shown with 3 significant digits) under headers."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
