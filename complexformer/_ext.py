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
    import importlib.util as _util
    import os as _os

    if _util.find_spec(f"{__package__}._C") is not None:
        raise  # the file is there but does not load (a missing library, another Python's build)
    # no chained traceback: Python words a missing submodule of a package being imported as
    # "cannot import name '_C' from partially initialized module (most likely a circular import)"
    raise ImportError(
        "complexformer._C, the compiled extension, is missing from "
        f"{_os.path.dirname(_os.path.abspath(__file__))}. If that is the source checkout, run Python "
        "from another directory to use the installed package, or build in place with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`)."
    ) from None

_BUILD = _C.build_info()
HAS_CUDA_KERNELS = bool(_BUILD["cuda"])


def build_info():
    """What this build contains: {'cuda': bool, 'cuda_version', 'cuda_archs', 'openmp', 'c_compiler'}."""
    return dict(_BUILD)


def dl(t):
    """A borrowed DLPack view of ``t`` for one call into _C. DLPack has no negative bit, and torch
    exports such a tensor's memory as is (``torch._neg_view(x)`` would be read as x): it is resolved
    here, into a copy, for every op at once. (The conjugate bit exists on complex tensors only,
    which every check refuses; outputs are always fresh tensors, never such views.)"""
    if t.is_neg():
        t = t.resolve_neg()
    return to_dlpack(t)


def dl_opt(t):
    return None if t is None else dl(t)


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


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_plain(*args):
    """True when a registered op may be skipped for its Python body (and a plain
    torch.autograd.Function for its autograd, `eager_function`): nothing is tracing (torch.compile,
    export), no TorchDispatchMode is active (FakeTensorMode, flop counters, ...), and every tensor
    among args is a plain tensor (no fake, functional or other subclass). A custom op's Python
    dispatch costs several times a small kernel (benchmarks/RESULTS.md, "Host overhead"); the op
    stays the path for everything that needs its schema or fake kernel. Both paths run the same
    functions, so they give the same bits."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


def op_call(op, eager, *args):
    """op(*args), or eager(*args) when eager_plain(*args): the op's body (no autograd involved) or the
    apply of its `eager_function`."""
    return eager(*args) if eager_plain(*args) else op(*args)


def eager_function(body, setup_context, backward):
    """A torch.autograd.Function from a registered op's body and the setup_context / backward it
    was registered with (`register_autograd`): the op's autograd without the op's dispatch.
    (forward takes ctx and calls setup_context itself: a Function that defines setup_context has
    its arguments bound to forward's signature by inspect on every call, which costs more than
    the dispatch it saves.)"""
    def forward(ctx, *args):
        out = body(*args)
        setup_context(ctx, args, out)
        return out

    return type(body.__name__.strip("_") + "_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
