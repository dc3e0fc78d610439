"""csrc/pdl_cuda.cu on the CPU: its kernels compiled as host C++ under a threaded launch emulation
(tests/cuda_emu/emu_threads.h: one host thread per CUDA thread, real block barriers and warp
shuffles) and compared with the CPU kernel (pdl_cpu.c) by tests/cuda_emu/pdl_driver.cpp, so
indexing, the online-softmax reductions, the alignment / scalar paths, dtype conversions, the
denominator modes, NaN rows for bad targets, both fused-kernel variants (the shared-memory row
cache whole, partial and absent: emu_threads.h reports a device with little shared memory), the
scale kernel and token_counts are checked on
machines without a GPU. Speed and real concurrency are test_pdl_cuda.py's job.
Needs g++ and the CUDA headers (cuda_fp16.h); skipped otherwise."""
import os
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
EMU = os.path.join(HERE, "cuda_emu")


def cuda_include_dir():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes.append("/usr/local/cuda")
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


def emulated_source(src):
    launch = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)
    src, n = launch.subn(lambda m: f"emu_launch({m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});", src)
    assert n >= 7, "expected the prologue, loss (legacy 2, cached 1), scale (2) and token_counts launches"
    src, n = re.subn(r"extern __shared__ (\w+(?: \w+)?) (\w+)\[\];", r"\1 *\2 = (\1 *)emu_dyn_smem;", src)
    assert n == 2, "expected token_counts' histogram and the cached loss kernel's row cache"
    src = src.replace("__shared__", "static")  # one block at a time: block-shared arrays
    return '#include "emu_threads.h"\n' + src


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_pdl_cuda_kernels_emulated(tmp_path):
    gxx, gcc, inc = shutil.which("g++"), shutil.which("gcc") or shutil.which("cc"), cuda_include_dir()
    if not (gxx and gcc and inc):
        pytest.skip("needs g++, a C compiler and the CUDA headers")
    unit = tmp_path / "pdl_cuda_emu.cpp"
    with open(os.path.join(CSRC, "pdl_cuda.cu")) as f:
        unit.write_text(emulated_source(f.read()))
    common = ["-O1", "-ffp-contract=off", "-DCF_WITH_CUDA", f"-I{CSRC}", f"-I{EMU}", f"-I{inc}", "-w", "-pthread"]
    objs = []
    for src, comp, std in ((str(unit), gxx, "-std=c++17"), (os.path.join(EMU, "pdl_driver.cpp"), gxx, "-std=c++17"),
                           (os.path.join(CSRC, "pdl_cpu.c"), gcc, "-std=c11")):
        obj = str(tmp_path / (os.path.basename(src) + ".o"))
        run([comp, std, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *common, "-c", src, "-o", obj])
        objs.append(obj)
    exe = str(tmp_path / "pdl_emu")
    run([gxx, "-fopenmp", "-pthread", *objs, "-o", exe, "-lm"])
    out = run([exe])
    m = re.search(r"\b(\d+) cases, 0 failures \((\d+) vector accesses\)", out)
    assert m, out
    assert int(m.group(1)) > 100 and int(m.group(2)) > 0, out
