"""The bridge to complexformer._C: DLPack views, the current CUDA stream, the build's capabilities.
(Argument checks live in checks.py.)

Outputs and workspaces are always allocated here, by torch, so the caching allocator and CUDA
graphs keep working; the C side only ever borrows memory for the duration of one call.
"""
import torch
from torch.autograd import forward_ad
from torch.utils.dlpack import to_dlpack

try:
    from . import _C
except ImportError as e:  # the usual cause: importing the source tree (cwd) instead of the install
    import os as _os

    raise ImportError(
        "complexformer._C, the compiled extension, is missing from "
        f"{_os.path.dirname(_os.path.abspath(__file__))}. If that is the source checkout, run Python "
        "from another directory to use the installed package, or build in place with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`)."
    ) from e

_BUILD = _C.build_info()
HAS_CUDA_KERNELS = bool(_BUILD["cuda"])


def build_info():
    """What this build contains: {'cuda': bool, 'cuda_version', 'cuda_archs', 'openmp', 'c_compiler'}."""
    return dict(_BUILD)


def dl(t):
    """A borrowed DLPack view of ``t`` for one call into _C."""
    return to_dlpack(t)


def dl_opt(t):
    return None if t is None else to_dlpack(t)


def stream(t):
    """The caller's current stream on ``t``'s device, as an integer handle (0 on CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def num_threads():
    """CPU kernels use as many threads as torch does (torch.set_num_threads applies to them)."""
    return torch.get_num_threads()


def require_cuda_kernels(op, t):
    if t.device.type == "cuda" and not HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{op}: complexformer was built without CUDA kernels (no nvcc at build time); "
            "reinstall with nvcc on PATH or CUDA_HOME set"
        )


def needs_torch_math(*tensors):
    """True when a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) is active or
    a tensor carries a forward-mode tangent (torch.autograd.forward_ad). The kernels' autograd is
    reverse mode only, so the public functions then run their plain-PyTorch math, which every
    transform composes with (rather than silently returning a zero tangent)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    for t in tensors:
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False
