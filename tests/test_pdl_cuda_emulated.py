"""csrc/pdl_cuda.cu on the CPU: its kernels compiled as host C++ under a threaded launch emulation
(tests/cuda_emu/emu_threads.h: one host thread per CUDA thread, real block barriers and warp
shuffles) and compared with the CPU kernel (pdl_cpu.c) by tests/cuda_emu/pdl_driver.cpp, so
indexing, the online-softmax reductions, the alignment / scalar paths, dtype conversions, the
denominator modes, NaN rows for bad targets, the shared-memory row cache whole, partial and absent
(emu_threads.h reports a device with little shared memory), the scale kernel and token_counts are
checked on machines without a GPU. Speed and real concurrency are test_pdl_cuda.py's job.
Needs g++ and the CUDA headers (cuda_fp16.h); skipped otherwise."""
import re

from cuda_emu_util import CSRC, build_and_run, rewrite_launches


def emulated_source(src):
    src = rewrite_launches(src, 8, "the prologue, loss, scale (2) and token_counts (4) launches")
    src, n = re.subn(r"extern __shared__ (\w+(?: \w+)?) (\w+)\[\];", r"\1 *\2 = (\1 *)emu_dyn_smem;", src)
    assert n == 2, "expected token_counts' histogram and the loss kernel's row cache"
    src = src.replace("__shared__", "static")  # one block at a time: block-shared arrays
    return '#include "emu_threads.h"\n' + src


def test_pdl_cuda_kernels_emulated(tmp_path):
    with open(f"{CSRC}/pdl_cuda.cu") as f:
        source = emulated_source(f.read())
    out = build_and_run(tmp_path, "pdl", source, "pdl_driver.cpp", "pdl_cpu.c", flags=("-ffp-contract=off", "-pthread"),
                        link_flags=("-pthread",))
    m = re.search(r"\b(\d+) cases, 0 failures \((\d+) vector accesses\)", out)
    assert m, out
    assert int(m.group(1)) > 100 and int(m.group(2)) > 0, out
