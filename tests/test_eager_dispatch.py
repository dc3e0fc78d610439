"""The two paths of every public op (complexformer/_ext.py, `eager_plain`): eager calls on plain
tensors run the op bodies through plain autograd.Functions (no custom-op dispatch), while tracing,
dispatch modes and tensor subclasses go through the registered ops. Both must give the same bits,
and each must be taken when it should."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import complexformer as cf
from complexformer import _pdl_kernel as K
from complexformer import attention as A
from complexformer import counts as C
from complexformer import fused_linear as FL
from complexformer import pdl as P
from complexformer import rotate as R
from complexformer.rotate import euler_rotate_qk
from oracles import attn_inputs


class Recorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher (and forces the registered-op path)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _attn_inputs(dtype=torch.float64):
    ts = attn_inputs(2, 4, 2, 9, 13, 16, dtype=dtype, seed=3)
    return [t.requires_grad_() for t in ts[:5]] + [ts[5]]


def _pdl_inputs():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(12, 50, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 50, (12,), generator=g)
    y[3] = -100
    return [z], (y, torch.rand(50, generator=g, dtype=torch.float64) + 0.5)


CALLS = {
    "pdl_loss": (_pdl_inputs, lambda ts, extra: cf.pdl_loss(ts[0], *extra, label_smoothing=0.1),
                 "complexformer.pdl_loss_fwd"),
    "pdl_loss_none": (_pdl_inputs, lambda ts, extra: cf.pdl_loss(ts[0], *extra, reduction="none"),
                      "complexformer.pdl_loss_fwd"),
    "euler_rotate": (lambda: (_attn_inputs(), ()), lambda ts, _: cf.euler_rotate(ts[1], *ts[3:], is_query=False),
                     "complexformer.euler_rotate"),
    "euler_rotate_qk": (lambda: (_attn_inputs(), ()), lambda ts, _: euler_rotate_qk(ts[0], ts[1], *ts[3:]),
                        "complexformer.euler_rotate_qk"),
    "cmha_fused": (lambda: (_attn_inputs(), ()), lambda ts, _: cf.cmha_attention(*ts, backend="fused",
                                                                                  return_lse=True),
                   "complexformer.cmha_fused"),
    "fused_linear_pdl_loss": (lambda: ([torch.randn(12, 8, dtype=torch.float64).requires_grad_(),
                                         torch.randn(50, 8, dtype=torch.float64).requires_grad_()], _pdl_inputs()[1]),
                              lambda ts, extra: cf.fused_linear_pdl_loss(*ts, *extra, chunk_size=5),
                              "complexformer.fused_linear_pdl_fwd"),
    "cmha_sdpa": (lambda: (_attn_inputs(), ()), lambda ts, _: cf.cmha_attention(*ts, backend="sdpa"),
                  "complexformer.euler_rotate_qk"),
}


def _run(call, ts, extra, mode=None):
    """outputs and the gradients of every input that requires grad (backward outside the mode)."""
    if mode is None:
        outs = call(ts, extra)
    else:
        with mode:
            outs = call(ts, extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).masked_fill(~torch.isfinite(o), 0).sum()
               for o in outs)
    leaves = [t for t in ts if t.requires_grad]
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("name", list(CALLS))
def test_eager_and_registered_paths_agree_bitwise(name):
    make, call, op = CALLS[name]
    ts, extra = make()
    rec = Recorder()
    outs_op, grads_op = _run(call, ts, extra, rec)
    assert any(op in o for o in rec.ops), f"{op} not dispatched under a TorchDispatchMode: {rec.ops[:8]}"
    outs, grads = _run(call, ts, extra)
    assert any(g is not None for g in grads)
    for a, b in zip(outs + list(grads), outs_op + list(grads_op)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_eager_plain_tensors_skip_the_registered_ops(monkeypatch):
    """The eager path must not dispatch the custom ops (their Python dispatch is the cost it removes)."""
    def boom(*a, **k):
        raise AssertionError("registered op called in eager mode")

    for mod, name in [(A, "_cmha_fused"), (A, "_cmha_fused_bwd"), (R, "_rotate_op"), (R, "rotate_qk"),
                      (R, "rotate_bwd"), (P, "_pdl_loss_fwd"), (P, "_pdl_loss_value"), (K, "_pdl_scale_"),
                      (FL, "_fused_linear_fwd"), (C, "_token_counts_op")]:
        monkeypatch.setattr(getattr(mod, name), "op", boom)
    ts = _attn_inputs()
    out, lse = cf.cmha_attention(*ts, backend="fused", return_lse=True)
    (out.sum() + lse.sum()).backward()
    cf.cmha_attention(*ts, backend="sdpa").sum().backward()
    cf.euler_rotate(ts[0], *ts[3:]).sum().backward()
    (z,), (y, w) = _pdl_inputs()
    (cf.pdl_loss(z, y, w) * 2).backward()  # grad_output != 1: the scale runs too
    with torch.no_grad():
        assert math.isfinite(cf.pdl_loss(z, y, w).item())
    h = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    (cf.fused_linear_pdl_loss(h, torch.randn(50, 8, dtype=torch.float64), y, w, reduction="none").sum()).backward()
    assert torch.equal(cf.token_counts(y, 50), torch.bincount(y[y >= 0], minlength=50))


def test_subclass_tensors_take_the_registered_op():
    class Sub(torch.Tensor):
        pass

    (z,), (y, w) = _pdl_inputs()
    zs = z.detach().as_subclass(Sub).requires_grad_()
    seen = []
    orig = P._pdl_loss_fwd.op

    def spy(*a):
        seen.append(1)
        return orig(*a)

    P._pdl_loss_fwd.op = spy
    try:
        loss = cf.pdl_loss(zs, y, w)
    finally:
        P._pdl_loss_fwd.op = orig
    assert seen and torch.allclose(loss.as_subclass(torch.Tensor), cf.pdl_loss(z, y, w).detach())


def test_retain_graph_second_backward_recomputes_on_the_eager_path():
    (z,), (y, w) = _pdl_inputs()
    loss = cf.pdl_loss(z, y, w)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("name", ["pdl_loss", "cmha_sdpa", "euler_rotate_qk"])
def test_paths_agree_under_autocast(name):
    """Autocast (as complexformer.train uses on the GPU) sees the same ops on both paths."""
    make, call, _ = CALLS[name]
    ts, extra = make()
    ts = [t.detach().float().requires_grad_() for t in ts]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs_op, grads_op = _run(call, ts, extra, Recorder())
        outs, grads = _run(call, ts, extra)
    for a, b in zip(outs + list(grads), outs_op + list(grads_op)):
        assert (a is None and b is None) or torch.equal(a, b)
