"""Kernel-level tests of the fused CMHA attention CUDA kernels (_C.attn_fwd / _C.attn_bwd on CUDA tensors).

Each case calls the kernels directly (contract: docs/design.md, "Attention") with outputs poisoned with NaN,
checks that every element was written, and compares against float64 references:
  forward:  reference.cmha_attention_pairwise (scores pair by pair in polar form);
  backward: float64 autograd through plain attention on the rotated q~, k~ (per query head) and
            the per-query-head v, giving dq_rot, dk_rot, dv_full.
Low precision follows the FlashAttention rule: max error <= 2 x the max error of the same math done
by PyTorch in that dtype (rotation in float32, then attention math in float16/bfloat16) + a small floor.
Case ids name the feature (L, d, heads, causal, layout, dtype, masks, ...) so one log pinpoints a failure.

Every forward case runs both forward kernels (FWD_PATHS): "load" (no workspaces: key tiles rotated on
load, the glue's GQA forward) and "pre" (q_ws / k_ws workspaces passed: a pre-pass writes q~, k~ and
the kernel copies tiles with cp.async; the glue's forward when H == Hkv). Both run on every head
configuration here. The backward always takes the workspaces.
"""
import math
import zlib
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from complexformer import _C, _ext
from complexformer.reference import cmha_attention_pairwise, default_freqs, default_positions, visible_mask
from oracles import assert_fa_rule, rotate_ref

pytestmark = pytest.mark.cuda

LAYOUT = {"half": 0, "interleaved": 1}
FWD_PATHS = ("load", "pre")


@dataclass(frozen=True)
class Case:
    L: int = 64                 # Lq = Lk = L unless Lq / Lk are given
    d: int = 64
    H: int = 4
    Hkv: int = 2
    causal: bool = True
    B: int = 2
    Lq: int = None
    Lk: int = None
    q_offset: int = None        # None: Lk - Lq (bottom-right)
    dtype: str = "bfloat16"
    layout: str = "half"
    kpm: bool = False           # key padding mask; batch 1 fully masked, key 0 of batch 0 masked
    cu: tuple = None            # packed sequence lengths (cu_seqlens), B = 1
    per_head_freqs: bool = False
    rand_pos: bool = False      # explicit (B, L) positions, large values
    strided: bool = False       # q, k, v as (B, L, H, d) views transposed to (B, H, L, d)
    misaligned: bool = False    # rows not 16-byte aligned: the scalar-load path
    scale: float = None
    tags: tuple = field(default=())

    @property
    def lq(self):
        return sum(self.cu) if self.cu else (self.Lq if self.Lq is not None else self.L)

    @property
    def lk(self):
        return sum(self.cu) if self.cu else (self.Lk if self.Lk is not None else self.L)

    def id(self):
        parts = [f"Lq{self.lq}-Lk{self.lk}" if self.lq != self.lk else f"L{self.lq}", f"d{self.d}",
                 f"H{self.H}kv{self.Hkv}", "causal" if self.causal else "full", self.dtype, self.layout]
        if self.q_offset is not None:
            parts.append(f"qoff{self.q_offset}")
        for flag in ("kpm", "per_head_freqs", "rand_pos", "strided", "misaligned"):
            if getattr(self, flag):
                parts.append(flag)
        if self.cu:
            parts.append("cu" + "_".join(map(str, self.cu)))
        if self.scale is not None:
            parts.append(f"scale{self.scale}")
        return "-".join(parts)


