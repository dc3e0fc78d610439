"""Argument checks shared by every public entry point, and the vocabularies they check against.

Each argument kind has one function here, called by every public function and module that takes
it (``cmha_attention``, ``euler_rotate``, ``CMHA``, the Hugging Face attention module, ``pdl_loss``,
``fused_linear_pdl_loss``, ...). Errors name the argument, with the caller's name for it (e.g.
``position_ids`` in a module, ``positions[0] (query positions)`` in ``cmha_attention``). Checks
run once, at the public API; internal calls take the checked values (for attention: the plan
built by ``attention._validate``). The C bindings only check what memory safety needs.
"""
import math
import numbers
import operator
import weakref

import torch

LAYOUTS = {"half": 0, "interleaved": 1}  # the (re, im) pair layouts, as the kernels number them
BACKENDS = ("auto", "fused", "sdpa", "reference")  # cmha_attention's backends
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}  # pdl_loss's reductions, as the kernels number them


def compute_dtype(dtype):
    """The dtype the kernels compute (and keep parameters, losses, log-sum-exps) in: float64 for
    float64 inputs, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# scalars and tensors
# ----------------------------------------------------------------------------------------------

def check_tensor(name, t, *, dtypes=None, ndim=None, device=None, allow_empty=True):
    """Raise a clear exception naming ``name`` when ``t`` is not what an op needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: dtype {_dtype_name(t.dtype)} not supported (expected {names})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the other inputs are on {device}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: device {t.device} not supported (CPU or CUDA)")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name}: must not be empty")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_int(name, v, *, lo=_INT64_MIN, hi=_INT64_MAX, what="an int"):
    """``v`` as a Python int: any integral value (int, NumPy integer, anything with __index__;
    not bool), within [lo, hi] (by default int64, what the ops take), else an error naming ``name``."""
    if isinstance(v, bool) or isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__}")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__}") from None
    if not lo <= i <= hi:
        raise ValueError(f"{name}: {i} is out of range (expected {lo} <= {name} <= {hi})")
    return i


def check_rotary_dim(rotary_dim, d):
    """Partial rotary: None (the whole head, d) or an even int in [2, d]; returns the rotated width."""
    if rotary_dim is None:
        return d
    what = f"None or an even int in [2, d={d}]"
    rot = check_int("rotary_dim", rotary_dim, lo=2, hi=d, what=what)
    if rot % 2:
        raise ValueError(f"rotary_dim: expected {what}, got {rot}")
    return rot


def check_real(name, v, what="a number"):
    """``v`` as a Python float: int, float or NumPy scalar (not bool, not a tensor)."""
    if isinstance(v, (bool, torch.Tensor)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__}")
    return float(v)


def check_bool(name, v):
    """``v`` as a Python bool: True, False or a NumPy bool, nothing else (``bool("no")`` is True, so
    strings, None and numbers would otherwise pick a mode silently)."""
    if isinstance(v, bool) or type(v).__name__ in ("bool_", "bool") and type(v).__module__ == "numpy":
        return bool(v)
    raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")


def check_not_differentiable(name, t, op):
    """Refuse a tensor argument that requires grad where the op gives it no gradient (class weights,
    a normaliser), as torch's own ops do, instead of silently leaving its .grad None."""
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: not differentiable with respect to argument '{name}'. This input cannot have "
                           f"requires_grad True (pass {name}.detach())")


def _compiling():
    """True while torch.compile traces: values are unknown, so data-dependent checks are skipped."""
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# CMHA: layout, backend, the rotation's parameters, positions, masks
# ----------------------------------------------------------------------------------------------

def check_layout(layout):
    """The layout's kernel id (0 "half", 1 "interleaved"). Public arguments take the names only
    (True would otherwise pass as 1)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'half' or 'interleaved', got {layout!r}")
    return LAYOUTS[layout]


def layout_id(layout):
    """Internal calls: a layout name or an already-checked kernel id -> the id."""
    if isinstance(layout, int) and layout in (0, 1):
        return layout
    return check_layout(layout)


def check_backend(backend):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def check_head_dim(name, d):
    if d == 0 or d % 2:
        raise ValueError(f"{name}: the head dimension d must be a positive even number (pairs of re/im parts), "
                         f"got d={d}")


def check_heads(name, Hx, H):
    """``name``'s Hx heads must divide the H query heads (GQA / MQA: query head i reads head i // (H / Hx))."""
    if Hx == 0 or H % Hx:
        raise ValueError(f"{name}: its {Hx} heads must divide the {H} query heads")


