"""Shared by the emulated CUDA tests (test_*_cuda_emulated.py): a .cu file's kernels compiled as host
C++ with every `kernel<<<grid, block, ...>>>(args)` launch turned into an `emu_launch` call, linked
with a driver (tests/cuda_emu/*_driver.cpp) and the C kernel it is compared with, then run."""
import os
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
EMU = os.path.join(HERE, "cuda_emu")
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


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


def rewrite_launches(src, min_launches, what):
    src, n = _LAUNCH.subn(lambda m: f"emu_launch({m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});", src)
    assert n >= min_launches, f"expected {what}"
    return src


def run(cmd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def build_and_run(tmp_path, name, unit_source, driver, c_kernel, flags=(), link_flags=()):
    """Compile the emulated unit, tests/cuda_emu/<driver> and csrc/<c_kernel>; link; run; stdout."""
    gxx, gcc, inc = shutil.which("g++"), shutil.which("gcc") or shutil.which("cc"), cuda_include_dir()
    if not (gxx and gcc and inc):
        pytest.skip("needs g++, a C compiler and the CUDA headers")
    unit = tmp_path / f"{name}_emu.cpp"
    unit.write_text(unit_source)
    common = ["-O1", "-DCF_WITH_CUDA", f"-I{CSRC}", f"-I{EMU}", f"-I{inc}", "-w", *flags]
    objs = []
    for src, comp, std in ((str(unit), gxx, "-std=c++17"), (os.path.join(EMU, driver), gxx, "-std=c++17"),
                           (os.path.join(CSRC, c_kernel), gcc, "-std=c11")):
        obj = str(tmp_path / (os.path.basename(src) + ".o"))
        run([comp, std, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *common, "-c", src, "-o", obj])
        objs.append(obj)
    exe = str(tmp_path / f"{name}_emu")
    run([gxx, "-fopenmp", *link_flags, *objs, "-o", exe, "-lm"])
    return run([exe])