def attn_math(qr, kr, vf, vis, scale):
    """Plain attention in the dtype of its inputs; rows with no visible key give 0."""
    s = (qr @ kr.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return p @ vf, (torch.log(den.squeeze(-1).float()) + m.squeeze(-1).float())


def _strided(t, c):
    if c.misaligned:  # offset by one element: pointer and row stride not multiples of 16 bytes
        base = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        base[..., 1:] = t
        return base[..., 1:]
    if c.strided:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def make_inputs(c, device="cuda"):
    dt = getattr(torch, c.dtype)
    B = 1 if c.cu else c.B
    Lq, Lk, h = c.lq, c.lk, c.d // 2
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(c.id().encode()))
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = _strided(rn(B, c.H, Lq, c.d).to(device, dt), c)
    k = _strided(rn(B, c.Hkv, Lk, c.d).to(device, dt), c)
    v = _strided(rn(B, c.Hkv, Lk, c.d).to(device, dt), c)
    delta = (1.0 + 0.5 * rn(c.H, h)).to(device)
    beta = (0.3 * rn(c.H, h)).to(device)
    freqs = default_freqs(c.d).to(device)
    if c.per_head_freqs:
        freqs = (freqs[None] * (1 + 0.2 * rn(c.H, h).to(device))).contiguous()
    cu = None
    if c.cu:
        cu = torch.tensor([0] + list(torch.tensor(c.cu).cumsum(0)), dtype=torch.int32, device=device)
    q_offset = 0 if c.cu else (c.q_offset if c.q_offset is not None else Lk - Lq)
    q_pos, k_pos = default_positions(B, Lq, Lk, q_offset=q_offset, cu_seqlens=cu, device=device)
    if c.rand_pos:
        q_pos = torch.randint(0, 100000, (B, Lq), generator=g).to(device)
        k_pos = torch.randint(0, 100000, (B, Lk), generator=g).to(device)
    kpm = None
    if c.kpm:
        kpm = torch.rand(B, Lk, generator=g) > 0.3
        kpm[0, 0] = False          # causal row 0 (q_offset 0) sees nothing
        if B > 1:
            kpm[1] = False         # a whole batch element fully masked
        kpm = kpm.to(device)
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.d)
    return dict(q=q, k=k, v=v, delta=delta, beta=beta, freqs=freqs, q_pos=q_pos.contiguous(),
                k_pos=k_pos.contiguous(), kpm=kpm, cu=cu, q_offset=q_offset, scale=scale, B=B)


def workspaces(x, path="pre"):
    """The trailing (q_ws, k_ws) arguments: none for the "load" forward; NaN-poisoned (B, H, L, d)
    buffers for "pre" (a row the pre-pass forgets to write poisons the result)."""
    if path == "load":
        return ()
    assert path == "pre", path
    q, k = x["q"], x["k"]
    B, H, Lq, d = q.shape
    nan = float("nan")
    return (_ext.dl(torch.full((B, H, Lq, d), nan, dtype=q.dtype, device=q.device)),
            _ext.dl(torch.full((B, H, k.shape[2], d), nan, dtype=q.dtype, device=q.device)))


def run_fwd(c, x, path):
    q = x["q"]
    B, H, Lq = q.shape[:3]
    out = torch.full((B, H, Lq, c.d), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Lq), float("nan"), dtype=torch.float32, device=q.device)
    _C.attn_fwd(_ext.dl(q), _ext.dl(x["k"]), _ext.dl(x["v"]), _ext.dl(x["delta"]), _ext.dl(x["beta"]),
                _ext.dl(x["freqs"]), _ext.dl(x["q_pos"]), _ext.dl(x["k_pos"]), _ext.dl_opt(x["kpm"]),
                _ext.dl_opt(x["cu"]), _ext.dl(out), _ext.dl(lse), int(c.causal), float(x["scale"]),
                int(x["q_offset"]), LAYOUT[c.layout], 1, _ext.stream(q), *workspaces(x, path))
    torch.cuda.synchronize()
    return out, lse


