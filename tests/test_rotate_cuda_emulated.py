"""csrc/rotate_cuda.cu on the CPU: its kernels compiled as host C++ under a sequential launch
emulation (tests/cuda_emu/emu_runtime.h) and compared with the CPU kernel, so indexing, dtype
conversions, the q+k single launch, the chunked backward and vector-load alignment are checked on
machines without a GPU. Concurrency and speed are the real GPU tests' job (test_rotate_cuda.py).
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
    """Launches become emu_launch calls; every vector access checks its alignment."""
    launch = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)
    src, n = launch.subn(lambda m: f"emu_launch({m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});", src)
    assert n >= 3, "expected the forward, backward and reduce launches in rotate_cuda.cu"
    hook = re.compile(r"(void copy_(?:in|out)\((?:const )?T \*p\)(?: const)? \{)")
    src, m = hook.subn(r"\1 emu_check_aligned(p, sizeof(U));", src)
    assert m == 2, "expected Vec::copy_in and Vec::copy_out in rotate_cuda.cu"
    return '#include "emu_runtime.h"\n' + src


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_rotate_cuda_kernels_emulated(tmp_path):
    gxx, gcc, inc = shutil.which("g++"), shutil.which("gcc") or shutil.which("cc"), cuda_include_dir()
    if not (gxx and gcc and inc):
        pytest.skip("needs g++, a C compiler and the CUDA headers")
    unit = tmp_path / "rotate_cuda_emu.cpp"
    with open(os.path.join(CSRC, "rotate_cuda.cu")) as f:
        unit.write_text(emulated_source(f.read()))
    common = ["-O1", "-DCF_WITH_CUDA", f"-I{CSRC}", f"-I{EMU}", f"-I{inc}", "-w"]
    objs = []
    for src, comp, std in ((str(unit), gxx, "-std=c++17"), (os.path.join(EMU, "rotate_driver.cpp"), gxx, "-std=c++17"),
                           (os.path.join(CSRC, "rotate_cpu.c"), gcc, "-std=c11")):
        obj = str(tmp_path / (os.path.basename(src) + ".o"))
        run([comp, std, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *common, "-c", src, "-o", obj])
        objs.append(obj)
    exe = str(tmp_path / "rotate_emu")
    run([gxx, "-fopenmp", *objs, "-o", exe, "-lm"])
    out = run([exe])
    assert re.search(r"\b60 cases, 0 failures", out), out
