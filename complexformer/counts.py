"""Token counts and the power-law decay weights built from them (docs/design.md, "PDL"):

    counts  = token_counts(label_ids, vocab_size)         # how often each token is a *target*
    weights = pdl_weights(counts, alpha=1.0)              # w_v = (c_v + eps)^-alpha

The loss that takes the weights is in pdl.py.
"""
import math

import torch
from torch import Tensor

from . import _ext
from ._selfcheck import selfcheck
from .checks import INT_DTYPES, check_int, check_real, check_tensor

__all__ = ["pdl_weights", "token_counts"]


def _token_counts_body(ids: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    counts = torch.empty(vocab_size, dtype=torch.int64, device=ids.device)
    if ids.numel() == 0:
        return counts.zero_()
    ids = ids.contiguous()
    if ids.is_cuda:
        # One host sync to report out-of-range ids: counting is preprocessing, not the hot path.
        bad = torch.zeros(2, dtype=torch.int64, device=ids.device)
        _ext.launch("pdl_token_counts", ids, counts, ignore_index, 1, _ext.stream(ids), bad)
        n_bad, value = bad.tolist()
        if n_bad:
            raise ValueError(
                f"ids: {n_bad} value(s) out of range for vocab_size={vocab_size}, e.g. {value} "
                f"(expected 0 <= id < vocab_size, or ignore_index={ignore_index})"
            )
    else:
        _ext.launch("pdl_token_counts", ids, counts, ignore_index, _ext.num_threads(), 0, None)
    return counts


# integer outputs: no autograd, nothing for a torch.func transform to differentiate
_token_counts_op = _ext.KernelOp("token_counts", _token_counts_body,
                                 fake=lambda ids, vocab_size, ignore_index: ids.new_empty(vocab_size,
                                                                                         dtype=torch.int64))


def token_counts(ids, vocab_size, *, ignore_index=-100):
    """How often each token id occurs in ``ids`` (any shape, int32 or int64): a (vocab_size,) int64
    tensor on ids' device. Entries equal to ``ignore_index`` are skipped; any other id outside
    [0, vocab_size) raises ValueError naming ``ids`` and the value.

    Count the *label stream* the loss will see (e.g. ``labels[:, 1:]`` of your finetuning set,
    special and template tokens included), not re-tokenised raw text: see ``pdl_weights``.

    CPU: threaded (private per-thread histograms merged in a fixed order). CUDA: integer atomics
    (deterministic), plus one host synchronisation to report out-of-range ids.
    """
    check_tensor("ids", ids, dtypes=INT_DTYPES)
    # counts are one int64 per id: anything beyond 2^40 ids (8 TiB of counts) is a mistake
    vocab_size = check_int("vocab_size", vocab_size, lo=1, hi=2**40, what="a positive int")
    ignore_index = check_int("ignore_index", ignore_index)
    _ext.require_cuda_kernels("token_counts", ids)
    return _token_counts_op(ids, vocab_size, ignore_index)


def pdl_weights(counts, alpha=1.0, eps=1e-7, *, max_weight=None):
    """Power-law decay weights ``w_v = (c_v + eps)^(-alpha)``, clipped at ``max_weight``: (V,) float32.

    ``counts`` is a (V,) tensor of target frequencies (``token_counts``). ``alpha=0`` gives
    all-ones weights, i.e. plain cross-entropy. Computed in float64, returned as float32.

    Why count the label stream: a token that never occurs as a target gets ``eps^-alpha``
    (1e7 at the defaults); if it ever does appear as a target, that single token dominates the
    batch's weighted mean. Counting exactly the label ids the loss will see (special, EOS and chat
    template tokens included: the reference trainer's ``add_special_tokens=False`` count gives
    them weight 1e7) means every target the loss meets has a count >= 1, hence a weight <= 1.
    ``max_weight`` additionally caps weights when counts come from a different corpus.
    Weights beyond float32's range (e.g. ``eps^-alpha`` for alpha > ~5.5 at the default eps)
    raise a ValueError naming alpha and eps, rather than becoming inf: pass ``max_weight``.
    """
    check_tensor("counts", counts, ndim=1, allow_empty=False)
    if counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts: expected an integer or floating tensor, got {counts.dtype}")
    alpha, eps = check_real("alpha", alpha), check_real("eps", eps)
    for name, v in (("alpha", alpha), ("eps", eps)):
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if alpha < 0:
        raise ValueError(f"alpha: must be >= 0 (power-law *decay*), got {alpha}")
    if eps <= 0:
        raise ValueError(f"eps: must be > 0 (an unseen token would get an infinite weight), got {eps}")
    if max_weight is not None and not check_real("max_weight", max_weight) > 0:
        raise ValueError(f"max_weight: expected a positive number or None, got {max_weight!r}")
    c = counts.to(torch.float64)
    if bool((c < 0).any()):
        raise ValueError("counts: must be non-negative")
    if not bool(torch.isfinite(c).all()):  # NaN would become a NaN weight, inf a zero weight
        raise ValueError("counts: must be finite (found NaN or inf)")
    w = (c + eps).pow(-float(alpha))
    if max_weight is not None:
        w = w.clamp(max=float(max_weight))
    big = w.max()
    if not bool(big <= _FLOAT32_MAX):  # the float32 weights would be inf (and a smoothed loss NaN)
        cmin = float(c[w.argmax()])
        cap = (f"max_weight={max_weight!r} is beyond it too; pass a smaller one" if max_weight is not None
               else "pass max_weight= to cap the weights")
        raise ValueError(f"alpha, eps: the weight of a count of {cmin:g}, ({cmin:g} + eps={eps:g})^-alpha={alpha:g} "
                         f"= {float(big):.3g}, overflows float32 (max {_FLOAT32_MAX:.3g}): {cap}, or use a larger "
                         f"eps or a smaller alpha")
    return w.to(torch.float32)


_FLOAT32_MAX = torch.finfo(torch.float32).max


@selfcheck("token_counts", 0.0)
def _selfcheck_token_counts(device):
    ids = torch.randint(-1, 3000, (10007,), generator=torch.Generator().manual_seed(1))
    got = token_counts(ids.to(device), 3000, ignore_index=-1).cpu()
    return float((got - torch.bincount(ids[ids >= 0], minlength=3000)).abs().max())
