"""The ablations of ``ComplexFormerConfig`` that CMHAAttention does not have itself: learnable
per-head frequencies (``learnable_freqs``) and a delta fixed at a constant (``fixed_delta``).

Both change only the angles handed to the attention op (:meth:`CMHAAttention.angles`): the op
already takes (H, h) frequencies and returns their gradient, and a constant delta is a tensor
like the fixed delta = 1 of RoPE. Partial rotation (``rotary_fraction``) needs no module: it is
a frequency vector with zeros (``partial_freqs``).

``omega`` is an angle like delta and beta: ``cmha_parameters()`` returns it and
``save_cmha_angles`` / ``load_cmha_angles`` carry it beside a PEFT adapter.
"""
import torch
from torch import nn

from .cmha_attention import CMHAAttention, _hf_init


def partial_freqs(freqs, fraction):
    """``freqs`` with only the first ``round(fraction * h)`` pairs (the highest frequencies, as in
    GPT-NeoX's ``rotary_pct``) rotating; the rest get frequency 0. With delta = 1 and beta = 0 such
    a pair is left as it is up to the op's modulus epsilon (r = sqrt(x^2 + y^2 + eps_r)), exactly as
    RoPE's own pairs are, so fraction 1 is RoPE bit for bit (docs/design.md, "Ablations")."""
    h = freqs.shape[-1]
    keep = round(fraction * h)
    out = freqs.clone()
    out[..., keep:] = 0
    return out


class AblationAttention(CMHAAttention):
    """CMHAAttention with learnable per-head frequencies ``omega`` (H, h), initialised to the fixed
    ones (AdaRoPE-like for "rope"), and/or delta fixed at ``fixed_delta`` (0: the rotation is beta +
    omega p only, the token's own phase dropped)."""

    # omega never goes below float32 either (omega * position drifts by radians in bfloat16)
    _float32_params = CMHAAttention._float32_params + ("omega",)

    def __init__(self, *, learnable_freqs=False, fixed_delta=None, learnable=("delta", "beta"), **kwargs):
        if fixed_delta is not None:
            learnable = tuple(x for x in learnable if x != "delta")
        super().__init__(learnable=learnable, **kwargs)
        self.learnable_freqs, self.fixed_delta = bool(learnable_freqs), fixed_delta
        if fixed_delta is not None:  # CMHAState.angles serves the fixed delta as a constant
            self._fixed_values = {**self._fixed_values, "delta": float(fixed_delta)}
            self._derived.clear()
        if self.learnable_freqs:
            p = next(self.q_proj.parameters())
            dt = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            self.omega = nn.Parameter(torch.empty(self.num_heads, self.head_dim // 2, device=p.device, dtype=dt))
            self._reset_omega()

    @torch.no_grad()
    def _reset_omega(self, init=None):
        value = self._freqs_master.to(self.omega.dtype).expand_as(self.omega).to(self.omega.device)
        if init is None or not hasattr(init, "copy_"):
            if not getattr(self.omega, "_is_hf_initialized", False):
                self.omega.copy_(value)
        else:
            init.copy_(self.omega, value)

    def init_weights_hf(self):
        super().init_weights_hf()
        if self.learnable_freqs:
            self._reset_omega(_hf_init())

    def angles(self, device, dtype):
        delta, beta, freqs = super().angles(device, dtype)
        if self.learnable_freqs:
            freqs = self.omega if self.omega.dtype == dtype else self.omega.to(dtype)
        return delta, beta, freqs

    def extra_repr(self):
        return super().extra_repr() + f", learnable_freqs={self.learnable_freqs}, fixed_delta={self.fixed_delta}"
