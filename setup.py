"""Build complexformer._C: C11 CPU kernels always, CUDA kernels when nvcc is found.

torch is not a build dependency: the extension speaks the plain CPython C API and takes tensors
as DLPack capsules, so one build serves every torch version the Python layer supports.

Environment knobs:
  COMPLEXFORMER_NO_CUDA=1        build CPU kernels only, even where nvcc exists (CPU users: cuts
                                 the build from minutes to about half a minute)
  COMPLEXFORMER_CUDA_ARCHS=80;90 SM versions to emit machine code for (PTX for the newest)
  COMPLEXFORMER_WERROR=1         warnings are errors (CI sets this)
  COMPLEXFORMER_NVCC_FLAGS="..." extra nvcc flags, e.g. -lineinfo (for profilers)
  CUDA_HOME                      where the CUDA toolkit lives (else found from nvcc on PATH)
  MAX_JOBS                       parallel nvcc jobs
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
WERROR = os.environ.get("COMPLEXFORMER_WERROR") == "1"


def log(msg):
    print(f"complexformer: {msg}", file=sys.stderr, flush=True)


def find_cuda():
    """(nvcc, cuda_home) or (None, None)."""
    if os.environ.get("COMPLEXFORMER_NO_CUDA") == "1":
        return None, None
    candidates = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidates.append(os.path.join(home, "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for nvcc in candidates:
        if not os.path.isfile(nvcc):
            continue
        for root in (home, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
            if root and glob.glob(os.path.join(root, "lib*", "libcudart_static.a")) + glob.glob(
                os.path.join(root, "targets", "*", "lib", "libcudart_static.a")
            ):
                return nvcc, root
    return None, None


def cuda_lib_dir(home):
    for pat in ("lib64", "lib", os.path.join("targets", "*", "lib")):
        hits = glob.glob(os.path.join(home, pat, "libcudart_static.a"))
        if hits:
            return os.path.dirname(hits[0])
    raise RuntimeError(f"libcudart_static.a not found under {home}")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("COMPLEXFORMER_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return archs, flags


class BuildExt(build_ext):
    def build_extensions(self):
        ext = self.extensions[0]
        nvcc, home = find_cuda()
        cu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        if nvcc and cu_sources:
            version = nvcc_version(nvcc)
            archs, arch_flags = cuda_archs()
            log(f"building CUDA kernels with {nvcc} (CUDA {version}, sm_{', sm_'.join(archs)} + PTX): "
                f"{len(cu_sources)} files, a few minutes; COMPLEXFORMER_NO_CUDA=1 skips them (CPU only)")
            if sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia/version"):
                # still built: a wheel may be built here for a GPU machine, and CI checks that they compile
                log("no NVIDIA driver found on this machine: if it has no GPU, COMPLEXFORMER_NO_CUDA=1 "
                    "skips the CUDA kernels it cannot use")
            objects = self.compile_cuda(nvcc, cu_sources, arch_flags)
            ext.extra_objects += objects
            ext.library_dirs.append(cuda_lib_dir(home))
            ext.libraries += ["cudart_static", "rt", "pthread", "dl", "stdc++"]
            ext.define_macros += [
                ("CF_WITH_CUDA", "1"),
                ("CF_CUDA_VERSION", f'"{version}"'),
                ("CF_CUDA_ARCHS", '"' + ";".join(archs) + '"'),
            ]
        elif cu_sources:
            why = "COMPLEXFORMER_NO_CUDA=1" if os.environ.get("COMPLEXFORMER_NO_CUDA") == "1" else "nvcc not found"
            log(f"{why}: building the CPU kernels only, no CUDA kernels")
        super().build_extensions()

    def compile_cuda(self, nvcc, sources, arch_flags):
        os.makedirs(self.build_temp, exist_ok=True)
        headers = glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh"))
        newest_header = max((os.path.getmtime(h) for h in headers), default=0)
        flags = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", "-DCF_WITH_CUDA", f"-I{CSRC}",
                 "--expt-relaxed-constexpr", "-Xptxas", "-warn-spills"] + arch_flags
        if WERROR:
            flags += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]
        flags += os.environ.get("COMPLEXFORMER_NVCC_FLAGS", "").split()

        def one(src):
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            if os.path.exists(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), newest_header):
                return obj
            cmd = [nvcc, "-c", src, "-o", obj] + flags
            log(" ".join(cmd))
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.stdout or r.stderr:
                sys.stderr.write(r.stdout + r.stderr)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}")
            log(f"compiled {src} in {time.perf_counter() - t0:.0f} s")
            return obj

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, sources))


c_flags = ["-O3", "-std=c11", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
if WERROR:
    c_flags.append("-Werror")

setup(
    ext_modules=[
        Extension(
            "complexformer._C",
            sources=sorted(glob.glob(os.path.join(CSRC, "*.c"))),
            include_dirs=[CSRC],
            depends=sorted(glob.glob(os.path.join(CSRC, "*.h"))),  # a header change rebuilds the C files
            extra_compile_args=c_flags,
            extra_link_args=["-fopenmp", "-lm"],  # -lm: glibc libmvec (vector atan2f/sinf/cosf, rotate_cpu.c)
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
