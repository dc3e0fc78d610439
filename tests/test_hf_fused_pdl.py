"""complexformer.hf.apply_fused_pdl: a patched Llama / Mistral / Qwen2 / GPT-2 gives the model's
own loss and gradients (float64) without building the logits, PDL weights give the weighted
loss, PDLTrainer and the plain Trainer take the same step as unpatched models (gradient
accumulation), and unsupported models raise."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_testutil import (  # noqa: E402
    TINY_VOCAB, hand_counts, hand_pdl_step, max_param_diff, pad_collate, ragged_examples, tiny_gpt2,
    training_args,
)

from complexformer import pdl as _pdl  # noqa: E402
from complexformer.hf import PDLTrainer, apply_fused_pdl  # noqa: E402
from complexformer.hf.fused_pdl import is_fused_pdl  # noqa: E402

LR = 0.5


def tiny(family, seed=0):
    import transformers

    if family == "gpt2":
        return tiny_gpt2(seed=seed)
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).to(torch.float64)


@pytest.fixture(scope="module")
def data():
    examples = ragged_examples()
    weights = _pdl.pdl_weights(hand_counts(examples, TINY_VOCAB), alpha=1.0)
    return examples, weights


def loss_and_grads(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, **kw)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters()]


def own_loss_and_grads(model, batch, num_items_in_batch=None):
    """The models' own causal-LM loss (transformers' ForCausalLMLoss), in float64: transformers
    itself casts the logits to float32 first."""
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    z = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    y = batch["labels"][:, 1:].reshape(-1)
    if num_items_in_batch is None:
        loss = F.cross_entropy(z, y)
    else:
        loss = F.cross_entropy(z, y, reduction="sum") / num_items_in_batch
    loss.backward()
    out["loss"] = loss
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_patched_forward_equals_the_models_own_loss(family, data):
    examples, weights = data
    batch = pad_collate(examples[:5])
    model = tiny(family)
    ref, ref_g = own_loss_and_grads(model, batch)
    ref_items, ref_items_g = own_loss_and_grads(model, batch, num_items_in_batch=torch.tensor(9))
    # the model's own loss, to float32 (transformers computes it from float32 logits)
    torch.testing.assert_close(model(**batch).loss.double(), ref.loss, rtol=1e-6, atol=1e-6)
    patched = apply_fused_pdl(copy.deepcopy(model))
    assert is_fused_pdl(patched) and not is_fused_pdl(model)
    out, g = loss_and_grads(patched, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # what the output holds instead of the logits: the last position's only
    B, T = batch["input_ids"].shape
    assert out.logits.shape == (B, 1, TINY_VOCAB) and out.hidden_states is None
    torch.testing.assert_close(out.logits, ref.logits[:, -1:])
    # num_items_in_batch (transformers.Trainer under gradient accumulation) is the denominator
    out, g = loss_and_grads(patched, batch, num_items_in_batch=torch.tensor(9))
    torch.testing.assert_close(out.loss, ref_items.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_items_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # without labels: the original forward (full logits), unchanged
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)
    # asked-for hidden states are returned; already-shifted labels give the same loss
    out = patched(**batch, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    labels = batch.pop("labels")
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    torch.testing.assert_close(patched(**batch, shift_labels=shifted).loss, ref.loss, rtol=1e-12, atol=1e-12)
    # the Trainer reads the original signature; a deep copy runs on its own parameters
    assert {"input_ids", "labels", "attention_mask"} <= set(inspect.signature(patched.forward).parameters)
    clone = copy.deepcopy(patched)
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(2)
    a, b = clone(**batch, labels=labels).loss, patched(**batch, labels=labels).loss
    torch.testing.assert_close(b, ref.loss, rtol=1e-12, atol=1e-12)
    assert is_fused_pdl(clone) and abs(a.item() - b.item()) > 1e-3
    # positional arguments still work
    torch.testing.assert_close(patched(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss,
                               ref.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pdl_weights_and_label_smoothing(family, data):
    examples, weights = data
    weights = weights.clamp(max=10.0)
    batch = pad_collate(examples)
    model = tiny(family)
    patched = apply_fused_pdl(copy.deepcopy(model), weights, label_smoothing=0.1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, TINY_VOCAB), batch["labels"][:, 1:].reshape(-1),
                          weight=weights.double(), label_smoothing=0.1)
    torch.testing.assert_close(patched(**batch).loss, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        patched(**batch, num_items_in_batch=torch.tensor(5))


def test_model_configured_for_pdl_keeps_its_weights(data):
    """A model whose config says loss="pdl" and holds a pdl_weights buffer (as
    ComplexFormerForCausalLM does): weights=None means that buffer, read at every call."""
    examples, weights = data
    batch = pad_collate(examples)
    model = tiny("llama")
    model.config.loss = "pdl"
    model.register_buffer("pdl_weights", torch.full((TINY_VOCAB,), float("nan")))
    patched = apply_fused_pdl(model)
    with pytest.raises(ValueError, match="weights: class weights must be finite"):
        patched(**batch)
    model.pdl_weights.copy_(weights)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, TINY_VOCAB), batch["labels"][:, 1:].reshape(-1),
                          weight=weights.double())
    torch.testing.assert_close(patched(**batch).loss, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        patched(**batch, num_items_in_batch=torch.tensor(5))


def test_bias_head_and_autocast(data):
    examples, _ = data
    batch = pad_collate(examples[:4])
    model = tiny("llama")
    model.lm_head = torch.nn.Linear(32, TINY_VOCAB, bias=True, dtype=torch.float64)
    ref, ref_g = own_loss_and_grads(model, batch)
    patched = apply_fused_pdl(copy.deepcopy(model))
    out, g = loss_and_grads(patched, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # under autocast the head runs in the autocast dtype, like F.linear
    m32 = copy.deepcopy(model).float()
    p32 = apply_fused_pdl(copy.deepcopy(m32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = m32(**batch).loss, p32(**batch).loss
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_unsupported_models_raise(data):
    examples, weights = data
    model = tiny("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        apply_fused_pdl(model)
    model = tiny("llama")

    class Head(torch.nn.Module):  # not an nn.Linear
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    model.lm_head = Head(model.lm_head)
    with pytest.raises(NotImplementedError, match="nn.Linear output layer"):
        apply_fused_pdl(model)
    with pytest.raises(ValueError, match=r"weights: expected a float tensor of shape \(72,\)"):
        apply_fused_pdl(tiny("gpt2"), weights[:10])
    with pytest.raises(ValueError, match="weights: class weights must be finite and >= 0"):
        apply_fused_pdl(tiny("gpt2"), -weights)


def _train(tmp_path, model, examples, *, accum, cls=None, **kw):
    from transformers import Trainer

    cls = cls or Trainer
    trainer = cls(model=model, args=training_args(tmp_path, batch=8 // accum, accum=accum, lr=LR),
                  train_dataset=examples, data_collator=pad_collate, **kw)
    trainer.train()
    return model


def test_pdl_trainer_patched_equals_unpatched(tmp_path, data):
    """PDLTrainer with a patched model takes the fused path and the same step (float64, 2 x 4
    accumulation of ragged micro-batches) as the unpatched model and the hand-written step."""
    examples, weights = data
    model = tiny_gpt2()
    ref = hand_pdl_step(model, examples, weights, LR)
    plain = _train(tmp_path, copy.deepcopy(model), examples, accum=4, cls=PDLTrainer, pdl_weights=weights)
    calls = []
    patched = apply_fused_pdl(copy.deepcopy(model))
    patched.register_forward_hook(lambda m, a, kw, out: calls.append(out.logits.shape[1]), with_kwargs=True)
    _train(tmp_path, patched, examples, accum=4, cls=PDLTrainer, pdl_weights=weights)
    assert calls and all(t == 1 for t in calls)  # the logits were never built
    assert max_param_diff(plain, ref) < 1e-12
    assert max_param_diff(patched, ref) < 1e-12


def test_plain_trainer_patched_equals_unpatched(tmp_path, data):
    """transformers.Trainer (cross-entropy, num_items_in_batch under 2 x 4 accumulation): the
    patched model takes the model's own step (to float32: transformers' own loss casts the
    logits to float32; a per-micro-batch mean would be off by ~1e-3)."""
    examples, _ = data
    model = tiny("qwen2")
    plain = _train(tmp_path, copy.deepcopy(model), examples, accum=4)
    patched = _train(tmp_path, apply_fused_pdl(copy.deepcopy(model)), examples, accum=4)
    assert max_param_diff(plain, model) > 1e-3  # the step moved the parameters
    assert max_param_diff(patched, plain) < 1e-6


def tiny_moe(kind, seed=0):
    """A tiny MoE causal LM (4 experts, top 2) that asks for its router logits: its own loss adds
    router_aux_loss_coef * aux_loss (float32: transformers' grouped expert matmul takes no float64)."""
    import transformers

    kw = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, output_router_logits=True, router_aux_loss_coef=0.3)
    if kind == "mixtral":
        cfg, cls = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw), "MixtralForCausalLM"
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16, **kw)
        cls = "Qwen2MoeForCausalLM"
    else:
        cfg = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **kw)
        cls = "Qwen3MoeForCausalLM"
    torch.manual_seed(seed)
    return getattr(transformers, cls)(cfg)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_router_aux_loss_is_added_as_the_model_does(tmp_path, kind):
    """apply_fused_pdl and PDLTrainer (unit weights = cross-entropy; fused or not) give the MoE
    model's own loss, router load-balancing term included."""
    model = tiny_moe(kind).train()
    batch = pad_collate(ragged_examples()[:4])
    own = model(**batch)
    assert own.aux_loss is not None and float(own.aux_loss) > 0.5  # the term is large: dropping it shows
    patched = apply_fused_pdl(copy.deepcopy(model))
    torch.testing.assert_close(patched(**batch).loss, own.loss, rtol=1e-6, atol=1e-6)
    ones = torch.ones(TINY_VOCAB)
    for fused in (False, True):
        trainer = PDLTrainer(model=copy.deepcopy(model), args=training_args(tmp_path, batch=4, accum=1, lr=LR),
                             pdl_weights=ones, use_fused_linear=fused)
        torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)), own.loss, rtol=1e-6, atol=1e-6)


