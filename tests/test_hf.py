"""complexformer.hf: label_token_counts and PDLTrainer against hand-written float64 references."""
import copy
import importlib.util

import pytest
import torch

from hf_testutil import (  # noqa: E402
    TINY_VOCAB, hand_counts, hand_pdl_step, max_param_diff, pad_collate,
    ragged_examples, tiny_gpt2, training_args,
)

import complexformer  # noqa: E402
from complexformer import pdl as _pdl  # noqa: E402
from complexformer.hf import PDLTrainer, label_token_counts  # noqa: E402


LR = 0.5
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")


@pytest.fixture(scope="module")
def data():
    examples = ragged_examples()
    counts = hand_counts(examples, TINY_VOCAB)
    weights = _pdl.pdl_weights(counts, alpha=1.0)
    return examples, weights


# ---- label_token_counts -----------------------------------------------------------------------

def test_counts_list_of_dicts_match_hand_count(data):
    examples, _ = data
    got = label_token_counts(examples, TINY_VOCAB, progress=True)
    assert got.dtype == torch.int64 and got.shape == (TINY_VOCAB,)
    assert torch.equal(got, hand_counts(examples, TINY_VOCAB))
    # the shift drops exactly the first label of every sequence (masked ones included)
    unshifted = label_token_counts(examples, TINY_VOCAB, shift=False, progress=False)
    assert torch.equal(unshifted, hand_counts(examples, TINY_VOCAB, shift=False))
    firsts = torch.zeros(TINY_VOCAB, dtype=torch.int64)
    for ex in examples:
        if ex["labels"][0] != -100:
            firsts[ex["labels"][0]] += 1
    assert torch.equal(unshifted - got, firsts) and firsts.sum() > 0


def test_counts_all_input_kinds_agree(data):
    examples, _ = data
    want = hand_counts(examples, TINY_VOCAB)
    seqs = [ex["labels"] for ex in examples]
    assert torch.equal(label_token_counts(seqs, TINY_VOCAB, progress=False), want)
    tensors = [torch.tensor(s) for s in seqs]
    assert torch.equal(label_token_counts(tensors, TINY_VOCAB, batch_size=2, progress=False), want)
    # a DataLoader of padded batches: padding is -100 and the shift is along the last dim
    loader = torch.utils.data.DataLoader(examples, batch_size=3, collate_fn=pad_collate)
    assert torch.equal(label_token_counts(loader, TINY_VOCAB, progress=False), want)
    # a generator of plain (B, T) tensors, and one padded (N, T) tensor
    padded = pad_collate(examples)["labels"]
    assert torch.equal(label_token_counts((b for b in padded.split(3)), TINY_VOCAB, progress=False), want)
    assert torch.equal(label_token_counts(padded, TINY_VOCAB, progress=False), want)
    # another ignore_index
    shifted5 = [[5 if t == -100 else t for t in s] for s in seqs]
    assert torch.equal(label_token_counts(shifted5, TINY_VOCAB, ignore_index=5, progress=False),
                       hand_counts(shifted5, TINY_VOCAB, ignore_index=5))


def test_counts_hf_dataset(data):
    examples, _ = data
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(examples)
    assert torch.equal(label_token_counts(ds, TINY_VOCAB, batch_size=3, progress=False),
                       hand_counts(examples, TINY_VOCAB))
    # another column; a torch-formatted dataset gives tensors instead of lists
    ids_want = hand_counts(examples, TINY_VOCAB, key="input_ids")
    assert torch.equal(label_token_counts(ds, TINY_VOCAB, label_column="input_ids", progress=False), ids_want)
    assert torch.equal(label_token_counts(ds.with_format("torch"), TINY_VOCAB, label_column="input_ids",
                                          batch_size=2, progress=False), ids_want)
    with pytest.raises(KeyError, match="label_column"):
        label_token_counts(ds.remove_columns("labels"), TINY_VOCAB, progress=False)


