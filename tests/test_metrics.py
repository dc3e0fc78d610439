"""complexformer.lab.metrics and complexformer.lab.data against hand computations."""
import math

import pytest
import torch
from torch import nn

from complexformer.lab import data as cfdata
from complexformer.lab.metrics import distinct_n, evaluate_lm, frequency_quartiles, generate


class FixedLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a bigram model with known outputs."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids, use_cache=None):
        class Out:
            pass

        o = Out()
        o.logits = self.table[input_ids]
        return o


def test_frequency_quartiles_by_hand():
    counts = torch.tensor([0, 5, 1, 3, 8, 2, 0, 4, 7])
    # seen ids by count: 2(1) 5(2) 3(3) 7(4) 1(5) 8(7) 4(8) -> quartile = rank * 4 // 7 = 0 0 1 1 2 2 3
    want = torch.tensor([0, 2, 0, 1, 3, 0, 0, 1, 2])  # unseen ids 0 and 6 are the rarest
    assert torch.equal(frequency_quartiles(counts), want)
    # ties are broken by id, so equal counts never straddle a cut at random
    assert torch.equal(frequency_quartiles(torch.tensor([2, 2, 2, 2])), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(frequency_quartiles(torch.zeros(3, dtype=torch.long)), torch.zeros(3, dtype=torch.long))


def test_evaluate_lm_by_hand():
    table = [[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]]
    model = FixedLM(table)
    x = torch.tensor([[0, 1, 2], [1, 0, 2]])
    y = torch.tensor([[0, 2, 1], [1, 1, 0]])
    nll, hits = 0.0, []
    for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
        row = table[xi]
        nll -= row[yi] - math.log(sum(math.exp(v) for v in row))
        hits.append(max(range(3), key=lambda j: row[j]) == yi)  # ties (row 2) -> argmax picks id 0
    buckets = torch.tensor([1, 0, 1])  # id 1 is "rare"
    out = evaluate_lm(model, x, y, batch_size=1, buckets=buckets)
    assert out["tokens"] == 6
    assert out["ce"] == pytest.approx(nll / 6, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(nll / 6), rel=1e-6)
    assert out["acc"] == pytest.approx(sum(hits) / 6)
    # targets: 0 2 1 1 1 0 -> bucket 0 (id 1) has 3 targets, hits at positions 2, 3, 4
    rare = [h for h, t in zip(hits, y.flatten().tolist()) if t == 1]
    assert out["tokens_by_bucket"] == [3, 3]
    assert out["acc_by_bucket"][0] == pytest.approx(sum(rare) / 3)


def test_distinct_n_by_hand():
    texts = ["a b a b", "a c", ""]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # a b a b a c: {a, b, c}
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (a b) (b a) (a b) (a c)
    assert distinct_n(["one"], 2) == 0.0


def test_generate_greedy_and_sampled():
    V = 5
    table = torch.full((V, V), -30.0)
    for i in range(V):
        table[i, (i + 1) % V] = 30.0  # next token = current + 1 (mod V), almost surely
    model = FixedLM(table)
    prompts = torch.tensor([[0, 1], [3, 4]])
    assert generate(model, prompts, 4).tolist() == [[2, 3, 4, 0], [0, 1, 2, 3]]
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompts, 4, do_sample=True, generator=g, context=1).tolist() == [[2, 3, 4, 0], [0, 1, 2, 3]]
    flat = FixedLM(torch.zeros(V, V))  # uniform: sampling must vary, greedy must not
    g = torch.Generator().manual_seed(0)
    s = generate(flat, torch.zeros(8, 1, dtype=torch.long), 16, do_sample=True, generator=g)
    assert len(set(s.flatten().tolist())) == V
    assert generate(flat, torch.zeros(2, 1, dtype=torch.long), 3).tolist() == [[0, 0, 0]] * 2


def test_corpus_and_split():
    text = cfdata.load_corpus("poetry")
    assert text.startswith("Blessed is the man that walketh not in the counsel of the ungodly")
    assert 290_000 < len(text) < 310_000
    assert cfdata.load_corpus("narrative").startswith("In the beginning God created")
    with pytest.raises(ValueError, match="part"):
        cfdata.load_corpus("psalms")
    tr, va = cfdata.split_held_out("aa\nbb\ncc\ndd\n", 0.3)
    assert (tr, va) == ("aa\nbb\n", "cc\ndd\n")  # cut at the line boundary before 70%
    assert tr + va == "aa\nbb\ncc\ndd\n"


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_tokenizer_roundtrip_and_save(kind, tmp_path):
    pytest.importorskip("tokenizers")
    text = cfdata.load_corpus("poetry")[:20000]
    tok = cfdata.build_tokenizer(kind, text, vocab_size=300)
    sample = "Praise ye the LORD.\nÆsop's naïve café\n"
    ids = tok.encode(sample)
    assert max(ids) < tok.vocab_size and tok.decode(ids) == sample
    tok.save(str(tmp_path))
    again = cfdata.load_tokenizer(str(tmp_path))
    assert again.encode(sample) == ids and again.vocab_size == tok.vocab_size
    if kind == "bpe":
        assert len(ids) < len(sample.encode())  # merges happened


def test_windows():
    s = torch.arange(20)
    x, y = cfdata.sequential_windows(s, 6)
    assert x.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    assert torch.equal(y, x + 1)
    gx, gy = cfdata.random_windows(s, 4, 5, torch.Generator().manual_seed(3))
    assert torch.equal(gy, gx + 1) and torch.equal(gx[:, 1:], gx[:, :1] + torch.arange(1, 5))
    # every rank takes its rows of the same global batch
    for r in range(2):
        rx, _ = cfdata.random_windows(s, 4, 5, torch.Generator().manual_seed(3), rank=r, world_size=2)
        assert torch.equal(rx, gx[r::2])
    with pytest.raises(ValueError, match="seq_len"):
        cfdata.sequential_windows(s, 20)
    with pytest.raises(ValueError, match="divisible"):
        cfdata.random_windows(s, 3, 5, torch.Generator(), world_size=2)
