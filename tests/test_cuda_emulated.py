"""The CUDA kernels (csrc/*.cu) on the CPU, for machines without a GPU.

Each family's .cu sources are compiled as host C++ with every `kernel<<<grid, block, smem,
stream>>>(args)` launch rewritten into an emulated launch, linked with a driver
(tests/cuda_emu/<family>_driver.cpp) and the family's C kernel, and run: the driver calls the
extern "C" launchers on host buffers and compares their outputs with the C kernel's. Speed and
real concurrency are the GPU tests' job (test_*_cuda*.py).

- rotate (csrc/rotate_cuda.cu, emu_runtime.h: sequential launches): indexing, dtype conversions,
  the q+k single launch, the chunked backward, vector-load alignment (every vector access checks
  its alignment).
- pdl (csrc/pdl_cuda.cu, emu_threads.h: one host thread per CUDA thread, real block barriers and
  warp shuffles): indexing, the online-softmax reductions, the alignment / scalar paths, dtype
  conversions, the denominator modes, NaN rows for bad targets, the shared-memory row cache whole,
  partial and absent (emu_threads.h reports a device with little shared memory), the scale kernel
  and token_counts.
- attention (csrc/attn_*cuda*.cu, attn_cuda_tile.cuh; emu_fibers.h: one fiber per CUDA thread,
  real block / named barriers, per-warp collectives; blocks one after another), with the PTX
  wrappers of csrc/cuda_ptx.cuh replaced by emulated twins (tests/cuda_emu/cuda_ptx.cuh:
  ldmatrix, mma.sync, cp.async with deferred completion, ex2). The driver runs the forward without
  the rotation workspaces (key tiles rotated on load, the GQA path) and with them (the pre-rotated
  forward and the backward), and compares out, lse, dq_rot, dk_rot, dv_full (and the workspaces'
  q~, k~) with the float64 CPU kernel (attn_cpu.c). Nothing here knows the kernels' tile shapes.
  Two device passes run side by side: the kernels compiled as for sm_90 on an emulated H100 and as
  for sm_80 (`__CUDA_ARCH__` = 800: the CF_ATTN_SM80_PASS tile splits) on an emulated A100 (whose
  shared memory makes the launchers pick other tile configurations). Each run ends with the list
  of kernel instantiations it launched. Synchronisation is checked too: warps run greedily ahead of
  each other (EMU_SCHED=asc | desc; default: alternating per block), cp.async data lands only at
  its wait (the destination reads as NaN until then) and shared memory starts as NaN, so a missing
  barrier or wait shows up as wrong results; deadlocks, divergent warp collectives and misaligned
  ldmatrix / cp.async abort with an "EMU:" message naming the block and thread. The long case list
  (a seeded random sweep of 120 configurations) is marked slow.

Needs g++, gcc and the CUDA headers (cuda_fp16.h); skipped otherwise. To check another checkout's
kernels: CF_EMU_CSRC=/path/to/csrc pytest tests/test_cuda_emulated.py"""
import os
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EMU = os.path.join(HERE, "cuda_emu")
CSRC = os.environ.get("CF_EMU_CSRC", os.path.join(os.path.dirname(HERE), "csrc"))  # the kernels under test
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\[\]\s*;")


def _keep_lines(m, text):
    """text padded with the newlines of the match it replaces, so compiler messages keep their lines."""
    return text + "\n" * m.group(0).count("\n")


def rewrite_launches(src, min_launches, what, launch="emu_launch", with_kernel=False):
    """k<<<cfg>>>(args); -> launch(cfg, [&]() { k(args); }); (with_kernel: launch((const void *)(k), cfg, ...))."""
    def sub(m):
        head = f"(const void *)({m.group(1)}), " if with_kernel else ""
        return _keep_lines(m, f"{launch}({head}{m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});")

    src, n = _LAUNCH.subn(sub, src)
    assert n >= min_launches, f"expected {what}, found {n} launches"
    return src


def shared_to_host(src, expect=None, what=""):
    """Dynamic shared memory -> the emulation's buffer; static __shared__ arrays -> statics (one block
    runs at a time)."""
    src, n = _EXTERN_SHARED.subn(lambda m: f"{m.group(1)} *{m.group(2)} = ({m.group(1)} *)emu_dyn_smem;", src)
    assert expect is None or n == expect, f"expected {what}"
    return src.replace("__shared__", "static")


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


