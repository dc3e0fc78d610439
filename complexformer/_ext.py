"""The one door to complexformer._C, and the one way to declare an op.

* Kernels: ``launch(name, *args)`` calls ``_C.<name>`` with every tensor argument passed as a
  borrowed DLPack view; ``stream``, ``num_threads`` and ``require_cuda_kernels`` supply the rest.
  No other module imports ``_C``. (Argument checks live in checks.py.) Outputs and workspaces are
  always allocated by torch, so the caching allocator and CUDA graphs keep working; the C side
  only ever borrows memory for the duration of one call.
* Ops: ``KernelOp`` declares an op once (docs/design.md, "Adding an op") and gives both of its
  dispatch paths: the registered ``torch.library`` custom op (torch.compile, export, dispatch
  modes, tensor subclasses) and, for eager calls on plain tensors, the same body and autograd in a
  plain ``torch.autograd.Function``, without the custom op's Python dispatch.
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


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def launch(kernel, *args):
    """``_C.<kernel>(*args)``, each tensor argument passed as a borrowed DLPack view."""
    return getattr(_C, kernel)(*[dl(a) if isinstance(a, torch.Tensor) else a for a in args])


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


# --------------------------------------------------------------------------------------------
# which path a call takes
# --------------------------------------------------------------------------------------------


def needs_torch_math(*tensors):
    """True when a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) is active or
    a tensor carries a forward-mode tangent (torch.autograd.forward_ad): the kernels' autograd is
    reverse mode only (the policy in KernelOp)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tensor can carry a tangent
        return False
    return any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_plain(*args):
    """True when a KernelOp call may skip its registered op for the body and a plain
    torch.autograd.Function: nothing is tracing (torch.compile, export), no TorchDispatchMode is
    active (FakeTensorMode, flop counters, ...), and every tensor among args is a plain tensor (no
    fake, functional or other subclass). A custom op's Python dispatch costs several times a small
    kernel (benchmarks/RESULTS.md, "Host overhead"); the op stays the path for everything that
    needs its schema or fake kernel. Both paths run the same functions, so they give the same bits."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


def tracing(t):
    """True while torch.compile / AOTAutograd / opcheck trace a backward with fake tensors."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


# --------------------------------------------------------------------------------------------
# declaring an op
# --------------------------------------------------------------------------------------------

UNSUPPORTED = "unsupported"  # torch_math= of an op that has no torch-ops equivalent to fall back to


def _transform_error(label):
    kind = None
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None:
        kind = str(interpreter.key()).split(".")[-1]
    what = ("forward-mode AD (torch.autograd.forward_ad)" if kind is None else
            "forward-mode AD (torch.func.jvp)" if kind == "Jvp" else f"the torch.func {kind} transform")
    return NotImplementedError(f"{label}: {what} is not supported; use reverse mode (loss.backward(), "
                               "torch.autograd.grad)")


def _first_order_only(label, hint, backward):
    def first_order_backward(ctx, *grads):
        if torch.is_grad_enabled() and not any(g is not None and tracing(g) for g in grads):
            raise RuntimeError(f"{label}: double backward (create_graph=True, e.g. a gradient penalty or a "
                               f"Hessian-vector product) is not supported: its backward is not differentiable{hint}")
        return backward(ctx, *grads)

    return first_order_backward


def _eager_function(name, body, setup_context, backward):
    """The op's autograd as a plain torch.autograd.Function. (forward takes ctx and calls
    setup_context itself: a Function that defines setup_context has its arguments bound to
    forward's signature by inspect on every call, which costs more than the dispatch it saves.)"""
    def forward(ctx, *args):
        out = body(*args)
        setup_context(ctx, args, out)
        return out

    return type(name + "_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


class KernelOp:
    """One op, declared once; calling it runs it the right way.

    Args:
        name: registered as ``complexformer::<name>`` (``torch.ops.complexformer.<name>``).
        body: the computation on plain tensors, with type annotations (they give the op's
            schema). Allocates its outputs with torch and calls kernels through ``launch``.
        fake: the fake kernel (output shapes and dtypes from the arguments).
        setup_context, backward: the autograd rule, as for ``register_autograd``; None for an op
            without one (an integer op, or one only called inside another op's backward).
        double_backward: True when ``backward`` stays differentiable under create_graph=True
            (it rebuilds its gradient in torch ops); False makes create_graph=True raise.
        torch_math: the policy under forward-mode AD and torch.func transforms, which the
            kernels' reverse-mode autograd cannot serve: a function taking the op's arguments
            that computes the same outputs in plain torch ops (run instead of the op), or
            ``UNSUPPORTED`` (raise NotImplementedError), or None for an op never called with
            user tensors under a transform (no check is made).
        label: names the op in those errors (default: ``name``); hint: appended to the
            double-backward error (what to use instead).
        mutates_args: as for ``torch.library.custom_op``.

    Calling the KernelOp: ``torch_math`` when a transform or tangent needs it; else on plain
    tensors in eager mode (``eager_plain``) the body with a plain autograd.Function (the body alone
    when grad mode is off); else the registered op ``.op``. ``.body`` and ``.eager`` are the pieces.
    """

    def __init__(self, name, body, *, fake, setup_context=None, backward=None, double_backward=False,
                 torch_math=None, label=None, hint="", mutates_args=()):
        self.name, self.body, self.torch_math = name, body, torch_math
        self.label = label or name
        self.op = torch.library.custom_op("complexformer::" + name, body, mutates_args=mutates_args)
        self.op.register_fake(fake)
        self.eager = body
        if backward is not None:
            if not double_backward:
                backward = _first_order_only(self.label, hint, backward)
            self.op.register_autograd(backward, setup_context=setup_context)
            self.eager = _eager_function(name, body, setup_context, backward).apply

    def run(self, *args):
        """The outputs without the op's autograd (inside a backward, where grad mode is off): the
        body on plain tensors in eager mode, else the registered op."""
        return self.body(*args) if eager_plain(*args) else self.op(*args)

    def __call__(self, *args):
        if self.torch_math is not None and needs_torch_math(*args):
            if self.torch_math is UNSUPPORTED:
                raise _transform_error(self.label)
            return self.torch_math(*args)
        if not eager_plain(*args):
            return self.op(*args)
        # grad mode off (torch.no_grad, inference_mode: generate's decoding steps): nothing to record,
        # so the body alone, without the autograd.Function's per-call bookkeeping (same outputs)
        return self.eager(*args) if torch.is_grad_enabled() else self.body(*args)