# ---- logit scales: Granite divides its logits by config.logits_scaling, Cohere multiplies them by
# logit_scale; the fused head applies the factor exactly ((c h) W^T). Powers of 2 and not.
SCALED = {"granite": ("Granite", "logits_scaling"), "granitemoe": ("GraniteMoe", "logits_scaling"),
          "cohere": ("Cohere", "logit_scale"), "cohere2": ("Cohere2", "logit_scale")}


def tiny_scaled(family, value, seed=0):
    import transformers

    cls, attr = SCALED[family]
    extra = {}
    if family == "granitemoe":  # with its router aux loss
        extra = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        **{attr: value}, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg)
    # float64 for the tight comparisons (GraniteMoE's expert matmul takes no float64)
    return model if family == "granitemoe" else model.to(torch.float64)


@pytest.mark.parametrize("family,value", [("granite", 4.0), ("granite", 3.0), ("cohere", 0.0625), ("cohere", 0.3)])
def test_logit_scale_is_folded_into_the_fused_head(family, value, data):
    examples, weights = data
    batch = pad_collate(examples[:5])
    model = tiny_scaled(family, value)
    ref, ref_g = own_loss_and_grads(model, batch)
    torch.testing.assert_close(model(**batch).loss.double(), ref.loss, rtol=1e-6, atol=1e-6)
    unscaled = copy.deepcopy(model)
    unscaled.config.logits_scaling, unscaled.logit_scale = 1.0, 1.0  # (whichever the family reads)
    assert abs(own_loss_and_grads(unscaled, batch)[0].loss.item() - ref.loss.item()) > 1e-2  # the scale matters
    patched = apply_fused_pdl(copy.deepcopy(model))
    out, g = loss_and_grads(patched, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.logits, ref.logits[:, -1:])  # the last position's logits, scaled
    ref_items, ref_items_g = own_loss_and_grads(model, batch, num_items_in_batch=torch.tensor(9))
    out, g = loss_and_grads(patched, batch, num_items_in_batch=torch.tensor(9))
    torch.testing.assert_close(out.loss, ref_items.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_items_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # PDL weights: the weighted cross-entropy of the model's own (scaled) logits
    weights = weights.clamp(max=10.0)
    pdl = apply_fused_pdl(copy.deepcopy(model), weights)
    want = F.cross_entropy(ref.logits[:, :-1].reshape(-1, TINY_VOCAB), batch["labels"][:, 1:].reshape(-1),
                           weight=weights.double())
    torch.testing.assert_close(pdl(**batch).loss, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_pdl_trainer_with_a_logit_scale(tmp_path, family, data):
    """PDLTrainer, fused (use_fused_linear=True, or a patched model), takes the step of the
    unfused PDLTrainer, which is the hand-written step on the model's own scaled logits (float64,
    2 x 4 accumulation; Cohere's LayerNorm computes in float32, hence its looser match)."""
    examples, weights = data
    model = tiny_scaled(family, {"granite": 4.0, "cohere": 0.0625}[family])
    ref = hand_pdl_step(model, examples, weights, LR)
    plain = _train(tmp_path, copy.deepcopy(model), examples, accum=4, cls=PDLTrainer, pdl_weights=weights)
    fused = _train(tmp_path, copy.deepcopy(model), examples, accum=4, cls=PDLTrainer, pdl_weights=weights,
                   use_fused_linear=True)
    patched = _train(tmp_path, apply_fused_pdl(copy.deepcopy(model)), examples, accum=4, cls=PDLTrainer,
                     pdl_weights=weights)
    assert max_param_diff(ref, model) > 1e-3
    assert max_param_diff(plain, ref) < (1e-9 if family == "cohere" else 1e-12)
    assert max_param_diff(fused, plain) < 1e-12 and max_param_diff(patched, plain) < 1e-12


@pytest.mark.parametrize("family", ["granitemoe", "cohere2"])
def test_logit_scale_other_families(tmp_path, family):
    """GraniteMoE (with its router aux loss) and Cohere2 fold their scale the same way (float32
    for GraniteMoE; transformers' own loss casts the logits to float32)."""
    model = tiny_scaled(family, {"granitemoe": 4.0, "cohere2": 0.0625}[family]).train()
    batch = pad_collate(ragged_examples()[:4])
    own = model(**batch).loss
    torch.testing.assert_close(apply_fused_pdl(copy.deepcopy(model))(**batch).loss.double(), own.double(),
                               rtol=1e-6, atol=1e-6)
    trainer = PDLTrainer(model=copy.deepcopy(model), args=training_args(tmp_path, batch=4, accum=1, lr=LR),
                         pdl_weights=torch.ones(TINY_VOCAB), use_fused_linear=True)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)).double(), own.double(),
                               rtol=1e-6, atol=1e-6)


def test_softcapping_and_unknown_scales_raise(tmp_path, data):
    """Gemma 2's final_logit_softcapping (a tanh: no linear head computes it) raises, naming the
    field; so does a logits_scaling in a family not known to divide by it (HyperCLOVA X multiplies)."""
    import transformers

    _, weights = data
    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, final_logit_softcapping=30.0,
                                                                      **common))
    with pytest.raises(NotImplementedError, match=r"final_logit_softcapping=30\.0"):
        apply_fused_pdl(gemma2)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        PDLTrainer(model=gemma2, args=training_args(tmp_path, batch=4, accum=1, lr=LR), pdl_weights=weights,
                   use_fused_linear=True)
    gemma2.config.final_logit_softcapping = None  # the neutral value: supported
    assert is_fused_pdl(apply_fused_pdl(gemma2))
    clova = transformers.HyperCLOVAXForCausalLM(transformers.HyperCLOVAXConfig(logits_scaling=2.0, **common))
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        apply_fused_pdl(clova)
    granite = tiny_scaled("granite", 0.0)
    with pytest.raises(ValueError, match="config.logits_scaling"):
        apply_fused_pdl(granite)
