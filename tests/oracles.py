"""What the tests share: the FlashAttention accuracy rule, the attention input factory and the
plain-PyTorch oracles (rotation, softmax attention) written here, independently of the package's
code, so that a test of an op never compares the op with itself."""
import math

import torch

from complexformer.reference import default_freqs, split_pairs


def max_err(x, ref):
    """max |x - ref|, computed in float64 on the CPU (0 for empty tensors)."""
    if x.numel() == 0:
        return 0.0
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_fa_rule(ours, torch_low, ref, *, floor=0.0, rel_floor=0.0, what="output"):
    """The FlashAttention rule: in a dtype, our error against the float64 reference is at most twice
    that of the same math done by PyTorch in that dtype (torch_low), plus floor + rel_floor * max|ref|.
    Returns (our error, PyTorch's)."""
    err, base = max_err(ours, ref), max_err(torch_low, ref)
    bound = 2 * base + floor + (rel_floor * ref.detach().abs().max().item() if rel_floor and ref.numel() else 0.0)
    assert err <= bound, f"{what}: error {err:.3e} > 2 x torch's {base:.3e} + floor {bound - 2 * base:.3e}"
    return err, base


def attn_inputs(B=2, H=4, Hkv=2, Lq=6, Lk=6, d=8, dv=None, *, dtype=torch.float64, device="cpu", grad=False,
                per_head_freqs=False, strided=False, seed=1234, gen=None):
    """Random CMHA inputs [q, k, v, delta, beta, freqs], drawn in float64 and then cast to dtype:
    q (B, H, Lq, d), k (B, Hkv, Lk, d), v (B, Hkv, Lk, dv); delta ~ 1 + N(0, 1) / sqrt(h) (the
    authors' init around RoPE's 1), beta ~ 0.5 N(0, 1), freqs the default (per_head_freqs: (H, h),
    each head's scaled by up to 10%). strided: q, k, v as sliced from (B, L, heads, d) projections
    (token stride heads * d). grad: every tensor requires grad."""
    dv = d if dv is None else dv
    h = d // 2
    g = gen or torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if strided:
        q, k, v = (rnd(B, L, n, e).transpose(1, 2) for L, n, e in ((Lq, H, d), (Lk, Hkv, d), (Lk, Hkv, dv)))
    else:
        q, k, v = rnd(B, H, Lq, d), rnd(B, Hkv, Lk, d), rnd(B, Hkv, Lk, dv)
    delta = 1.0 + rnd(H, h) / math.sqrt(h)
    beta = 0.5 * rnd(H, h)
    freqs = default_freqs(d, dtype=torch.float64)
    if per_head_freqs:
        freqs = freqs * (1.0 + 0.1 * torch.rand(H, h, generator=g, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v, delta, beta, freqs)]


def rotate_ref(x, delta, beta, freqs, pos, layout="half", dtype=None):
    """The Euler rotation straight from its polar form, in `dtype` (default x's): per pair
    r (cos phi, sin phi) with r = sqrt(re^2 + im^2 + 1e-9), phi = delta atan2(im, re) + omega p
    (+ beta, None for keys). x (B, H, L, d) has one head per delta row (repeat kv heads first);
    pos (B or 1, L); omega p is reduced to [-pi, pi] in float64 as the kernels do."""
    dtype = dtype or x.dtype
    H, h = delta.shape
    re, im = split_pairs(x.to(dtype), layout)
    r = torch.sqrt(re * re + im * im + 1e-9)
    omega = freqs.expand(H, h) if freqs.dim() == 1 else freqs
    ang = omega.double()[None, :, None, :] * pos.to(omega.device).double()[:, None, :, None]
    ang = (ang - 2 * math.pi * torch.round(ang / (2 * math.pi))).to(dtype)
    if beta is not None:
        ang = ang + beta.to(dtype)[None, :, None, :]
    phi = delta.to(dtype)[None, :, None, :] * torch.atan2(im, re) + ang
    ore, oim = r * torch.cos(phi), r * torch.sin(phi)
    if layout == "half":
        return torch.cat([ore, oim], -1)
    return torch.stack([ore, oim], -1).flatten(-2)


def attention_ref(qr, kr, v_full, vis, scale):
    """Softmax attention on rotated q~ (B, H, Lq, d), k~ (B, H, Lk, d), v (B, H, Lk, dv) with the
    visibility mask vis (broadcastable to (B, H, Lq, Lk)), in the inputs' dtype; rows that see no
    key give 0."""
    s = scale * qr @ kr.transpose(-1, -2)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v_full


def cmha_ref(q, k, v, delta, beta, freqs, *, causal=True, key_padding_mask=None, layout="half"):
    """CMHA written out in plain PyTorch, in the inputs' dtype, with the default positions (query m
    at Lk - Lq + m, key n at n) and scale 1 / sqrt(d): q rotated with beta, k without, each query
    head on its kv head, then softmax attention over the visible keys (causal: n <= m + Lk - Lq;
    key_padding_mask (B, Lk): True = attend). Returns (out, lse); a row that sees no key gives 0
    and -inf."""
    B, H, Lq, d = q.shape
    G, Lk = H // k.shape[1], k.shape[2]
    ar = lambda n: torch.arange(n, device=q.device)  # noqa: E731
    qr = rotate_ref(q, delta, beta, freqs, (Lk - Lq + ar(Lq))[None], layout)
    kr = rotate_ref(k.repeat_interleave(G, 1), delta, None, freqs, ar(Lk)[None], layout)
    vis = ar(Lk)[None, :] <= ar(Lq)[:, None] + (Lk - Lq) if causal else torch.ones(Lq, Lk, dtype=torch.bool,
                                                                                   device=q.device)
    vis = vis[None, None] if key_padding_mask is None else vis[None, None] & key_padding_mask[:, None, None, :]
    s = (qr @ kr.transpose(-1, -2) / math.sqrt(d)).masked_fill(~vis, float("-inf"))
    return attention_ref(qr, kr, v.repeat_interleave(G, 1), vis, 1 / math.sqrt(d)), torch.logsumexp(s, -1)