def test_counts_reject_bad_input(data):
    examples, _ = data
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        label_token_counts(examples, TINY_VOCAB - 10, progress=False)
    with pytest.raises(ValueError, match="negative label id"):
        label_token_counts([[1, 2, -3]], TINY_VOCAB, progress=False)
    with pytest.raises(TypeError, match="integers"):
        label_token_counts([torch.tensor([1.0, 2.0])], TINY_VOCAB, progress=False)
    with pytest.raises(KeyError, match="label_column"):
        label_token_counts([{"input_ids": [1, 2]}], TINY_VOCAB, progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        label_token_counts(examples, 0)
    # the id equal to vocab_size is out of range too (off-by-one check); the shift can hide it
    assert label_token_counts([[TINY_VOCAB, 1]], TINY_VOCAB, progress=False).sum() == 1
    with pytest.raises(ValueError, match=f"label id {TINY_VOCAB} >="):
        label_token_counts([[1, TINY_VOCAB]], TINY_VOCAB, progress=False)
    assert label_token_counts([], TINY_VOCAB, progress=False).sum() == 0


# ---- PDLTrainer ---------------------------------------------------------------------------------

def _train(tmp_path, model, examples, weights, *, batch, accum, cls=PDLTrainer, fused=False, **kw):
    model = copy.deepcopy(model)
    trainer = cls(model=model, args=training_args(tmp_path, batch=batch, accum=accum, lr=LR, **kw),
                  train_dataset=examples, data_collator=pad_collate, pdl_weights=weights,
                  use_fused_linear=fused)
    out = trainer.train()
    return model, out, trainer


def _hand_loss(model, examples, weights, label_smoothing=0.0):
    batch = pad_collate(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
        weight=weights.to(logits.dtype), label_smoothing=label_smoothing).item()


@needs_transformers
def test_one_step_equals_hand_written_step(tmp_path, data):
    examples, weights = data
    model = tiny_gpt2()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    trained, out, _ = _train(tmp_path, model, examples, weights, batch=8, accum=1)
    ref = hand_pdl_step(model, examples, weights, LR)
    assert max_param_diff(model, ref) > 1e-3  # the step moved the parameters
    assert max_param_diff(trained, ref) < 1e-12
    assert out.training_loss == pytest.approx(_hand_loss(model, examples, weights), rel=1e-6)  # the Trainer sums logged losses in float32
    assert seen and all("labels" not in kw for kw in seen)  # the model never computes its own CE


@needs_transformers
def test_gradient_accumulation_is_exact(tmp_path, data):
    """2 x 4 accumulation == one batch of 8, with ragged sequences whose micro-batches have very
    different weight sums. Averaging per-micro-batch means, or normalising by the token count,
    gives a visibly different step (so this test can fail)."""
    examples, weights = data
    model = tiny_gpt2()
    ref = hand_pdl_step(model, examples, weights, LR)
    acc, out, _ = _train(tmp_path, model, examples, weights, batch=2, accum=4)
    assert max_param_diff(acc, ref) < 1e-12
    assert out.training_loss == pytest.approx(_hand_loss(model, examples, weights), rel=1e-6)  # the Trainer sums logged losses in float32

    class PerMicroBatchMean(PDLTrainer):  # what a plain compute_loss override does
        def get_batch_samples(self, it, n, device):
            return [b for b in (next(it, None) for _ in range(n)) if b is not None], None

    naive, _, _ = _train(tmp_path, model, examples, weights, batch=2, accum=4, cls=PerMicroBatchMean)
    assert max_param_diff(naive, ref) > 1e-4
    tokens = hand_pdl_step(model, examples, weights, LR, normalize="tokens")
    assert max_param_diff(tokens, ref) > 1e-4


@needs_transformers
def test_fused_linear_path_is_exact_too(tmp_path, data):
    """use_fused_linear=True (fused_linear_pdl_loss on the final hidden states and the tied LM
    head) takes the same step as the hand-written one, under accumulation."""
    examples, weights = data
    model = tiny_gpt2()
    ref = hand_pdl_step(model, examples, weights, LR)
    fused, out, _ = _train(tmp_path, model, examples, weights, batch=2, accum=4, fused=True)
    assert max_param_diff(fused, ref) < 1e-12
    assert out.training_loss == pytest.approx(_hand_loss(model, examples, weights), rel=1e-6)
    # an LM head with a bias: the fused path takes its gradient too
    biased = tiny_gpt2()
    biased.lm_head = torch.nn.Linear(32, TINY_VOCAB, bias=True, dtype=torch.float64)
    unfused_b, _, _ = _train(tmp_path, biased, examples, weights, batch=2, accum=4)
    fused_b, _, _ = _train(tmp_path, biased, examples, weights, batch=2, accum=4, fused=True)
    assert max_param_diff(unfused_b, biased) > 1e-3 and max_param_diff(fused_b, unfused_b) < 1e-12
    head = biased.get_output_embeddings()
    biased.get_output_embeddings = lambda: torch.nn.Sequential(head)  # not an nn.Linear
    with pytest.raises(NotImplementedError, match="nn.Linear output layer"):
        PDLTrainer(model=biased, args=training_args(tmp_path, batch=2, accum=1, lr=LR), train_dataset=examples,
                   pdl_weights=weights, use_fused_linear=True)


@needs_transformers
@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_trainer_on_cuda_float32(tmp_path, data, fused):
    """On the GPU (CUDA PDL kernels), float32, 2 x 4 accumulation: the step matches the float64
    hand-written CPU step to float32 rounding (on CPU this is ~6e-8; a per-micro-batch mean is
    off by ~0.1)."""
    examples, weights = data
    model = tiny_gpt2()
    ref = hand_pdl_step(model, examples, weights, LR)
    trained = copy.deepcopy(model).float()
    trainer = PDLTrainer(model=trained, args=training_args(tmp_path, batch=2, accum=4, lr=LR, use_cpu=False),
                         train_dataset=examples, data_collator=pad_collate, pdl_weights=weights,
                         use_fused_linear=fused)
    assert trainer.args.device.type == "cuda"
    out = trainer.train()
    assert next(trained.parameters()).is_cuda
    assert max_param_diff(trained.double().cpu(), ref) < 1e-5
    assert out.training_loss == pytest.approx(_hand_loss(model, examples, weights), rel=1e-5)


@needs_transformers
def test_label_smoothing_and_uneven_last_window(tmp_path, data):
    """label_smoothing_factor goes into pdl_loss; a window of 3 micro-batches of unequal size
    (7 examples, batch 3: 3 + 3 + 1) still equals the big batch."""
    examples, _ = data
    examples = examples[:7]
    # smoothing weights every class by its w_c: clip the unseen tokens' 1e7 (the docs say why)
    weights = _pdl.pdl_weights(hand_counts(examples, TINY_VOCAB), alpha=1.0, max_weight=10.0)
    model = tiny_gpt2()
    acc, out, _ = _train(tmp_path, model, examples, weights, batch=3, accum=3, label_smoothing_factor=0.1)
    ref = copy.deepcopy(model)
    batch = pad_collate(examples)
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, TINY_VOCAB), batch["labels"][:, 1:].reshape(-1),
        weight=weights.to(logits.dtype), label_smoothing=0.1)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    assert max_param_diff(acc, ref) < 1e-12
    assert out.training_loss == pytest.approx(loss.item(), rel=1e-6)  # the Trainer sums logged losses in float32


