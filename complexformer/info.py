"""``python -m complexformer.info``: what was built, what torch sees, and a self-check of every op
on every available device (the convention of ``python -m xformers.info``)."""
import platform
import sys
import time

import torch

import complexformer
from complexformer import _selfcheck


def devices():
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def main(argv=None):
    info = complexformer.build_info()
    print(f"complexformer     {complexformer.__version__}")
    print(f"python            {platform.python_version()} ({sys.executable})")
    print(f"torch             {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"C compiler        {info['c_compiler']}, OpenMP: {info['openmp']}, threads: {torch.get_num_threads()}")
    if info["cuda"]:
        print(f"CUDA kernels      built with CUDA {info['cuda_version']} for sm_{', sm_'.join(info['cuda_archs'].split(';'))} + PTX")
    else:
        print("CUDA kernels      not built (no nvcc at build time)")
    for d in devices():
        name = torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()
        print(f"device            {d}: {name}")
    print()
    failures = 0
    for d in devices():
        if d.type == "cuda" and not info["cuda"]:
            print(f"{'(all ops)':<28} {str(d):<8} SKIP  (no CUDA kernels in this build)")
            continue
        for name, fn, tol in _selfcheck.CHECKS:
            t0 = time.perf_counter()
            try:
                err = float(fn(d))
                ok = err <= tol
                status = "ok  " if ok else "FAIL"
                detail = f"max err {err:.2e} (tol {tol:.0e})"
            except Exception as e:  # the self-check reports every failure, it does not stop
                ok, status, detail = False, "FAIL", f"{type(e).__name__}: {e}"
            failures += not ok
            print(f"{name:<28} {str(d):<8} {status}  {detail}  [{(time.perf_counter() - t0) * 1e3:.0f} ms]")
    print()
    print("self-check passed" if failures == 0 else f"self-check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
