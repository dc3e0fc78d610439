"""The fused-attention CUDA kernels (csrc/attn_*cuda*.cu, attn_cuda_tile.cuh) on the CPU.

Whatever kernels those files hold are compiled as host C++ under a fiber emulation of the CUDA
execution model (tests/cuda_emu/emu_fibers.h: one fiber per CUDA thread, real block / named
barriers, per-warp collectives; blocks one after another), with the PTX wrappers of
csrc/attn_cuda_ptx.cuh replaced by emulated twins (tests/cuda_emu/attn_cuda_ptx.cuh: ldmatrix,
mma.sync, cp.async with deferred completion, ex2). tests/cuda_emu/attn_driver.cpp calls the
extern "C" launchers cf_attn_fwd_cuda / cf_attn_bwd_cuda on host buffers, without the rotation
workspaces (the forward that rotates key tiles on load, the GQA path) and with them (the pre-rotated
forward and the backward), and compares out, lse, dq_rot, dk_rot, dv_full (and the workspaces'
rotated q~, k~) with the float64 CPU kernel (attn_cpu.c) on the same inputs.
Nothing here knows the kernels' tile shapes: a rewrite of the kernels is checked as it stands.

Two device passes run side by side: the kernels compiled as for sm_90 on an emulated H100 and as
for sm_80 (`__CUDA_ARCH__` = 800: the CF_ATTN_SM80_PASS tile splits) on an emulated A100 (whose
shared memory makes the launchers pick other tile configurations). Each run ends with the list of kernel instantiations it launched (what the run covered).

The emulation checks synchronisation too: warps run greedily ahead of each other (EMU_SCHED=asc |
desc; default: alternating per block), cp.async data lands only at its wait (the destination reads
as NaN until then) and shared memory starts as NaN, so a missing barrier or wait shows up as wrong
results; deadlocks, divergent warp collectives and misaligned ldmatrix / cp.async abort with an
"EMU:" message naming the block and thread.

Needs g++, gcc and the CUDA headers; skipped otherwise. CF_EMU_FULL=1 runs the long case list (a
seeded random sweep of 120 configurations, ~2 min). To check another checkout's kernels:
CF_EMU_CSRC=/path/to/csrc pytest tests/test_attn_cuda_emulated.py"""
import os
import re
import shutil
import subprocess

import pytest

from cuda_emu_util import _LAUNCH, CSRC, EMU, cuda_include_dir, run

CSRC_DIR = os.environ.get("CF_EMU_CSRC", CSRC)  # the kernels under test (default: this checkout's)
PTX_HEADER = "attn_cuda_ptx.cuh"

# inline-asm named barriers (bar.sync / bar.arrive id, n) -> the emulation's counted barriers
_NAMED_BAR = re.compile(r'asm\s+volatile\s*\(\s*"bar\.(sync|arrive)\s+%0,\s*%1;\\n"\s*::\s*"r"\(([^()]+)\),\s*'
                        r'"r"\(([^()]+)\)\s*:\s*"memory"\s*\)\s*;')
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\[\]\s*;")


def _keep_lines(m, text):
    return text + "\n" * m.group(0).count("\n")


def emulated_source(src, path):
    """One attention source rewritten for emu_fibers.h (launches, shared memory, named barriers)."""
    # k<<<cfg>>>(args); -> emu_launch_k((const void *)(k), cfg, [&]() { k(args); }); (same line count, so
    # compiler messages point at the original lines)
    src = _LAUNCH.sub(lambda m: _keep_lines(
        m, f"emu_launch_k((const void *)({m.group(1)}), {m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});"), src)
    src = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)} *{m.group(2)} = ({m.group(1)} *)emu_dyn_smem;", src)
    src = src.replace("__shared__", "static")  # one block at a time: block-shared arrays
    # the device pass being emulated (-DEMU_CUDA_ARCH=900 / 800): code that differs per architecture
    src = re.sub(r"\b__CUDA_ARCH__\b", "EMU_CUDA_ARCH", src)
    src = _NAMED_BAR.sub(lambda m: _keep_lines(m, f"emu_bar_{m.group(1)}({m.group(2)}, {m.group(3)});"), src)
    left = [f"{path}:{i + 1}: {line.strip()}" for i, line in enumerate(src.splitlines())
            if re.search(r"\basm\b", line) and not line.lstrip().startswith(("//", "/*", "*"))]
    assert not left, ("inline PTX outside attn_cuda_ptx.cuh has no emulation; move it into a wrapper there "
                      "(and add its twin to tests/cuda_emu/attn_cuda_ptx.cuh):\n" + "\n".join(left))
    return f'#line 1 "{path}"\n' + src


_DEVICE_FN = re.compile(r"__device__\s+(?:__forceinline__\s+|inline\s+)*[\w:<>,\s\*&]*?\b(\w+)\s*\(")


