"""complexformer.train under DDP: 2 CPU processes (gloo), spawned by the test, take the same steps
as one process at the same global batch (CE and PDL; PDL's normaliser is the global weight sum)."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import torch.multiprocessing as mp  # noqa: E402
from dist_testutil import free_port, gloo_rank  # noqa: E402

WORLD = 2
CASES = (("ce", 1.0), ("pdl", 0.5))
TINY = dict(steps=6, batch_size=4, seq_len=24, lr=1e-2, seed=3, progress=False)


def _stream():
    from complexformer.lab import data as cfdata

    text = cfdata.load_corpus("poetry")[:6000]
    return cfdata.encode_stream(cfdata.ByteTokenizer(), text)


def _model():
    from complexformer.lab.train import build_model

    return build_model(256, "cmha", hidden_size=32, num_layers=1, num_heads=2, seed=3)


def _run_all():
    from complexformer.lab.train import train

    out = {}
    for loss, alpha in CASES:
        model = _model()
        out[loss] = {"loss": train(model, _stream(), loss=loss, alpha=alpha, **TINY)["loss"],
                     "param": [p.detach().double().sum().item() for p in model.parameters()]}
    return out


def _worker(rank, world, port, tmp):
    with gloo_rank(rank, world, port, f"{tmp}/pg_init"):
        res = _run_all()
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(res, f)


def test_ddp_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    single = _run_all()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for loss, _ in CASES:
        want = torch.tensor(single[loss]["loss"], dtype=torch.float64)
        assert want[-1] < want[0]  # the runs train
        for r, res in enumerate(ranks):
            got = torch.tensor(res[loss]["loss"], dtype=torch.float64)
            # float32 noise: the all-reduce sums the two halves' gradients in another order
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{loss}, rank {r}: {m}")
            torch.testing.assert_close(torch.tensor(res[loss]["param"]), torch.tensor(single[loss]["param"]),
                                       rtol=1e-4, atol=1e-4)
