"""complexformer.models: ComplexFormerConfig / ComplexFormerForCausalLM as a Hugging Face model."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_testutil import TINY_VOCAB, left_padded_batch, pad_collate, padded_batch, ragged_examples, training_args  # noqa: E402

import complexformer  # noqa: E402
from complexformer.models import ComplexFormerConfig, ComplexFormerForCausalLM  # noqa: E402

V = TINY_VOCAB


def tiny(attention="cmha", dtype=torch.float64, seed=0, **kw):
    kw = dict(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   pad_token_id=0, initializer_range=0.2), **kw)
    cfg = ComplexFormerConfig(vocab_size=V, attention=attention, **kw)
    torch.manual_seed(seed)
    return ComplexFormerForCausalLM(cfg).to(dtype).eval()


def test_config_defaults_and_validation():
    cfg = ComplexFormerConfig(vocab_size=100)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (256, 4, 4)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 64 and cfg.intermediate_size == 704
    assert transformers.AutoConfig.for_model("complexformer", vocab_size=10).vocab_size == 10
    for bad, match in ((dict(attention="alibi"), "attention"), (dict(loss="focal"), "loss"),
                       (dict(num_key_value_heads=3), "num_key_value_heads"),
                       (dict(hidden_size=30, num_attention_heads=4), "divisible"),
                       (dict(hidden_size=36, num_attention_heads=4), "even")):
        with pytest.raises(ValueError, match=match):
            ComplexFormerConfig(vocab_size=10, **bad)


def test_one_field_changes_the_attention():
    """cmha and rope differ exactly by delta/beta (2 * layers * heads * head_dim/2 parameters);
    rope and none have the same parameters and differ only in the frequencies."""
    counts = {a: sum(p.numel() for p in tiny(a).parameters()) for a in ("cmha", "rope", "none")}
    assert counts["cmha"] - counts["rope"] == 2 * 2 * 4 * 4
    assert counts["rope"] == counts["none"]
    cmha = tiny("cmha")
    names = [n for n, _ in cmha.named_parameters() if n.endswith((".delta", ".beta"))]
    assert len(names) == 4 and len(cmha.cmha_parameters()) == 4 and tiny("rope").cmha_parameters() == []


def test_rope_model_equals_llama_with_the_same_weights():
    """attention="rope" is a Llama: same names, same state dict, same logits."""
    lcfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                    tie_word_embeddings=True, pad_token_id=0)
    lcfg._attn_implementation = "sdpa"
    llama = transformers.LlamaForCausalLM(lcfg).double().eval()
    cf = ComplexFormerForCausalLM(ComplexFormerConfig(vocab_size=V, hidden_size=32, intermediate_size=96,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, attention="rope")).double().eval()
    missing, unexpected = cf.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and not missing
    ids, mask = padded_batch()
    with torch.no_grad():
        want, got = llama(ids, attention_mask=mask).logits, cf(ids, attention_mask=mask).logits
    keep = mask.bool()
    # Llama computes its rotation angles in float32 even in a float64 model: float32-level agreement
    err = (got[keep] - want[keep]).abs().max() / want[keep].abs().max()
    assert err < 1e-6


def test_none_has_no_positional_information():
    """Without positions one causal attention layer is a set function of the earlier tokens:
    permuting them leaves the last token's logits unchanged. With RoPE it does not."""
    ids = torch.randint(3, V, (1, 7))
    perm = torch.cat([torch.randperm(6), torch.tensor([6])])
    for attention, invariant in (("none", True), ("rope", False)):
        m = tiny(attention, num_hidden_layers=1)
        with torch.no_grad():
            a, b = m(ids).logits[:, -1], m(ids[:, perm]).logits[:, -1]
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12) == invariant, attention


@pytest.mark.parametrize("attention", ["cmha", "rope"])
def test_ce_loss_is_hf_shifted_cross_entropy(attention):
    m = tiny(attention)
    batch = pad_collate(ragged_examples())
    out = m(**batch)
    z = out.logits[:, :-1].reshape(-1, V)
    y = batch["labels"][:, 1:].reshape(-1)
    # HF's causal-LM loss works on float32 logits whatever the model dtype
    torch.testing.assert_close(out.loss, F.cross_entropy(z.float(), y, ignore_index=-100))