def run(cmd, timeout=600, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def toolchain():
    gxx, gcc, inc = shutil.which("g++"), shutil.which("gcc") or shutil.which("cc"), cuda_include_dir()
    if not (gxx and gcc and inc):
        pytest.skip("needs g++, a C compiler and the CUDA headers")
    return gxx, gcc, inc


def build(tmp_path, name, units, driver, c_kernel, flags=(), link_flags=(), variants=None, support=()):
    """Compile the emulated units (host C++ sources in tmp_path), tests/cuda_emu/<driver>, the
    emulation's own sources (support) and csrc/<c_kernel>, two at a time (CI has 2 cores); link one
    executable per variant. variants: {tag: extra flags of the emulated units}, default one plain
    build. Returns {tag: exe}."""
    gxx, gcc, inc = toolchain()
    common = ["-O1", "-DCF_WITH_CUDA", f"-I{tmp_path}", f"-I{CSRC}", f"-I{EMU}", f"-I{inc}", "-w",
              "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *flags]
    variants = variants or {"": []}
    jobs = [("", os.path.join(EMU, f), gxx, "-std=c++17", []) for f in (*support, driver)]
    jobs.append(("", os.path.join(CSRC, c_kernel), gcc, "-std=c11", []))
    jobs += [(tag, u, gxx, "-std=c++17", extra) for tag, extra in variants.items() for u in units]
    objs, procs = {}, []
    for tag, src, comp, std, extra in jobs:
        obj = str(tmp_path / f"{os.path.basename(src)}{'.' + tag if tag else ''}.o")
        objs.setdefault(tag, []).append(obj)
        cmd = [comp, std, *common, *extra, "-c", src, "-o", obj]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        if len(procs) == 2:
            _finish(procs)
    _finish(procs)
    exes = {}
    for tag in variants:
        exes[tag] = str(tmp_path / f"{name}_emu{'_' + tag if tag else ''}")
        # -rdynamic: kernel names in EMU messages
        own = objs[tag] if tag else []
        run([gxx, "-fopenmp", "-rdynamic", *link_flags, *objs[""], *own, "-o", exes[tag], "-lm", "-ldl"])
    return exes


def _finish(procs):
    for cmd, p in procs:
        out = p.communicate(timeout=900)[0]
        assert p.returncode == 0, f"{' '.join(cmd)}\n{out[-6000:]}"
    procs.clear()


def _read(name):
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


# ---- the PTX header ----------------------------------------------------------------------------
# Every inline PTX instruction of the kernels sits behind a wrapper in csrc/cuda_ptx.cuh; each
# emulated build directory gets tests/cuda_emu/cuda_ptx.cuh in its place.
PTX_HEADER = "cuda_ptx.cuh"
_DEVICE_FN = re.compile(r"__device__\s+(?:__forceinline__\s+|inline\s+)*[\w:<>,\s\*&]*?\b(\w+)\s*\(")


def no_inline_ptx(src, path):
    """src, checked to hold no inline asm (outside csrc/cuda_ptx.cuh it would have no emulation)."""
    left = [f"{path}:{i + 1}: {line.strip()}" for i, line in enumerate(src.splitlines())
            if re.search(r"\basm\b", line) and not line.lstrip().startswith(("//", "/*", "*"))]
    assert not left, (f"inline PTX outside {PTX_HEADER} has no emulation; move it into a wrapper there "
                      f"(and add its twin to tests/cuda_emu/{PTX_HEADER}):\n" + "\n".join(left))
    return src


def stage_headers(build_dir, rewrite=None):
    """csrc's CUDA headers in build_dir (so that their own includes resolve there too), each passed
    through rewrite(src, path) (default: checked by no_inline_ptx), with the emulated PTX header in
    place of the real one."""
    check_ptx_twins()
    rewrite = rewrite or (lambda src, path: f'#line 1 "{path}"\n' + no_inline_ptx(src, path))
    for name in sorted(f for f in os.listdir(CSRC) if f.endswith(".cuh") and f != PTX_HEADER):
        (build_dir / name).write_text(rewrite(_read(name), os.path.join(CSRC, name)))
    shutil.copy(os.path.join(EMU, PTX_HEADER), build_dir / PTX_HEADER)


def check_ptx_twins():
    """Every wrapper of csrc/cuda_ptx.cuh needs an emulated twin of the same name."""
    real = set(_DEVICE_FN.findall(_read(PTX_HEADER)))
    with open(os.path.join(EMU, PTX_HEADER)) as f:
        emulated = f.read()
    missing = sorted(n for n in real if not re.search(rf"\b{n}\s*\(", emulated))
    assert not missing, (f"csrc/{PTX_HEADER} has wrappers without an emulated twin in tests/cuda_emu/{PTX_HEADER}: "
                         f"{', '.join(missing)} (emu_ldmatrix / emu_mma_16816 / emu_cp_async cover most PTX shapes)")
    assert {"ldsm_x4", "mma_16816", "ex2_fast"} <= real, f"cannot parse the wrappers of csrc/{PTX_HEADER}"


# ---- rotate ------------------------------------------------------------------------------------
def rotate_source(src):
    src = no_inline_ptx(src, "rotate_cuda.cu")
    src = rewrite_launches(src, 3, "the forward, backward and reduce launches in rotate_cuda.cu")
    hook = re.compile(r"(void copy_(?:in|out)\((?:const )?T \*p\)(?: const)? \{)")
    src, m = hook.subn(r"\1 emu_check_aligned(p, sizeof(U));", src)
    assert m == 2, "expected Vec::copy_in and Vec::copy_out in rotate_cuda.cu"
    return '#include "emu_runtime.h"\n' + src


def test_rotate_cuda_kernels_emulated(tmp_path):
    unit = tmp_path / "rotate_cuda_emu.cpp"
    unit.write_text(rotate_source(_read("rotate_cuda.cu")))
    stage_headers(tmp_path)
    exe = build(tmp_path, "rotate", [str(unit)], "rotate_driver.cpp", "rotate_cpu.c")[""]
    out = run([exe])
    assert re.search(r"\b60 cases, 0 failures", out), out


# ---- pdl ---------------------------------------------------------------------------------------
def pdl_source(src):
    src = no_inline_ptx(src, "pdl_cuda.cu")
    src = rewrite_launches(src, 8, "the prologue, loss, scale (2) and token_counts (4) launches")
    src = shared_to_host(src, 2, "token_counts' histogram and the loss kernel's row cache")
    return '#include "emu_threads.h"\n' + src


def test_pdl_cuda_kernels_emulated(tmp_path):
    unit = tmp_path / "pdl_cuda_emu.cpp"
    unit.write_text(pdl_source(_read("pdl_cuda.cu")))
    stage_headers(tmp_path)
    exe = build(tmp_path, "pdl", [str(unit)], "pdl_driver.cpp", "pdl_cpu.c", flags=("-ffp-contract=off", "-pthread"),
                link_flags=("-pthread",))[""]
    out = run([exe])
    m = re.search(r"\b(\d+) cases, 0 failures \((\d+) vector accesses\)", out)
    assert m, out
    assert int(m.group(1)) > 100 and int(m.group(2)) > 0, out


# ---- attention ---------------------------------------------------------------------------------
# inline-asm named barriers (bar.sync / bar.arrive id, n) -> the emulation's counted barriers
_NAMED_BAR = re.compile(r'asm\s+volatile\s*\(\s*"bar\.(sync|arrive)\s+%0,\s*%1;\\n"\s*::\s*"r"\(([^()]+)\),\s*'
                        r'"r"\(([^()]+)\)\s*:\s*"memory"\s*\)\s*;')
# the device passes emulated: sm_90 on an H100-like device, sm_80 (CF_ATTN_SM80_PASS tiles) on an A100
ARCHS = {"sm90": (900, "h100"), "sm80": (800, "a100")}


def attn_source(src, path):
    """One attention source rewritten for emu_fibers.h (launches, shared memory, named barriers)."""
    src = rewrite_launches(src, 0, "", launch="emu_launch_k", with_kernel=True)
    src = shared_to_host(src)
    # the device pass being emulated (-DEMU_CUDA_ARCH=900 / 800): code that differs per architecture
    src = re.sub(r"\b__CUDA_ARCH__\b", "EMU_CUDA_ARCH", src)
    src = _NAMED_BAR.sub(lambda m: _keep_lines(m, f"emu_bar_{m.group(1)}({m.group(2)}, {m.group(3)});"), src)
    return f'#line 1 "{path}"\n' + no_inline_ptx(src, path)


def prepare_attn(build_dir):
    """Rewritten copies of csrc's attention CUDA sources and of the headers in build_dir, with the
    emulated PTX header; returns the emulated translation units (one per .cu)."""
    names = sorted(f for f in os.listdir(CSRC) if f.startswith("attn") and f.endswith(".cu"))
    assert names, f"no attention CUDA sources in {CSRC}"
    units = []
    for name in names:
        src = _read(name)
        unit = build_dir / (name[:-3] + "_emu.cpp")
        unit.write_text('#include "emu_fibers.h"\n' + attn_source(src, os.path.join(CSRC, name)))
        units.append(str(unit))
    stage_headers(build_dir, attn_source)
    launches = sum(len(_LAUNCH.findall(_read(f))) for f in os.listdir(CSRC) if f.startswith("attn") and ".cu" in f)
    assert launches >= 2, "expected kernel launches in the attention sources"
    return units


def run_attn(tmp_path, full):
    toolchain()
    units = prepare_attn(tmp_path)
    exes = build(tmp_path, "attn", units, "attn_driver.cpp", "attn_cpu.c", support=("emu_fibers.cpp",),
                 variants={arch: [f"-DEMU_CUDA_ARCH={cc}"] for arch, (cc, _) in ARCHS.items()})
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
        assert int(m.group(1)) >= (250 if full else 60), f"{arch}:\n{out[-4000:]}"


def test_attn_cuda_kernels_emulated(tmp_path):
    run_attn(tmp_path, full=False)


@pytest.mark.slow
def test_attn_cuda_kernels_emulated_full(tmp_path):
    run_attn(tmp_path, full=True)