def run_bwd(c, x, out, lse, dout, workspaces_given=True):
    q = x["q"]
    B, H, Lq = q.shape[:3]
    Lk = x["k"].shape[2]
    nan = float("nan")
    dq = torch.full((B, H, Lq, c.d), nan, dtype=torch.float32, device=q.device)
    dk = torch.full((B, H, Lk, c.d), nan, dtype=torch.float32, device=q.device)
    dv = torch.full((B, H, Lk, c.d), nan, dtype=torch.float32, device=q.device)
    _C.attn_bwd(_ext.dl(q), _ext.dl(x["k"]), _ext.dl(x["v"]), _ext.dl(x["delta"]), _ext.dl(x["beta"]),
                _ext.dl(x["freqs"]), _ext.dl(x["q_pos"]), _ext.dl(x["k_pos"]), _ext.dl_opt(x["kpm"]),
                _ext.dl_opt(x["cu"]), _ext.dl(out), _ext.dl(dout), _ext.dl(lse), None, _ext.dl(dq),
                _ext.dl(dk), _ext.dl(dv), int(c.causal), float(x["scale"]), int(x["q_offset"]), LAYOUT[c.layout],
                1, _ext.stream(q), *(workspaces(x) if workspaces_given else ()))
    torch.cuda.synchronize()
    return dq, dk, dv


def rotated_inputs(c, x, dtype):
    """(q~, k~ per query head, v per query head) with the rotation computed in `dtype`."""
    G = c.H // c.Hkv
    qr = rotate_ref(x["q"], x["delta"], x["beta"], x["freqs"], x["q_pos"], c.layout, dtype)
    kr = rotate_ref(x["k"].repeat_interleave(G, 1), x["delta"], None, x["freqs"], x["k_pos"], c.layout, dtype)
    return qr, kr, x["v"].to(dtype).repeat_interleave(G, 1)


def vis_mask(c, x):
    return visible_mask(x["B"], c.lq, c.lk, causal=c.causal, q_offset=x["q_offset"], key_padding_mask=x["kpm"],
                        cu_seqlens=x["cu"], device=x["q"].device)