@needs_transformers
def test_shift_labels_from_the_collator_and_empty_window(tmp_path, data):
    """A collator that emits already-shifted ``shift_labels`` (padding-free style) gives the same
    step; a window whose targets are all ignored trains on loss 0 (no NaN, no update)."""
    examples, weights = data
    model = tiny_gpt2()

    def shifted_collate(features):
        b = pad_collate(features)
        labels = b.pop("labels")
        b["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        return b

    trained = copy.deepcopy(model)
    trainer = PDLTrainer(model=trained, args=training_args(tmp_path, batch=4, accum=2, lr=LR),
                         train_dataset=examples, data_collator=shifted_collate, pdl_weights=weights)
    trainer.train()
    assert max_param_diff(trained, hand_pdl_step(model, examples, weights, LR)) < 1e-12

    masked = [{"input_ids": ex["input_ids"], "labels": [-100] * len(ex["labels"])} for ex in examples]
    still, out, _ = _train(tmp_path, model, masked, weights, batch=2, accum=4)
    assert out.training_loss == 0.0
    assert max_param_diff(still, model) == 0.0


@needs_transformers
def test_evaluate_reports_pdl_mean(tmp_path, data):
    examples, weights = data
    model = tiny_gpt2()
    trainer = PDLTrainer(model=model, args=training_args(tmp_path, batch=8, accum=1, lr=LR, per_device_eval_batch_size=8),
                         eval_dataset=examples, data_collator=pad_collate, pdl_weights=weights)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(_hand_loss(model, examples, weights), rel=1e-10)


@needs_transformers
def test_trainer_rejects_bad_setup(tmp_path, data):
    examples, weights = data
    model = tiny_gpt2()
    args = training_args(tmp_path, batch=8, accum=1, lr=LR)
    with pytest.raises(ValueError, match="outputs 72 logits"):
        PDLTrainer(model=model, args=args, train_dataset=examples, pdl_weights=weights[:-1])
    with pytest.raises(ValueError, match="1-D float"):
        PDLTrainer(model=model, args=args, train_dataset=examples, pdl_weights=torch.ones(TINY_VOCAB, dtype=torch.long))
    with pytest.raises(ValueError, match="compute_loss_func"):
        PDLTrainer(model=model, args=args, train_dataset=examples, pdl_weights=weights,
                   compute_loss_func=lambda *a, **k: 0)
    bad = [dict(ex) for ex in examples]
    bad[3] = {"input_ids": [1, 2, 3], "labels": [1, 2, TINY_VOCAB + 5]}
    trainer = PDLTrainer(model=model, args=args, train_dataset=bad, data_collator=pad_collate, pdl_weights=weights)
    with pytest.raises(ValueError, match="len\\(pdl_weights\\)"):
        trainer.train()


def test_public_names():
    import complexformer.hf as hf

    assert set(hf.__all__) == {"PDLTrainer", "label_token_counts", "convert_to_cmha", "load_cmha", "cmha_parameters",
                               "cmha_model_class", "CMHAAttention", "ATTN_IMPLEMENTATION", "apply_fused_pdl",
                               "save_cmha_angles", "load_cmha_angles", "set_cmha_mode", "cmha_mode", "ComplexFormerConfig",
                               "ComplexFormerForCausalLM", "ComplexFormerModel"}
    assert callable(hf.apply_fused_pdl)
    if importlib.util.find_spec("transformers") is not None:
        assert all(getattr(hf, name) is not None for name in hf.__all__)
    assert complexformer.pdl_loss is not None
