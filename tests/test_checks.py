"""One check per argument kind (complexformer/checks.py): every entry point that takes the same kind
of argument raises the same error, naming the argument as that entry point calls it."""
import re

import pytest
import torch

from complexformer import CMHA, cmha_attention, euler_rotate
from oracles import attn_inputs

B, H, L, d = 2, 4, 5, 8


def _qkv():
    return attn_inputs(B, H, H, L, L, d, seed=0)


BAD_POSITIONS = [
    (torch.arange(L - 1), ValueError, "expected shape"),
    (torch.arange(L).float(), TypeError, "not supported (expected an integer tensor)"),
    (torch.zeros(3, L, dtype=torch.long), ValueError, "expected shape"),
    ([0, 1, 2, 3, 4], TypeError, "expected a torch.Tensor"),
]


@pytest.mark.parametrize("i", range(len(BAD_POSITIONS)))
def test_positions_same_error_everywhere(i):
    pos, exc, msg = BAD_POSITIONS[i]
    msg = re.escape(msg)
    q, k, v, delta, beta, freqs = _qkv()
    with pytest.raises(exc, match=rf"^positions: .*{msg}"):
        euler_rotate(q, delta, beta, freqs, positions=pos)
    with pytest.raises(exc, match=rf"^positions\[0\] \(query positions\): .*{msg}"):
        cmha_attention(q, k, v, delta, beta, freqs, positions=(pos, torch.arange(L)))
    with pytest.raises(exc, match=rf"^position_ids: .*{msg}"):
        CMHA(H * d, H).double()(torch.randn(B, L, H * d, dtype=torch.float64), position_ids=pos)


@pytest.mark.parametrize("mask, exc, msg", [
    (torch.ones(B, L - 1, dtype=torch.bool), ValueError, "expected shape"),
    (torch.ones(B, L), TypeError, ""),
])
def test_key_padding_mask_same_error_everywhere(mask, exc, msg):
    q, k, v, delta, beta, freqs = _qkv()
    with pytest.raises(exc, match=rf"^key_padding_mask: .*{msg}"):
        cmha_attention(q, k, v, delta, beta, freqs, key_padding_mask=mask)
    with pytest.raises(exc, match=rf"^key_padding_mask: .*{msg}"):
        CMHA(H * d, H).double()(torch.randn(B, L, H * d, dtype=torch.float64), key_padding_mask=mask)


def test_angle_parameters_same_error_everywhere():
    q, k, v, delta, beta, freqs = _qkv()
    for name, bad in (("delta", dict(delta=delta[:, :3])), ("beta", dict(beta=beta[:3])),
                      ("freqs", dict(freqs=freqs[:3]))):
        args = dict(delta=delta, beta=beta, freqs=freqs)
        args.update(bad)
        with pytest.raises(ValueError, match=rf"^{name}: expected shape .*\(H=4 query heads, h=d/2=4\)"):
            euler_rotate(q, args["delta"], args["beta"], args["freqs"])
        with pytest.raises(ValueError, match=rf"^{name}: expected shape .*\(H=4 query heads, h=d/2=4\)"):
            cmha_attention(q, k, v, args["delta"], args["beta"], args["freqs"])
    for fn in (lambda: euler_rotate(q, delta, None, freqs),
               lambda: cmha_attention(q, k, v, delta, None, freqs)):
        with pytest.raises(ValueError, match="^beta: required for queries"):
            fn()