def check_fa(name, got, ref, pt, rel_floor=2e-3):
    """FlashAttention rule: err(got) <= 2 err(pt) + floor, all vs the float64 reference."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (unwritten or invalid elements)"
    assert_fa_rule(got, pt, ref, floor=1e-5, rel_floor=rel_floor, what=f"{name} (torch {pt.dtype})")


def check_forward(c, path):
    x = make_inputs(c)
    out, lse = run_fwd(c, x, path)
    assert not torch.isnan(out).any(), "out: NaN left (unwritten elements or NaN produced)"
    assert not torch.isnan(lse).any(), "lse: NaN left (unwritten elements or NaN produced)"
    ref, ref_lse = cmha_attention_pairwise(
        x["q"], x["k"], x["v"], x["delta"], x["beta"], x["freqs"], causal=c.causal, scale=x["scale"],
        q_offset=x["q_offset"], key_padding_mask=x["kpm"], cu_seqlens=x["cu"], layout=c.layout,
        q_pos=x["q_pos"], k_pos=x["k_pos"])
    dt = getattr(torch, c.dtype)
    qr, kr, vf = rotated_inputs(c, x, torch.float32)
    pt, pt_lse = attn_math(qr.to(dt), kr.to(dt), vf.to(dt), vis_mask(c, x), x["scale"])
    check_fa("out", out, ref, pt)
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead), "lse: -inf pattern differs from the rows with no visible key"
    assert (out[dead.unsqueeze(-1).expand_as(out)] == 0).all(), "out: rows with no visible key must be exactly 0"
    live = ~dead
    if live.any():
        check_fa("lse", lse[live], ref_lse[live], pt_lse[live])
    return x, out, lse


def check_backward(c, path="pre"):
    x, out, lse = check_forward(c, path)
    g = torch.Generator(device="cpu").manual_seed(1 + zlib.crc32(c.id().encode()))
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    dq, dk, dv = run_bwd(c, x, out, lse, dout)
    for name, t in (("dq_rot", dq), ("dk_rot", dk), ("dv_full", dv)):
        assert not torch.isnan(t).any(), f"{name}: NaN left (unwritten elements or NaN produced)"
    vis = vis_mask(c, x)
    grads = {}
    for dtype in (torch.float64, getattr(torch, c.dtype)):
        qr, kr, vf = [t.to(dtype).detach().requires_grad_() for t in rotated_inputs(
            c, x, torch.float64 if dtype == torch.float64 else torch.float32)]
        o, _ = attn_math(qr, kr, vf, vis, x["scale"])
        o.backward(dout.to(dtype))
        grads[dtype] = (qr.grad, kr.grad, vf.grad)
    ref, pt = grads[torch.float64], grads[getattr(torch, c.dtype)]
    check_fa("dq_rot", dq, ref[0], pt[0])
    check_fa("dk_rot", dk, ref[1], pt[1])
    check_fa("dv_full", dv, ref[2], pt[2])
    return dq, dk, dv


# ---- case lists ----
FWD_SWEEP = [Case(L=L, d=d, causal=cz, B=1 if L >= 1000 else 2)
             for L in (1, 17, 64, 127, 129, 300, 1000) for d in (64, 128) for cz in (False, True)]

FEATURES = []
for d in (64, 128):
    FEATURES += [
        Case(L=129, d=d, H=8, Hkv=1),                                    # GQA 8:1
        Case(L=300, d=d, H=1, Hkv=1, causal=False),                      # MHA, one head
        Case(L=127, d=d, dtype="float16"),
        Case(L=300, d=d, dtype="float16", causal=False),
        Case(L=129, d=d, layout="interleaved"),
        Case(L=127, d=d, layout="interleaved", causal=False, dtype="float16"),
        Case(L=127, d=d, per_head_freqs=True),
        Case(Lq=1, Lk=300, d=d),                                         # decode
        Case(Lq=1, Lk=300, d=d, causal=False),
        Case(Lq=17, Lk=129, d=d),
        Case(Lq=129, Lk=64, d=d),                                        # q_offset < 0: rows with no key
        Case(Lq=64, Lk=300, d=d, causal=False),
        Case(L=64, d=d, q_offset=5),
        Case(L=127, d=d, kpm=True),
        Case(L=127, d=d, kpm=True, causal=False),
        Case(d=d, cu=(1, 70, 0, 129, 200)),                              # packed sequences
        Case(d=d, cu=(1, 70, 0, 129, 200), causal=False, H=8, Hkv=1),
        Case(d=d, cu=(64, 3, 191), kpm=True),
        Case(L=129, d=d, strided=True),
        Case(L=127, d=d, misaligned=True),
        Case(L=64, d=d, rand_pos=True, causal=False),
        Case(L=127, d=d, scale=1.0),
    ]

BWD_CASES = [Case(L=L, d=d, B=2) for L in (1, 17, 127, 129, 300) for d in (64, 128)]
for d in (64, 128):
    BWD_CASES += [
        Case(L=129, d=d, H=8, Hkv=1),
        Case(L=300, d=d, causal=False),
        Case(L=127, d=d, dtype="float16"),
        Case(L=129, d=d, layout="interleaved"),
        Case(Lq=17, Lk=129, d=d),
        Case(Lq=129, Lk=64, d=d),
        Case(Lq=1, Lk=300, d=d, causal=False),
        Case(L=127, d=d, kpm=True),
        Case(d=d, cu=(1, 70, 0, 129, 200)),
        Case(L=129, d=d, strided=True),
        Case(L=127, d=d, misaligned=True),
        Case(L=127, d=d, per_head_freqs=True, rand_pos=True),
    ]


def _params(cases):
    """Long cases are marked slow, so a compute-sanitizer pass can run the short ones only."""
    return [pytest.param(c, id=c.id(), marks=[pytest.mark.slow] if max(c.lq, c.lk) >= 300 else []) for c in cases]


@pytest.mark.parametrize("path", FWD_PATHS)
@pytest.mark.parametrize("c", _params(FWD_SWEEP + FEATURES))
def test_forward(c, path):
    check_forward(c, path)


@pytest.mark.parametrize("c", _params(BWD_CASES))
def test_backward(c):
    check_backward(c)


@pytest.mark.parametrize("c", _params([Case(L=300, d=64), Case(L=129, d=128, H=8, Hkv=1, kpm=True),
                                       Case(d=128, cu=(1, 70, 0, 129, 200), layout="interleaved"),
                                       Case(Lq=129, Lk=64, d=64, dtype="float16")]))
def test_forward_paths_agree(c):
    """The pre-rotation pass rotates with the same rot_fast as the "load" forward's tile loader, so
    its q~/k~ tiles equal those bit for bit up to FMA contraction: the two forwards' outputs (and
    the backward run on each) agree to ~1 ulp of the output dtype (a much tighter check than the
    float64 comparisons above)."""
    x = make_inputs(c)
    res = {}
    for path in FWD_PATHS:
        out, lse = run_fwd(c, x, path)
        g = torch.Generator(device="cpu").manual_seed(7)
        dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
        res[path] = (out, lse) + run_bwd(c, x, out, lse, dout)
    for name, a, b in zip(("out", "lse", "dq_rot", "dk_rot", "dv_full"), res["load"], res["pre"]):
        tol = 1e-2 * max(1.0, b.abs().max().item())
        err = (a.double() - b.double()).nan_to_num(0.0).abs().max().item() if a.numel() else 0.0
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and err <= tol, f"{name}: load vs pre differ by {err:.3e}"


@st.composite
def _cases(draw):
    heads = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (6, 3), (8, 1)]))
    lq, lk = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    causal = draw(st.booleans())
    return Case(Lq=lq, Lk=lk, d=draw(st.sampled_from([64, 128])), H=heads[0], Hkv=heads[1], causal=causal,
                B=draw(st.integers(1, 3)), dtype=draw(st.sampled_from(["bfloat16", "float16"])),
                layout=draw(st.sampled_from(["half", "interleaved"])), kpm=draw(st.booleans()),
                q_offset=draw(st.one_of(st.none(), st.integers(-20, 20))) if causal else None,
                per_head_freqs=draw(st.booleans()), strided=draw(st.booleans()))


@given(c=_cases(), path=st.sampled_from(FWD_PATHS))
def test_property_forward_backward(c, path):
    """Random shapes, odd sizes, GQA ratios, dtypes, layouts, masks, offsets: forward and backward."""
    note(f"{c.id()} forward={path}")
    check_backward(c, path)


@pytest.mark.parametrize("path", FWD_PATHS)
@pytest.mark.parametrize("c", [Case(L=300, d=128, kpm=True), Case(d=64, cu=(1, 70, 0, 129, 200))],
                         ids=lambda c: c.id())
@pytest.mark.slow
def test_deterministic(c, path):
    """Same inputs, same bits: no atomics, no order-dependent reductions."""
    x = make_inputs(c)
    out1, lse1 = run_fwd(c, x, path)
    out2, lse2 = run_fwd(c, x, path)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2), "forward not bitwise reproducible"
    dout = torch.randn_like(out1)
    g1 = run_bwd(c, x, out1, lse1, dout)
    g2 = run_bwd(c, x, out1, lse1, dout)
    for name, a, b in zip(("dq_rot", "dk_rot", "dv_full"), g1, g2):
        assert torch.equal(a, b), f"{name}: backward not bitwise reproducible"


@pytest.mark.parametrize("Lq,Lk", [(5, 0), (0, 7)], ids=["Lk0", "Lq0"])
def test_empty_lengths(Lq, Lk):
    """No (query, key) pair: out = 0, lse = -inf, zero gradients; the glue passes no workspaces here."""
    c = Case(Lq=Lq, Lk=Lk, d=64, causal=False)
    x = make_inputs(c)
    out, lse = run_fwd(c, x, "load")
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = run_bwd(c, x, out, lse, torch.randn_like(out), workspaces_given=False)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("path", FWD_PATHS)
def test_long_sequence_many_heads(path):
    """L = 2048, 16 heads (GQA 4:1), d = 128: many tiles per head, skipped causal tiles, against a
    float64 attention on the rotated inputs (the pairwise reference would need ~100 GB here)."""
    c = Case(L=2048, d=128, H=16, Hkv=4, B=1)
    x = make_inputs(c)
    out, lse = run_fwd(c, x, path)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    qr, kr, vf = rotated_inputs(c, x, torch.float32)
    ref, _ = attn_math(qr.double(), kr.double(), vf.double(), vis_mask(c, x), x["scale"])
    dt = getattr(torch, c.dtype)
    pt, _ = attn_math(qr.to(dt), kr.to(dt), vf.to(dt), vis_mask(c, x), x["scale"])
    check_fa("out", out, ref, pt)


def test_errors_are_clear():
    x = make_inputs(Case(L=17, d=64))
    q32 = x["q"].float()
    out = torch.empty(2, 4, 17, 64, device="cuda")
    lse = torch.empty(2, 4, 17, device="cuda")
    args = lambda q, o: (_ext.dl(q), _ext.dl(x["k"] if q.dtype != torch.float32 else x["k"].float()),  # noqa: E731
                         _ext.dl(x["v"] if q.dtype != torch.float32 else x["v"].float()), _ext.dl(x["delta"]),
                         _ext.dl(x["beta"]), _ext.dl(x["freqs"]), _ext.dl(x["q_pos"]), _ext.dl(x["k_pos"]), None,
                         None, _ext.dl(o), _ext.dl(lse), 1, 0.125, 0, 0, 1, _ext.stream(q))
    with pytest.raises(NotImplementedError, match="float32"):
        _C.attn_fwd(*args(q32, out))
    with pytest.raises(ValueError, match="out"):
        _C.attn_fwd(*args(x["q"], torch.empty(2, 4, 16, 64, device="cuda", dtype=x["q"].dtype)))
    assert _C.attn_cuda_supported("bfloat16", 128, 128) and not _C.attn_cuda_supported("bfloat16", 96, 96)
    assert not _C.attn_cuda_supported("float32", 64, 64)


def test_workspace_errors_are_clear():
    """q_ws / k_ws: both or none, right shape, q's dtype, contiguous."""
    c = Case(L=17, d=64)
    x = make_inputs(c)
    B, H, L, d = x["q"].shape
    ws = lambda shape, dt=x["q"].dtype: _ext.dl(torch.empty(*shape, dtype=dt, device="cuda"))  # noqa: E731
    base = lambda: (_ext.dl(x["q"]), _ext.dl(x["k"]), _ext.dl(x["v"]), _ext.dl(x["delta"]),  # noqa: E731
                    _ext.dl(x["beta"]), _ext.dl(x["freqs"]), _ext.dl(x["q_pos"]), _ext.dl(x["k_pos"]), None, None,
                    _ext.dl(torch.empty(B, H, L, d, dtype=x["q"].dtype, device="cuda")),
                    _ext.dl(torch.empty(B, H, L, device="cuda")), 1, 0.125, 0, 0, 1, _ext.stream(x["q"]))
    with pytest.raises(ValueError, match="both"):
        _C.attn_fwd(*base(), ws((B, H, L, d)), None)
    with pytest.raises(ValueError, match="k_ws"):
        _C.attn_fwd(*base(), ws((B, H, L, d)), ws((B, c.Hkv, L, d)))
    with pytest.raises(TypeError, match="q_ws"):
        _C.attn_fwd(*base(), ws((B, H, L, d), torch.float16), ws((B, H, L, d)))


def test_backward_needs_workspaces():
    c = Case(L=17, d=64)
    x = make_inputs(c)
    out, lse = run_fwd(c, x, "pre")
    with pytest.raises(ValueError, match="q_ws, k_ws"):
        run_bwd(c, x, out, lse, torch.randn_like(out), workspaces_given=False)