def test_pdl_loss_buffer_and_errors(tmp_path):
    m = tiny(loss="pdl")
    batch = pad_collate(ragged_examples())
    with pytest.raises(RuntimeError, match="set_pdl_weights"):
        m(**batch)
    counts = complexformer.token_counts(batch["labels"][:, 1:], V)
    w = complexformer.pdl_weights(counts, alpha=1.0)
    m.set_pdl_counts(counts)  # config.pdl_alpha = 1.0
    assert torch.equal(m.pdl_weights, w.double())
    out = m(**batch)
    z = out.logits[:, :-1].reshape(-1, V)
    y = batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    ww = w.double()[y[keep]]
    want = (ww * F.cross_entropy(z[keep], y[keep], reduction="none")).sum() / ww.sum()
    torch.testing.assert_close(out.loss, want)
    with pytest.raises(ValueError, match="loss='ce'"):
        tiny().set_pdl_weights(w)
    with pytest.raises(ValueError, match="shape"):
        m.set_pdl_weights(w[:-1])
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert half.pdl_weights.dtype == torch.float32 and torch.equal(half.pdl_weights, w)  # never rounded to 8 bits
    # the weights are saved with the model
    m.save_pretrained(tmp_path)
    r = ComplexFormerForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert torch.equal(r.pdl_weights, m.pdl_weights)
    torch.testing.assert_close(r(**batch).loss, out.loss)


@pytest.mark.parametrize("attention", ["cmha", "rope", "none"])
def test_generate_cache_and_left_padding(attention):
    m = tiny(attention)
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = m.generate(ids, **kw)
    assert torch.equal(cached, m.generate(ids, use_cache=False, **kw))
    # a left-padded row generates what it generates alone, unpadded
    row = 1
    n_pad = int((mask[row] == 0).sum())
    alone = m.generate(ids[row:row + 1, n_pad:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached[row, n_pad:], alone[0])
    torch.manual_seed(3)
    s1 = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    torch.manual_seed(3)
    s2 = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0, use_cache=False)
    assert torch.equal(s1, s2)


def test_save_load_auto_class(tmp_path):
    m = tiny()
    ids, mask = padded_batch()
    with torch.no_grad():
        want = m(ids, attention_mask=mask).logits
    m.save_pretrained(tmp_path)
    r, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                 dtype=torch.float64)
    assert isinstance(r, ComplexFormerForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(r.eval()(ids, attention_mask=mask).logits, want)


def test_gradient_checkpointing_same_gradients():
    m = tiny().train()
    batch = pad_collate(ragged_examples())
    m(**batch).loss.backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    m(**batch).loss.backward()
    for a, p in zip(ref, m.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-10, atol=1e-12)


def test_trainer_step(tmp_path):
    from transformers import Trainer

    m = tiny().train()
    before = copy.deepcopy(m)
    trainer = Trainer(model=m, args=training_args(tmp_path, batch=4, accum=2, lr=0.1),
                      train_dataset=ragged_examples(), data_collator=pad_collate)
    trainer.train()
    moved = {n for (n, a), b in zip(before.named_parameters(), m.parameters()) if not torch.equal(a, b)}
    assert {"model.layers.0.self_attn.delta", "model.layers.1.self_attn.beta", "lm_head.weight"} <= moved or \
        {"model.layers.0.self_attn.delta", "model.layers.1.self_attn.beta", "model.embed_tokens.weight"} <= moved


@pytest.mark.parametrize("loss", ["ce", "pdl"])
def test_trainer_gradient_accumulation_normalises_the_loss(tmp_path, loss):
    """Plain Trainer, 2 micro-batches of 4: CE is the token mean of the whole window (HF's
    num_items_in_batch); loss="pdl" is the mean of the micro-batch PDL means, never k times too
    large. (PDLTrainer gives the exact window PDL mean: tests/test_hf.py.)"""
    from transformers import Trainer

    examples = ragged_examples()
    m = tiny(loss=loss).train()
    if loss == "pdl":
        m.set_pdl_weights(complexformer.pdl_weights(complexformer.token_counts(
            pad_collate(examples)["labels"][:, 1:], V)))
    ref = copy.deepcopy(m)
    lr = 0.5
    class InOrder(Trainer):  # the micro-batches in dataset order, so the reference can replay them
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=m, args=training_args(tmp_path, batch=4, accum=2, lr=lr), train_dataset=examples,
                      data_collator=pad_collate)
    trainer.train()
    micro = [pad_collate(examples[:4]), pad_collate(examples[4:])]
    if loss == "ce":
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = sum(ref(**b).loss * int((b["labels"][:, 1:] != -100).sum()) for b in micro) / n
    else:
        total = sum(ref(**b).loss for b in micro) / 2
    total.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    m = tiny(dtype=torch.float32, num_hidden_layers=1)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = m(ids, attention_mask=mask, use_cache=False).logits
        compiled = torch.compile(m)
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pdl_trainer_fused_linear_equals_unfused(tmp_path):
    """PDLTrainer(use_fused_linear=True) reads hidden_states[-1] (the LM head's input) and the head
    weight: the step equals the one through materialised logits."""
    from complexformer.hf import PDLTrainer

    examples = ragged_examples()
    w = complexformer.pdl_weights(complexformer.token_counts(pad_collate(examples)["labels"][:, 1:], V))
    models = []
    for fused in (False, True):
        m = tiny().train()
        PDLTrainer(model=m, args=training_args(tmp_path, batch=4, accum=2, lr=0.5), train_dataset=examples,
                   data_collator=pad_collate, pdl_weights=w, use_fused_linear=fused).train()
        models.append(m)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert not torch.equal(models[0].model.layers[0].self_attn.delta, tiny().model.layers[0].self_attn.delta)


