"""complexformer.causal_lm_pdl_loss / causal_lm_normalizer against F.cross_entropy on the shifted
float64 logits: weighted and unweighted, ignore_index, label smoothing, gradient accumulation with
the window normaliser, and the fused LM-head path against the logits path."""
import pytest
import torch
import torch.nn.functional as F

import complexformer
from complexformer import causal_lm_normalizer, causal_lm_pdl_loss

B, T, D, V = 3, 7, 5, 11


def batch(seed=0, ignore_index=-100, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    head = torch.randn(V, D, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = labels[1, 5] = labels[2, 0] = ignore_index  # padding, masked prompt
    labels[2, 1] = ignore_index
    weights = torch.rand(V, generator=g, dtype=torch.float64) * 3 + 0.1
    return hidden, head, bias, labels, weights


def reference(logits, labels, weights, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """F.cross_entropy on the shifted logits: position t predicts labels[t + 1]."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return F.cross_entropy(z, y, weight=weights, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_cross_entropy_on_shifted_logits(weighted, label_smoothing):
    hidden, head, bias, labels, weights = batch()
    w = weights if weighted else None
    logits = F.linear(hidden, head, bias).requires_grad_()
    got = causal_lm_pdl_loss(logits, labels, w, label_smoothing=label_smoothing)
    (g_got,) = torch.autograd.grad(got, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    want = reference(ref_logits, labels, w, label_smoothing=label_smoothing)
    (g_want,) = torch.autograd.grad(want, ref_logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert torch.all(g_got[:, -1] == 0)  # the last position predicts nothing


def test_shift_false_takes_aligned_targets():
    hidden, head, bias, labels, weights = batch()
    logits = F.linear(hidden, head, bias)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    torch.testing.assert_close(causal_lm_pdl_loss(logits, targets, weights, shift=False),
                               reference(logits, labels, weights), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(complexformer.causal_lm.shift_labels(labels), targets, rtol=0, atol=0)


def test_ignore_index_and_an_empty_window():
    hidden, head, bias, labels, weights = batch(ignore_index=-1)
    logits = F.linear(hidden, head, bias)
    torch.testing.assert_close(causal_lm_pdl_loss(logits, labels, weights, ignore_index=-1),
                               reference(logits, labels, weights, ignore_index=-1), rtol=1e-12, atol=1e-12)
    y = labels[:, 1:]
    assert causal_lm_normalizer(labels, weights, ignore_index=-1) == weights[y[y != -1]].sum()
    assert causal_lm_normalizer(labels, ignore_index=-1) == (y != -1).sum() == B * (T - 1) - 3  # labels[2, 0] is never a target
    # a window with no counted target: normaliser 0, loss 0 and zero gradients, not NaN
    empty = torch.full((B, T), -100)
    z = logits.clone().requires_grad_()
    norm = causal_lm_normalizer(empty, weights)
    assert norm.item() == 0.0
    for n in (None, norm, 0):
        loss = causal_lm_pdl_loss(z, empty, weights, normalizer=n)
        (g,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0.0 and torch.all(g == 0)


@pytest.mark.parametrize("weighted", [True, False])
def test_gradient_accumulation_with_the_window_normaliser_equals_one_batch(weighted):
    """k micro-batches, each divided by the whole window's normaliser, sum to the loss and
    gradient of the one big batch, whatever their own weight sums (not the mean of means)."""
    hidden, head, bias, labels, weights = batch(seed=1)
    w = weights if weighted else None
    labels[1, :] = -100  # one micro-batch counts nothing
    labels[2, 3:] = -100  # and one counts little
    logits = F.linear(hidden, head, bias).requires_grad_()
    want = causal_lm_pdl_loss(logits, labels, w)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(want, reference(logits.detach(), labels, w), rtol=1e-12, atol=1e-12)
    micro = [slice(0, 1), slice(1, 2), slice(2, 3)]
    norm = sum(causal_lm_normalizer(labels[s], w) for s in micro)
    count = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(norm, (weights[labels[:, 1:][labels[:, 1:] != -100]].sum() if weighted
                                      else count.double()), rtol=1e-15, atol=0)
    z = logits.detach().clone().requires_grad_()
    got = sum(causal_lm_pdl_loss(z[s], labels[s], w, normalizer=norm) for s in micro)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, g_want, rtol=1e-12, atol=1e-12)
    # the mean of the micro-batch means differs: the window normaliser is what makes it exact
    mean_of_means = sum(causal_lm_pdl_loss(z[s], labels[s], w) for s in micro) / len(micro)
    assert abs(mean_of_means.item() - want.item()) > 1e-3


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_fused_head_equals_logits(weighted, with_bias, scale):
    """The fused head gives the loss of the logits (scale * them with ``logit_scale``, as Granite
    and Cohere apply: the scale reaches the bias too) and their gradients."""
    hidden, head, bias, labels, weights = batch(seed=2)
    w = weights if weighted else None
    b = bias if with_bias else None
    c = 1.0 if scale is None else scale
    inputs = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    h, W, bb = inputs
    ref = causal_lm_pdl_loss(c * F.linear(h, W, bb if with_bias else None), labels, w, normalizer=5.0,
                             label_smoothing=0.05)
    ref_grads = torch.autograd.grad(ref, [h, W] + ([bb] if with_bias else []))
    h2, W2, b2 = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    got = causal_lm_pdl_loss(h2, labels, w, normalizer=5.0, label_smoothing=0.05, lm_head=W2,
                             lm_head_bias=b2 if with_bias else None, logit_scale=scale)
    grads = torch.autograd.grad(got, [h2, W2] + ([b2] if with_bias else []))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    want = reference(c * F.linear(hidden, head, b), labels, w, label_smoothing=0.05, reduction="sum") / 5.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_input_names_the_argument():
    hidden, head, bias, labels, weights = batch()
    logits = F.linear(hidden, head, bias)
    with pytest.raises(ValueError, match="labels"):
        causal_lm_pdl_loss(logits, labels[:, :-1], weights)
    with pytest.raises(ValueError, match="lm_head_bias"):
        causal_lm_pdl_loss(logits, labels, weights, lm_head_bias=bias)
    with pytest.raises(ValueError, match="logit_scale: given without lm_head"):
        causal_lm_pdl_loss(logits, labels, weights, logit_scale=2.0)
    with pytest.raises(ValueError, match="normalizer"):
        causal_lm_pdl_loss(logits, labels, weights, normalizer=-1.0)
