"""complexformer.hf under torch.distributed: 2 CPU processes (gloo), spawned by the test.

Checks that label_token_counts all-reduces to the single-process counts over the union, and that a
2-process PDLTrainer (DDP, gradient accumulation 2, batch 2 per process) takes the same step as one
process on the whole batch of 8 (also with a model patched by apply_fused_pdl), while a
per-process normaliser does not. For CMHA-converted models: the same PDLTrainer DDP check on a
converted Llama (delta / beta learnable), and FSDP2 ``fully_shard`` on CPU / gloo (sharded delta /
beta, one SGD step equal to the unsharded step).
"""
import pytest
import torch

pytest.importorskip("transformers")

import torch.multiprocessing as mp  # noqa: E402
from dist_testutil import free_port, gloo_rank  # noqa: E402

WORLD = 2


def _check_counts(rank, world):
    try:
        import datasets
    except ImportError:  # optional: the other kinds of input are still checked
        datasets = None
    from hf_testutil import TINY_VOCAB, hand_counts, pad_collate, ragged_examples

    from complexformer.hf import label_token_counts

    examples = ragged_examples(lengths=[3, 12, 5, 9, 4, 11, 7, 6, 8, 2, 10])  # 11: shards of 6 and 5
    want = hand_counts(examples, TINY_VOCAB)
    # indexable data is sharded by rank automatically, then all-reduced
    got = label_token_counts(examples, TINY_VOCAB)
    assert torch.equal(got, want), f"rank {rank}: list"
    if datasets is not None:
        got = label_token_counts(datasets.Dataset.from_list(examples), TINY_VOCAB, batch_size=2)
        assert torch.equal(got, want), f"rank {rank}: datasets.Dataset"
    # an iterable is this rank's shard already (as a DataLoader with a DistributedSampler)
    loader = torch.utils.data.DataLoader(examples[rank::world], batch_size=2, collate_fn=pad_collate)
    got = label_token_counts(loader, TINY_VOCAB)
    assert torch.equal(got, want), f"rank {rank}: DataLoader shard"
    # shard=False: every rank counts everything, so the sum is world x the counts
    got = label_token_counts(examples, TINY_VOCAB, shard=False, progress=False)
    assert torch.equal(got, world * want), f"rank {rank}: shard=False"


def _check_trainer(rank, world, out_dir, make_model=None):
    """make_model: a function returning the same fresh model on every call (default: tiny GPT-2)."""
    from hf_testutil import (
        TINY_VOCAB, hand_counts, hand_pdl_step, max_param_diff, pad_collate, ragged_examples, tiny_gpt2,
        training_args,
    )

    from complexformer import pdl as _pdl
    from complexformer.hf import PDLTrainer, _WindowNormalizer, apply_fused_pdl

    lr = 0.5
    examples = ragged_examples()  # 8 ragged sequences: 2 processes x 2 micro-batches x 2
    weights = _pdl.pdl_weights(hand_counts(examples, TINY_VOCAB), alpha=1.0)
    make_model = make_model or tiny_gpt2
    model = make_model()
    ref = hand_pdl_step(model, examples, weights, lr)

    class LocalNormaliser(PDLTrainer):  # each process divides by its own weight sum: not exact
        def get_batch_samples(self, it, n, device):
            batches = [b for b in (next(it, None) for _ in range(n)) if b is not None]
            return batches, _WindowNormalizer(self.pdl_weight_sum(batches, device), 1)

    results = {}
    for name, cls in (("exact", PDLTrainer), ("local", LocalNormaliser), ("fused", PDLTrainer)):
        # "fused": the same model patched by apply_fused_pdl (fused LM head + loss, no logits)
        trained = apply_fused_pdl(make_model()) if name == "fused" else make_model()
        trainer = cls(model=trained, args=training_args(out_dir, batch=2, accum=2, lr=lr),
                      train_dataset=examples, data_collator=pad_collate, pdl_weights=weights)
        assert trainer.args.world_size == world
        trainer.train()
        results[name] = max_param_diff(trained, ref)
    assert results["exact"] < 1e-12 and results["fused"] < 1e-12, f"rank {rank}: {results}"
    assert results["local"] > 1e-4, f"rank {rank}: {results}"


def _converted_llama():
    """A CMHA-converted tiny Llama (float64) with its angles moved away from RoPE (seeded)."""
    from hf_testutil import tiny_family

    from complexformer.hf import cmha_parameters, convert_to_cmha

    model = convert_to_cmha(tiny_family("llama", dtype=torch.float64))
    with torch.no_grad():
        for i, p in enumerate(cmha_parameters(model)):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype))
    return model.train()


def _check_cmha_fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hf_testutil import TINY_VOCAB, tiny_family

    from complexformer.hf import cmha_parameters, convert_to_cmha

    lr = 0.5
    ids = torch.randint(3, TINY_VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    ref = convert_to_cmha(tiny_family("llama", dtype=torch.float64)).train()
    ref(input_ids=ids, labels=ids).loss.backward()  # unsharded, the whole batch
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad

    model = convert_to_cmha(tiny_family("llama", dtype=torch.float64)).train()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    angles = cmha_parameters(model)
    assert angles and all(isinstance(p, DTensor) for p in angles), "delta / beta are not sharded"
    half = ids.shape[0] // world  # equal-length rows: the mean of the per-rank means is the batch mean
    model(input_ids=ids[rank * half:(rank + 1) * half], labels=ids[rank * half:(rank + 1) * half]).loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        torch.testing.assert_close(full, q, rtol=1e-9, atol=1e-11, msg=lambda m: f"rank {rank} {name}: {m}")


def _worker(rank, world, port, init_file, out_dir, what):
    with gloo_rank(rank, world, port, init_file):
        if "counts" in what:
            _check_counts(rank, world)
        if "trainer" in what:
            _check_trainer(rank, world, out_dir)
        if "cmha_ddp" in what:  # delta / beta learnable with everything else
            _check_trainer(rank, world, out_dir, make_model=_converted_llama)
        if "cmha_fsdp2" in what:
            _check_cmha_fsdp2(rank, world)


def test_two_process_counts_and_trainer(tmp_path):
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path / "pg_init"), str(tmp_path / "out"),
                            ("counts", "trainer")), nprocs=WORLD, join=True)


def test_two_process_cmha_ddp_and_fsdp2(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    from torch.distributed import fsdp

    what = ("cmha_ddp", "cmha_fsdp2") if hasattr(fsdp, "fully_shard") else ("cmha_ddp",)
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path / "pg_init"), str(tmp_path / "out"), what),
             nprocs=WORLD, join=True)
