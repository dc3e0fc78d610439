"""complexformer.hf under torch.distributed: 2 CPU processes (gloo), spawned by the test.

Checks that label_token_counts all-reduces to the single-process counts over the union, and that a
2-process PDLTrainer (DDP, gradient accumulation 2, batch 2 per process) takes the same step as one
process on the whole batch of 8 (also with a model patched by apply_fused_pdl), while a
per-process normaliser does not.
"""
import os
import socket
import traceback

import pytest
import torch

pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _check_trainer(rank, world, out_dir):
    from hf_testutil import (
        TINY_VOCAB, hand_counts, hand_pdl_step, max_param_diff, pad_collate, ragged_examples, tiny_gpt2,
        training_args,
    )

    from complexformer import pdl as _pdl
    from complexformer.hf import PDLTrainer, _WindowNormalizer, apply_fused_pdl

    lr = 0.5
    examples = ragged_examples()  # 8 ragged sequences: 2 processes x 2 micro-batches x 2
    weights = _pdl.pdl_weights(hand_counts(examples, TINY_VOCAB), alpha=1.0)
    model = tiny_gpt2()
    ref = hand_pdl_step(model, examples, weights, lr)

    class LocalNormaliser(PDLTrainer):  # each process divides by its own weight sum: not exact
        def get_batch_samples(self, it, n, device):
            batches = [b for b in (next(it, None) for _ in range(n)) if b is not None]
            return batches, _WindowNormalizer(self.pdl_weight_sum(batches, device), 1)

    results = {}
    for name, cls in (("exact", PDLTrainer), ("local", LocalNormaliser), ("fused", PDLTrainer)):
        # "fused": a model patched by apply_fused_pdl (fused LM head + loss, no logits)
        trained = apply_fused_pdl(tiny_gpt2()) if name == "fused" else tiny_gpt2()
        trainer = cls(model=trained, args=training_args(out_dir, batch=2, accum=2, lr=lr),
                      train_dataset=examples, data_collator=pad_collate, pdl_weights=weights)
        assert trainer.args.world_size == world
        trainer.train()
        results[name] = max_param_diff(trained, ref)
    assert results["exact"] < 1e-12 and results["fused"] < 1e-12, f"rank {rank}: {results}"
    assert results["local"] > 1e-4, f"rank {rank}: {results}"


def _worker(rank, world, port, init_file, out_dir, what):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if "counts" in what:
            _check_counts(rank, world)
        if "trainer" in what:
            _check_trainer(rank, world, out_dir)
        # no rank tears the group down while the other still has collectives in flight (gloo then
        # aborts the process with "terminate called without an active exception")
        dist.barrier()
    except BaseException:
        # make the failing rank's traceback readable in the parent's report
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from None
    finally:
        dist.destroy_process_group()


def test_two_process_counts_and_trainer(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path / "pg_init"), str(tmp_path / "out"),
                            ("counts", "trainer")), nprocs=WORLD, join=True)