def check_angles(delta, beta, freqs, h, device, *, H=None, is_query=True):
    """The rotation's parameters: delta (H, h), beta (H, h) (queries only; None for keys), freqs
    (h,) shared or (H, h) per head; floating point, on ``device``. ``H`` defaults to delta's
    rows (a rotation alone); attention passes q's head count. Returns H."""
    if is_query and beta is None:
        raise ValueError("beta: required for queries (the phase bias); for keys alone use "
                         "euler_rotate(..., is_query=False)")
    check_tensor("delta", delta, dtypes=FLOAT_DTYPES, ndim=2, device=device)
    if H is None:
        H = delta.shape[0]
        if H == 0:
            raise ValueError("delta: needs at least one head")
    _param_shape("delta", delta, H, h, shared=False)
    if is_query:
        check_tensor("beta", beta, dtypes=FLOAT_DTYPES, ndim=2, device=device)
        _param_shape("beta", beta, H, h, shared=False)
    check_tensor("freqs", freqs, dtypes=FLOAT_DTYPES, ndim=(1, 2), device=device)
    _param_shape("freqs", freqs, H, h, shared=True)
    return H


def _param_shape(name, t, H, h, shared):
    shapes = [(H, h)] + ([(h,)] if shared else [])
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name}: expected shape {want} (H={H} query heads, h=d/2={h}), got {tuple(t.shape)}")


POS_MIN, POS_MAX = -(2**31), 2**31 - 1  # positions and q_offset: the int32 range (docs/design.md)


def check_positions(name, p, B, L, device, other="q"):
    """(L,) or (B | 1, L) integer positions -> (Bp, L) int64 contiguous, Bp in {1, B}.
    ``other`` names the input whose device the positions must share. Values must lie in the int32
    range (`check_position_range`)."""
    check_tensor(name, p, ndim=(1, 2))
    if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
        raise TypeError(f"{name}: dtype {_dtype_name(p.dtype)} not supported (expected an integer tensor)")
    if p.dim() == 1:
        p = p[None]
    if p.shape[-1] != L or p.shape[0] not in (1, B):
        raise ValueError(f"{name}: expected shape ({L},) or ({B}, {L}) or (1, {L}), got {tuple(p.shape)}")
    if p.device != device:
        raise ValueError(f"{name}: on {p.device}, but {other} is on {device}")
    check_position_range(name, p)
    return p.to(torch.int64).contiguous()


def check_position_range(name, p):
    """Positions outside [POS_MIN, POS_MAX] raise, naming ``name``: omega * p is reduced in float64,
    whose rounding grows with |p| (docs/design.md, "Masks and positions"). int32 tensors hold
    nothing else; an int64 tensor is read on the CPU (~2 us), once per tensor version (the layers of
    a model share their position_ids). A CUDA tensor is not read (a host sync): the kernels make
    the rotation of an out-of-range position NaN instead. Skipped while torch.compile traces."""
    if (p.dtype.itemsize < 4 or p.dtype == torch.int32 or p.device.type != "cpu" or p.numel() == 0
            or type(p) is not torch.Tensor or _compiling() or _seen(_checked_positions, p)):
        return  # (not a plain tensor: fake, functional, ...: values unknown)
    lo, hi = torch.aminmax(p if p.dtype == torch.int64 else p.to(torch.int64))
    lo, hi = lo.item(), hi.item()
    if lo < POS_MIN or hi > POS_MAX:
        bad = lo if lo < POS_MIN else hi
        raise ValueError(f"{name}: position {bad} is out of range (expected {POS_MIN} <= position <= {POS_MAX}, "
                         f"the int32 range)")
    _remember(_checked_positions, p)  # every layer of a model gets the same position_ids


_checked_positions = {}  # id -> (weakref to the tensor, its version when checked)


def tensor_version(t):
    """``t``'s version counter (bumped by every in-place write), or None for an inference tensor
    (created under torch.inference_mode), which has none."""
    return None if t.is_inference() else t._version


def _seen(cache, t):
    """True when ``t``, unchanged since (same object, same version), passed a data check before.
    Never for an inference tensor: without a version counter, "unchanged" cannot be known."""
    seen = cache.get(id(t))
    return seen is not None and seen[0]() is t and seen[1] is not None and seen[1] == tensor_version(t)


def _remember(cache, t):
    if len(cache) > 64:
        cache.clear()
    cache[id(t)] = (weakref.ref(t), tensor_version(t))


def check_key_padding_mask(name, mask, B, Lk, device, *, other="q", ints=False, check_values=True,
                           dims="(batch, keys)"):
    """A (B, Lk) key padding mask, True = attend -> bool on ``device``. ``dims`` names the two
    dimensions in the shape error (a module with a cache: the cached keys count too).

    ``ints=True`` also takes integer masks (a Hugging Face attention mask), where nonzero = attend;
    with ``check_values`` any value other than 0 or 1 raises (it may be an additive 0 / -inf
    mask or a position tensor passed by mistake): one host sync on CUDA, skipped while
    torch.compile traces or a CUDA graph is captured."""
    if not ints:
        check_tensor(name, mask, dtypes=(torch.bool,), ndim=2, device=device)
    elif not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name}: expected a bool (or 0/1 integer) tensor, True = attend, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != (B, Lk):
        raise ValueError(f"{name}: expected shape ({B}, {Lk}) {dims}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name}: on {mask.device}, but {other} is on {device}")
    if mask.dtype == torch.bool:
        return mask
    capturing = mask.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_values and not _compiling() and not capturing and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(f"{name}: integer masks must hold 0 or 1 (1 = attend), found {bad}")
    return mask != 0


