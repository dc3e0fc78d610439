"""Evaluation metrics for the experiments: perplexity, accuracy by token-frequency quartile, and
distinct-n of generated text.

All functions take a causal LM called as ``model(input_ids=..., use_cache=False).logits`` (a Hugging Face
``*ForCausalLM``) and score exactly the tokens they are given, so runs compare on the same tokens.
"""
import math
from collections import Counter

import torch
import torch.nn.functional as F


def frequency_quartiles(counts):
    """Bucket every token id 0..3 by its training count: 0 = the rarest quarter of the ids seen in
    training (plus every id never seen, the rarest of all), 3 = the most frequent quarter.

    Ids seen at least once are ranked by count (ties by id) and cut into four equal-size groups;
    "rare tokens" in the experiments are bucket 0.
    """
    counts = torch.as_tensor(counts)
    bucket = torch.zeros(counts.numel(), dtype=torch.long)
    seen = torch.nonzero(counts > 0).flatten()
    if seen.numel():
        # stable sort by count: equal counts keep id order, so the cut is reproducible
        order = seen[torch.sort(counts[seen], stable=True).indices]
        bucket[order] = torch.arange(order.numel()) * 4 // order.numel()
    return bucket


@torch.no_grad()
def evaluate_lm(model, inputs, targets, *, batch_size=16, buckets=None):
    """Mean next-token cross-entropy, perplexity and top-1 accuracy over (n, L) windows.

    With ``buckets`` (a (V,) tensor of bucket ids, e.g. :func:`frequency_quartiles`), also the
    top-1 accuracy and the number of target tokens in each bucket (NaN for an empty bucket).
    Returns a dict: ``ce``, ``ppl``, ``acc``, ``tokens``, and ``acc_by_bucket``/``tokens_by_bucket``.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    nb = 0 if buckets is None else int(buckets.max()) + 1
    nll = 0.0
    hits = torch.zeros(max(nb, 1), dtype=torch.float64)
    n = torch.zeros(max(nb, 1), dtype=torch.float64)
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(dev), targets[i:i + batch_size].to(dev)
        logits = model(input_ids=x, use_cache=False).logits.float().flatten(0, 1)
        y = y.flatten()
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        hit = (logits.argmax(-1) == y).double().cpu()
        k = buckets[y.cpu()] if buckets is not None else torch.zeros_like(y.cpu())
        hits.index_add_(0, k, hit)
        n.index_add_(0, k, torch.ones_like(hit))
    model.train(was_training)
    total = n.sum().item()
    ce = nll / total
    out = {"ce": ce, "ppl": math.exp(ce), "acc": hits.sum().item() / total, "tokens": int(total)}
    if buckets is not None:
        out["acc_by_bucket"] = [h / c if c else float("nan") for h, c in zip(hits.tolist(), n.tolist())]
        out["tokens_by_bucket"] = [int(c) for c in n.tolist()]
    return out


def distinct_n(texts, n):
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, over all texts
    together (words split on whitespace). 0.0 when no text has n words."""
    grams = Counter()
    for t in texts:
        w = t.split()
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, do_sample=False, temperature=1.0, top_k=None,
             generator=None, context=None):
    """Continue each prompt row of ``prompts`` (B, P) by ``max_new_tokens`` tokens: greedy, or
    sampled from softmax(logits / temperature) (optionally top-k) with ``generator``.

    A plain loop over the full prefix (no cache): the continuations are short, and it is the same
    code for every attention kind. ``context`` caps the prefix the model sees (the training length).
    Returns the new tokens (B, max_new_tokens).
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = prompts.to(dev)
    for _ in range(max_new_tokens):
        x = ids if context is None else ids[:, -context:]
        logits = model(input_ids=x, use_cache=False).logits[:, -1].float()
        if do_sample:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).to(dev)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    model.train(was_training)
    return ids[:, prompts.shape[1]:].cpu()
