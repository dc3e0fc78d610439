"""merge_attention: combine attentions over disjoint key sets by their log-sum-exp.

Softmax attention over keys K = K_1 + ... + K_n (disjoint) splits exactly: with out_i and lse_i the
attention and the row log-sum-exp over K_i alone (`cmha_attention(..., return_lse=True)`),

    lse = log sum_i exp(lse_i),    out = sum_i exp(lse_i - lse) out_i.

This is how ring / context-parallel attention and split-KV decoding assemble a row from key blocks
held by different devices or kernels (docs/design.md, "Log-sum-exp"). Plain torch, so every
autograd mode works through it.
"""
from typing import Sequence

import torch


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """(out, lse) of the attention over the union of the key sets of the partial results.

    Args:
        outs: n >= 1 tensors (..., L, dv), the attentions over disjoint key sets, one dtype.
        lses: n tensors (..., L), their row log-sum-exps (-inf: the row saw no key there).

    Returns out in the dtype of `outs` (the sum runs in float32, float64 for float64 inputs) and lse
    in the dtype of `lses`. A row that saw no key in any part gets out = 0 and lse = -inf, as
    `cmha_attention` gives for it, with zero gradients; NaN propagates.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs, lses: expected the same number (at least 1) of each, got {len(outs)} and {len(lses)}")
    for name, ts in (("outs", outs), ("lses", lses)):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name}[{i}]: expected a floating-point tensor, got {type(t).__name__}"
                                + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    for i, (o, s) in enumerate(zip(outs, lses)):
        if o.dtype != outs[0].dtype or s.dtype != lses[0].dtype:
            raise TypeError(f"outs[{i}], lses[{i}]: every part must have the dtypes of part 0 "
                            f"({outs[0].dtype}, {lses[0].dtype}), got {o.dtype}, {s.dtype}")
        if o.device != outs[0].device or s.device != outs[0].device:
            raise ValueError(f"outs[{i}], lses[{i}]: every tensor must be on {outs[0].device}")
        if o.dim() < 1 or o.shape[:-1] != s.shape or o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}], lses[{i}]: expected out (..., L, dv) and lse (..., L) with the shapes of "
                             f"part 0 {tuple(outs[0].shape)}, {tuple(outs[0].shape[:-1])}; got {tuple(o.shape)}, "
                             f"{tuple(s.shape)}")
    acc = torch.float64 if torch.float64 in (outs[0].dtype, lses[0].dtype) else torch.float32
    lse = torch.stack([s.to(acc) for s in lses])  # (n, ..., L)
    # shift by the (detached) row maximum: exact, since the result does not depend on the shift; a row
    # that is -inf everywhere is shifted by 0, so its weights are exp(-inf) = 0 and no NaN appears
    m = lse.detach().amax(0)
    m = m.masked_fill(m == float("-inf"), 0.0)
    w = torch.exp(lse - m)  # (n, ..., L)
    total = w.sum(0)
    empty = total == 0  # no key in any part (NaN stays NaN: NaN == 0 is False)
    safe = total.masked_fill(empty, 1.0)
    out = sum((w[i] / safe)[..., None] * outs[i].to(acc) for i in range(len(outs)))
    merged_lse = (m + torch.log(safe)).masked_fill(empty, float("-inf"))
    return out.to(outs[0].dtype), merged_lse.to(lses[0].dtype)