def test_save_reload_save_reload(tmp_path):
    """Continue-finetuning loop: a reloaded model saves and reloads again, logits identical; a
    bfloat16 cast keeps the angles float32 (trainable), through save and load too."""
    m = tiny()
    ids, mask = padded_batch()
    with torch.no_grad():
        want = m(ids, attention_mask=mask).logits
    for step in ("first", "second"):
        m.save_pretrained(tmp_path / step)
        m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / step, dtype=torch.float64).eval()
        with torch.no_grad():
            assert torch.equal(m(ids, attention_mask=mask).logits, want), step
    b = m.to(torch.bfloat16)
    assert b.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in b.cmha_parameters()} == {torch.float32}
    b.save_pretrained(tmp_path / "bf16")
    r = ComplexFormerForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in r.cmha_parameters()} == {torch.float32}


def test_output_attentions_raises():
    with pytest.raises(NotImplementedError, match="output_attentions"):
        tiny()(torch.tensor([[3, 4, 5]]), output_attentions=True)


def test_compile_fullgraph_with_padding_mask():
    """fullgraph capture (dynamo, eager backend: quick) with a padding mask: no graph break."""
    m = tiny(dtype=torch.float32)
    ids, mask = padded_batch()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        want = m(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_peft_adapter_with_trained_angles_round_trip(tmp_path):
    """Under LoRA with trainable angles, PeftModel.save_pretrained warns that delta / beta are not in
    the adapter; save_cmha_angles / load_cmha_angles carry them (identical logits)."""
    peft = pytest.importorskip("peft")
    from complexformer.hf import load_cmha_angles, save_cmha_angles

    def lora():
        torch.manual_seed(3)
        m = peft.get_peft_model(tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        for p in m.cmha_parameters():
            p.requires_grad_(True)
        return m

    m = lora()
    with torch.no_grad():
        for p in m.cmha_parameters():
            p.add_(0.1)
    ids, mask = padded_batch()
    with pytest.warns(UserWarning, match="CMHA angles"):
        m.save_pretrained(tmp_path)
    save_cmha_angles(m, tmp_path)
    r = peft.PeftModel.from_pretrained(tiny(), tmp_path)
    load_cmha_angles(r, tmp_path)
    with torch.no_grad():
        assert torch.equal(r(ids, attention_mask=mask).logits, m(ids, attention_mask=mask).logits)