def check_ptx_twins():
    """Every wrapper of csrc/attn_cuda_ptx.cuh needs an emulated twin of the same name."""
    with open(os.path.join(CSRC_DIR, PTX_HEADER)) as f:
        real = set(_DEVICE_FN.findall(f.read()))
    with open(os.path.join(EMU, PTX_HEADER)) as f:
        emulated = f.read()
    missing = sorted(n for n in real if not re.search(rf"\b{n}\s*\(", emulated))
    assert not missing, (f"csrc/{PTX_HEADER} has wrappers without an emulated twin in tests/cuda_emu/{PTX_HEADER}: "
                         f"{', '.join(missing)} (emu_ldmatrix / emu_mma_16816 / emu_cp_async cover most PTX shapes)")
    assert {"ldsm_x4", "mma_16816"} <= real, f"cannot parse the wrappers of csrc/{PTX_HEADER}"


def prepare(build):
    """Rewritten copies of csrc's attention CUDA sources in `build`, with the emulated PTX header;
    returns the emulated translation units (one per .cu)."""
    names = sorted(f for f in os.listdir(CSRC_DIR) if f.startswith("attn") and f.endswith((".cu", ".cuh")))
    cus = [f for f in names if f.endswith(".cu")]
    assert cus and PTX_HEADER in names, f"no attention CUDA sources in {CSRC_DIR}"
    launches = 0
    units = []
    for name in names:
        if name == PTX_HEADER:
            continue
        path = os.path.join(CSRC_DIR, name)
        with open(path) as f:
            src = f.read()
        launches += len(_LAUNCH.findall(src))
        src = emulated_source(src, path)
        if name.endswith(".cu"):
            unit = build / (name[:-3] + "_emu.cpp")
            unit.write_text('#include "emu_fibers.h"\n' + src)
            units.append(str(unit))
        else:
            (build / name).write_text(src)
    assert launches >= 2, "expected kernel launches in the attention sources"
    shutil.copy(os.path.join(EMU, PTX_HEADER), build / PTX_HEADER)
    return units


# the device passes emulated: sm_90 on an H100-like device, sm_80 (CF_ATTN_SM80_PASS tiles) on an A100
ARCHS = {"sm90": (900, "h100"), "sm80": (800, "a100")}


def build_drivers(tmp_path):
    """The driver linked with the kernels compiled for each of ARCHS: {arch: exe}."""
    gxx, gcc, inc = shutil.which("g++"), shutil.which("gcc") or shutil.which("cc"), cuda_include_dir()
    if not (gxx and gcc and inc):
        pytest.skip("needs g++, a C compiler and the CUDA headers")
    check_ptx_twins()
    units = prepare(tmp_path)
    common = ["-O1", "-DCF_WITH_CUDA", f"-I{tmp_path}", f"-I{CSRC_DIR}", f"-I{EMU}", f"-I{inc}", "-w",
              "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    jobs = [(os.path.join(EMU, "emu_fibers.cpp"), gxx, "-std=c++17", []),
            (os.path.join(EMU, "attn_driver.cpp"), gxx, "-std=c++17", []),
            (os.path.join(CSRC_DIR, "attn_cpu.c"), gcc, "-std=c11", [])]
    for arch, (cc, _) in ARCHS.items():
        jobs += [(u, gxx, "-std=c++17", [f"-DEMU_CUDA_ARCH={cc}", f"-o{arch}"]) for u in units]
    objs, procs = {}, []
    for src, comp, std, extra in jobs:  # two at a time (CI has 2 cores)
        tag = next((x[2:] for x in extra if x.startswith("-o")), "")
        obj = str(tmp_path / f"{os.path.basename(src)}{'.' + tag if tag else ''}.o")
        objs.setdefault(tag, []).append(obj)
        cmd = [comp, std, *common, *[x for x in extra if not x.startswith("-o")], "-c", src, "-o", obj]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        if len(procs) == 2:
            _finish(procs)
    _finish(procs)
    exes = {}
    for arch in ARCHS:
        exes[arch] = str(tmp_path / f"attn_emu_{arch}")
        # -rdynamic: kernel names in EMU messages
        run([gxx, "-fopenmp", "-rdynamic", *objs[""], *objs[arch], "-o", exes[arch], "-lm", "-ldl"])
    return exes


def _finish(procs):
    for cmd, p in procs:
        out = p.communicate(timeout=900)[0]
        assert p.returncode == 0, f"{' '.join(cmd)}\n{out[-6000:]}"
    procs.clear()


def test_attn_cuda_kernels_emulated(tmp_path):
    exes = build_drivers(tmp_path)
    full = os.environ.get("CF_EMU_FULL", "") not in ("", "0")
    procs = {}
    for arch, exe in exes.items():  # both device passes at once (2 cores)
        env = dict(os.environ, EMU_DEVICE=ARCHS[arch][1])
        procs[arch] = subprocess.Popen([exe] + (["--full"] if full else []), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=env)
    logs = {arch: p.communicate(timeout=1800)[0] for arch, p in procs.items()}
    for arch, out in logs.items():
        print(f"==== {arch} ====\n{out[-20000:]}")
    for arch, out in logs.items():
        assert procs[arch].returncode == 0, f"{arch}:\n{out[-8000:]}"
        m = re.search(r"\b(\d+) cases, (\d+) failures", out)
        assert m, f"{arch}:\n{out[-4000:]}"
        assert int(m.group(2)) == 0, f"{arch}:\n{out[-8000:]}"
        assert int(m.group(1)) >= (60 if full else 30), f"{arch}:\n{out[-4000:]}"