# ----------------------------------------------------------------------------------------------
# PDL: options, logits, targets, weights, normalizer
# ----------------------------------------------------------------------------------------------

def check_pdl_options(ignore_index, reduction, label_smoothing):
    """(ignore_index, label_smoothing) as a Python int and float, validated."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'none', 'sum' or 'mean', got {reduction!r}")
    ignore_index = check_int("ignore_index", ignore_index)
    ls = check_real("label_smoothing", label_smoothing, "a number in [0, 1]")
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    return ignore_index, ls


def check_logits(name, logits):
    """Logits as the kernel reads them: float32/float64 on the CPU, float32/float16/bfloat16 on
    CUDA, last dimension of stride 1 (rows may be strided, e.g. logits[:, :-1])."""
    from ._ext import require_cuda_kernels

    check_tensor(name, logits, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: the class dimension V must not be empty, got shape {tuple(logits.shape)}")
    require_cuda_kernels("pdl_loss", logits)
    if logits.is_cuda and logits.dtype == torch.float64:
        raise TypeError(f"{name}: float64 is supported on the CPU only (CUDA: float32, float16, bfloat16)")
    if not logits.is_cuda and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the CPU kernels compute in float32 (autograd casts the gradient back)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def check_targets_weights(targets, weights, batch_shape, V, device):
    check_tensor("targets", targets, dtypes=INT_DTYPES, device=device)
    if tuple(targets.shape) != tuple(batch_shape):
        raise ValueError(f"targets: expected shape {tuple(batch_shape)} to match the logits, got {tuple(targets.shape)}")
    check_tensor("weights", weights, dtypes=FLOAT_DTYPES, ndim=1, device=device)
    if weights.shape[0] != V:
        raise ValueError(f"weights: has {weights.shape[0]} entries but the logits have V={V} classes")


def check_targets_in_range(targets, V, ignore_index):
    """Targets in [0, V) or ignore_index, checked on the host (a sync on CUDA: only where asked)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"targets: value {value} is out of range for {V} classes (expected 0 <= target < {V}, "
                         f"or ignore_index={ignore_index})")


def check_pdl_weights(weights, name="weights"):
    """The class weights' rule, shared by every PDL entry point: finite and >= 0, else a ValueError
    naming the argument (``name``). (A negative weight makes the weighted mean's denominator meaningless, and
    can make a batch's weight sum 0 or negative.) On CUDA the check reads the tensor once per
    tensor version (one host sync), then is remembered; under torch.compile tracing values are
    unknown and it is skipped."""
    if _compiling():
        return
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(weights) or weights.device.type == "meta":
        return
    if weights.is_cuda and _seen(_checked_weights, weights):
        return
    ok = (weights >= 0) & (weights < math.inf)
    if not bool(ok.all()):
        bad = weights[~ok][0].item()
        raise ValueError(f"{name}: class weights must be finite and >= 0, got {bad} (PDL weights come from "
                         f"pdl_weights(counts), which are positive)")
    if weights.is_cuda:
        _remember(_checked_weights, weights)


_checked_weights = {}  # id -> (weakref to the tensor, its version when checked)


def check_normalizer(normalizer, reduction, device, kernel_dtype):
    """None, or the mean's denominator as a 1-element tensor of ``kernel_dtype`` on ``device``.

    One rule for numbers and tensors alike: the value, in the kernel's dtype (float32, or float64
    for float64 logits), must be positive and finite, so 1e300 or inf (inf in float32) and
    1e-320 (0 in float32) are refused instead of giving a NaN or a silent 0. A CUDA tensor is not
    read back (that would be a host sync): there the kernel makes a non-positive value NaN."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer: only applies to reduction='mean' (got reduction={reduction!r})")
    dt = _dtype_name(kernel_dtype)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or not normalizer.is_floating_point() and normalizer.dtype not in INT_DTYPES:
            raise ValueError(f"normalizer: expected a positive number or a 1-element tensor, got shape "
                             f"{tuple(normalizer.shape)} of {normalizer.dtype}")
        if normalizer.device.type != "cpu" and normalizer.device != device:
            raise ValueError(f"normalizer: on {normalizer.device}, but the logits are on {device}")
        value = normalizer.detach().reshape(()).to(dtype=kernel_dtype)
        if value.device.type != "cpu":
            return value.to(device)
    else:
        if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
            raise TypeError(f"normalizer: expected a positive number or a 1-element tensor, got "
                            f"{type(normalizer).__name__}")
        value = torch.tensor(float(normalizer), dtype=torch.float64).to(kernel_dtype)
    if not (bool(torch.isfinite(value)) and float(value) > 0):
        raise ValueError(f"normalizer: must be positive and finite in {dt} (the loss's dtype), got "
                         f"{float(normalizer)!r} ({float(value)!r} in {dt})")
    return value.to(device)
