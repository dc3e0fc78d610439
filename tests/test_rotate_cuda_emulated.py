"""csrc/rotate_cuda.cu on the CPU: its kernels compiled as host C++ under a sequential launch
emulation (tests/cuda_emu/emu_runtime.h) and compared with the CPU kernel, so indexing, dtype
conversions, the q+k single launch, the chunked backward and vector-load alignment are checked on
machines without a GPU. Concurrency and speed are the real GPU tests' job (test_rotate_cuda.py).
Needs g++ and the CUDA headers (cuda_fp16.h); skipped otherwise."""
import re

from cuda_emu_util import CSRC, build_and_run, rewrite_launches


def emulated_source(src):
    """Launches become emu_launch calls; every vector access checks its alignment."""
    src = rewrite_launches(src, 3, "the forward, backward and reduce launches in rotate_cuda.cu")
    hook = re.compile(r"(void copy_(?:in|out)\((?:const )?T \*p\)(?: const)? \{)")
    src, m = hook.subn(r"\1 emu_check_aligned(p, sizeof(U));", src)
    assert m == 2, "expected Vec::copy_in and Vec::copy_out in rotate_cuda.cu"
    return '#include "emu_runtime.h"\n' + src


def test_rotate_cuda_kernels_emulated(tmp_path):
    with open(f"{CSRC}/rotate_cuda.cu") as f:
        source = emulated_source(f.read())
    out = build_and_run(tmp_path, "rotate", source, "rotate_driver.cpp", "rotate_cpu.c")
    assert re.search(r"\b60 cases, 0 failures", out), out
