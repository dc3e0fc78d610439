"""complexformer.hf.convert_to_cmha: converted Llama / Mistral / Qwen2 models against the originals.

Tiny random models (GQA 4/2 heads; Mistral with a sliding window shorter than the sequences; Qwen2
with q/k/v biases), float32 on the CPU. At conversion delta = 1, beta = 0, so the converted model
must reproduce the original's logits to float32 noise, through padding, the KV cache and generate().
"""
import copy
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_testutil import (  # noqa: E402
    FAMILIES, TINY_VOCAB, hand_counts, left_padded_batch, pad_collate, padded_batch, ragged_examples, tiny_family,
    training_args,
)

from complexformer import pdl as _pdl  # noqa: E402
from complexformer.hf import (  # noqa: E402
    ATTN_IMPLEMENTATION, CMHAAttention, cmha_parameters, convert_to_cmha, load_cmha, load_cmha_angles,
    save_cmha_angles,
)

RTOL = 1e-5
cmha_attention_module = importlib.import_module("complexformer.hf.cmha_attention")


def _rel_err(a, b, keep=None):
    if keep is not None:
        a, b = a[keep], b[keep]
    return ((a - b).abs().max() / a.abs().max()).item()


def _converted(model, **kw):
    return convert_to_cmha(copy.deepcopy(model), **kw).eval()


def _perturb_angles(model, scale=0.2, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cmha_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- exactness at conversion -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_equal_original_padded(family):
    model = tiny_family(family)
    conv = _converted(model)
    assert conv.config._attn_implementation == ATTN_IMPLEMENTATION
    attns = [m for m in conv.modules() if isinstance(m, CMHAAttention)]
    assert len(attns) == 2 and all(a.num_key_value_groups == 2 for a in attns)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = conv(ids, attention_mask=mask).logits
        # no mask at all: plain causal, the fused kernel without a padding mask
        want_full = model(ids).logits
        got_full = conv(ids).logits
    keep = mask.bool()
    assert _rel_err(want, got, keep) < RTOL
    assert _rel_err(want_full, got_full) < RTOL
    assert torch.isfinite(got).all()  # padding rows too: no NaN leaks out of masked rows


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_generate_matches_original_with_and_without_cache(family):
    model = tiny_family(family)
    conv = _converted(model)
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    want = model.generate(ids, **kw)
    cached = conv.generate(ids, **kw)
    uncached = conv.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, want.sequences)
    assert torch.equal(uncached.sequences, cached.sequences)
    # every step's logits, not just the argmax (a wrong key position can leave a tiny model's argmax alone)
    for a, b, c in zip(want.logits, cached.logits, uncached.logits):
        assert _rel_err(a, b) < RTOL and _rel_err(a, c) < RTOL
    # sampling draws from (float32-)equal distributions: the same tokens for the same seed
    samples = []
    for m in (model, conv):
        torch.manual_seed(11)
        samples.append(m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0,
                                  pad_token_id=0))
    assert torch.equal(samples[0], samples[1])


def test_qwen2_mixed_full_and_sliding_layers_generate():
    """Qwen2 with use_sliding_window: layer 0 full, layers 1-2 sliding (window 5), so the cache mixes
    full and sliding-window layers of different lengths; the recorded positions serve both."""
    model = tiny_family("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1, layers=3)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    conv = _converted(model)
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    want, cached, uncached = model.generate(ids, **kw), conv.generate(ids, **kw), conv.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, want.sequences) and torch.equal(uncached.sequences, want.sequences)
    for a, b in zip(want.logits, cached.logits):
        assert _rel_err(a, b) < RTOL


def test_beam_search_reorders_the_recorded_positions():
    """Beam search reorders the cache rows; the key positions travel with them (left padding makes
    the rows' positions differ)."""
    model = tiny_family("llama")
    conv = _converted(model)
    _perturb_angles(conv)
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(conv.generate(ids, **kw), conv.generate(ids, use_cache=False, **kw))
    plain = _converted(model)
    assert torch.equal(plain.generate(ids, **kw), model.generate(ids, **kw))


def test_incremental_decoding_with_learned_angles_matches_full_forward():
    """After training (delta != 1, beta != 0) the cache of raw keys still reproduces the full forward,
    for a left-padded batch decoded token by token through a DynamicCache."""
    from transformers import DynamicCache

    conv = _converted(tiny_family("llama", dtype=torch.float64))
    _perturb_angles(conv)
    ids, mask = padded_batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # left-padded and unpadded rows
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = conv(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = DynamicCache(config=conv.config)
        steps = [conv(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, ids.shape[1]):
            steps.append(conv(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                              cache=cache, use_cache=True).logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[keep], full[keep], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # attention factor != 1
])
def test_frequency_rescaling_rope_types_are_exact(rope):
    model = tiny_family("llama", rope_parameters={"rope_theta": 10000.0, **rope})
    rotary = model.model.rotary_emb
    assert rotary.rope_type == rope["rope_type"]
    if rope["rope_type"] == "yarn":
        assert rotary.attention_scaling != 1.0  # the case that needs the softmax-scale correction
    conv = _converted(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert _rel_err(model(ids, attention_mask=mask).logits, conv(ids, attention_mask=mask).logits,
                        mask.bool()) < RTOL


def test_masks_reach_the_fused_kernel_when_plain(monkeypatch):
    """A sliding window the sequence does not exceed is plain causal attention: the module gets the
    2-D padding mask (fused kernel); a window that binds keeps HF's 4-D mask."""
    calls = []
    orig = cmha_attention_module.attend
    monkeypatch.setattr(cmha_attention_module, "attend",
                        lambda *a, **kw: (kw["attn_mask"] is not None and calls.append(1)) or orig(*a, **kw))
    ids, mask = padded_batch()
    for window, masked in ((32, False), (6, True)):
        model = tiny_family("mistral", sliding_window=window)
        conv = _converted(model)
        calls.clear()
        with torch.no_grad():
            got = conv(ids, attention_mask=mask).logits
            assert _rel_err(model(ids, attention_mask=mask).logits, got, mask.bool()) < RTOL
        assert bool(calls) == masked, window


def test_packed_sequences_by_position_ids_are_exact():
    """position_ids restarting inside a row (packed sequences, no mask): HF builds a block mask."""
    model = tiny_family("qwen2")
    conv = _converted(model)
    ids = torch.randint(3, TINY_VOCAB, (1, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        assert _rel_err(model(ids, position_ids=pos).logits, conv(ids, position_ids=pos).logits) < RTOL


def test_base_model_and_eager_masks():
    """A base LlamaModel converts too; a model left on attn_implementation="eager" hands the module
    additive 4-D masks, which are served exactly as well."""
    model = tiny_family("llama").model
    conv = _converted(model)
    ids, mask = padded_batch()
    keep = mask.bool()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        assert _rel_err(want, conv(ids, attention_mask=mask).last_hidden_state, keep) < RTOL
        conv.config._attn_implementation = "eager"
        assert _rel_err(want, conv(ids, attention_mask=mask).last_hidden_state, keep) < RTOL


# ---- learned angles, save / load -----------------------------------------------------------------
def test_learnable_subset_and_parameter_names():
    conv = _converted(tiny_family("llama"), learnable=("beta",))
    names = [n for n, _ in conv.named_parameters() if n.endswith((".delta", ".beta"))]
    assert names == ["model.layers.0.self_attn.beta", "model.layers.1.self_attn.beta"]
    assert len(cmha_parameters(conv)) == 2
    attn = conv.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(attn, name), torch.nn.Linear)


def test_save_load_round_trip(tmp_path):
    conv = _converted(tiny_family("qwen2"))
    _perturb_angles(conv)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = conv(ids, attention_mask=mask).logits
    conv.save_pretrained(tmp_path)
    loaded, info = load_cmha(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert isinstance(loaded, transformers.Qwen2ForCausalLM)
    for a, b in zip(cmha_parameters(conv), cmha_parameters(loaded)):
        assert torch.equal(a, b)
    # generate works on the reloaded model, cache or not
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, **kw), loaded.generate(ids, use_cache=False, **kw))
    with pytest.raises(ValueError, match="no converted model"):
        tiny_family("llama").save_pretrained(tmp_path / "plain")
        load_cmha(tmp_path / "plain")


ROPE_TYPES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_save_reload_every_rope_type(tmp_path, family, rope):
    """load_cmha rebuilds the frequencies of every exact rope type under from_pretrained's meta-device
    init, and a reloaded model saves and reloads again (continue-finetuning loops): logits and the
    learned angles identical at every step."""
    conv = _converted(tiny_family(family, rope_parameters={"rope_theta": 10000.0, **ROPE_TYPES[rope]}))
    _perturb_angles(conv)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = conv(ids, attention_mask=mask).logits
    model = conv
    for step in ("first", "second"):
        model.save_pretrained(tmp_path / step)
        model = load_cmha(tmp_path / step).eval()
        assert type(model).__name__ == type(conv).__name__
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, want), step
        for a, b in zip(cmha_parameters(conv), cmha_parameters(model)):
            assert torch.equal(a, b)


# ---- PEFT: the learned angles beside the adapter ---------------------------------------------------
def _lora(model, peft):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(7)
    lora = peft.get_peft_model(model, config)
    for p in cmha_parameters(lora):  # PEFT freezes every non-LoRA parameter: train the angles too
        p.requires_grad_(True)
    return lora


def test_peft_adapter_round_trip_keeps_the_angles(tmp_path):
    """PeftModel.save_pretrained drops delta / beta (with a warning); save_cmha_angles beside the
    adapter and load_cmha_angles after PeftModel.from_pretrained restore the exact logits. Merging the
    adapter keeps them too: merge_and_unload + save_pretrained + load_cmha."""
    peft = pytest.importorskip("peft")
    base = tiny_family("llama")
    lora = _lora(_converted(base), peft)
    _perturb_angles(lora)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = lora(ids, attention_mask=mask).logits
    with pytest.warns(UserWarning, match="CMHA angles"):
        lora.save_pretrained(tmp_path / "adapter")
    save_cmha_angles(lora, tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(_converted(base), tmp_path / "adapter")
    with torch.no_grad():
        assert not torch.allclose(reloaded(ids, attention_mask=mask).logits, want)  # the angles matter
    load_cmha_angles(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, want)
    with pytest.raises(ValueError, match="missing"):
        load_cmha_angles(_converted(tiny_family("llama", layers=3)), tmp_path / "adapter")

    merged = lora.merge_and_unload()
    with torch.no_grad():
        want_merged = merged(ids, attention_mask=mask).logits
    assert _rel_err(want, want_merged) < RTOL
    merged.save_pretrained(tmp_path / "merged")
    loaded = load_cmha(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, want_merged)


def test_pdl_trainer_checkpoint_of_a_peft_model_resumes_the_angles(tmp_path):
    """A PDLTrainer checkpoint of a PEFT model holds the angles beside the adapter: two steps in one
    run equal one step, a checkpoint, and a resumed second step on a freshly converted base."""
    peft = pytest.importorskip("peft")
    from complexformer.hf import PDLTrainer

    examples = ragged_examples()
    weights = _pdl.pdl_weights(hand_counts(examples, TINY_VOCAB), alpha=1.0)
    base = tiny_family("llama")

    def train(out, **kw):
        model = _lora(_converted(base), peft).train()
        args = training_args(tmp_path / out, batch=4, accum=1, lr=0.5, max_steps=2, save_strategy="steps",
                             save_steps=1)
        PDLTrainer(model=model, args=args, train_dataset=examples, data_collator=pad_collate,
                   pdl_weights=weights).train(**kw)
        return model

    straight = train("straight")
    assert (tmp_path / "straight" / "checkpoint-1" / "cmha_angles.safetensors").is_file()
    resumed = train("resumed", resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    assert not torch.equal(cmha_parameters(straight)[0], torch.ones(4, 8))  # the angles trained
    for a, b in zip(cmha_parameters(straight), cmha_parameters(resumed)):
        assert torch.equal(a, b)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(straight.eval()(ids, attention_mask=mask).logits,
                           resumed.eval()(ids, attention_mask=mask).logits)


# ---- lost or silently wrong state ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a binding sliding window (4-D masks)
def test_output_attentions_returns_the_probabilities(family):
    model = tiny_family(family)
    conv = _converted(model)
    _perturb_angles(conv, scale=0.0)  # delta = 1, beta = 0: the original's probabilities
    model.config._attn_implementation = "eager"  # HF returns probabilities from eager attention
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True)
        got = conv(ids, attention_mask=mask, output_attentions=True)
        plain = conv(ids, attention_mask=mask).logits
    assert len(got.attentions) == len(want.attentions) == 2
    rows = mask.bool()[:, None, :, None]
    for a, b in zip(want.attentions, got.attentions):
        assert a.shape == b.shape
        torch.testing.assert_close(b.masked_fill(~rows, 0), a.masked_fill(~rows, 0), rtol=1e-5, atol=1e-6)
    keep = mask.bool()
    assert _rel_err(plain, got.logits, keep) < RTOL and _rel_err(want.logits, got.logits, keep) < RTOL


def test_converting_leaves_a_model_sharing_the_config_alone():
    model = tiny_family("llama")
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    conv = convert_to_cmha(model)
    assert twin.config._attn_implementation == "sdpa" and conv.config._attn_implementation == ATTN_IMPLEMENTATION
    assert not getattr(twin.config, "cmha_conversion", None)
    assert all(m.config is conv.config for m in conv.modules() if hasattr(m, "config"))
    ids, mask = padded_batch()
    with torch.no_grad():
        assert _rel_err(twin(ids, attention_mask=mask).logits, conv(ids, attention_mask=mask).logits,
                        mask.bool()) < RTOL


def test_compile_fullgraph_with_a_padding_mask():
    """No data-dependent branch in the mask hook: fullgraph tracing succeeds (dynamo with the eager
    backend: the graph capture is what is tested, not inductor) and gives the eager logits."""
    model = tiny_family("llama")
    conv = _converted(model)
    ids, mask = padded_batch()
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).logits
        assert _rel_err(model(ids, attention_mask=mask).logits, got, mask.bool()) < RTOL
    torch._dynamo.reset()


def test_bfloat16_cast_keeps_the_angles_trainable(tmp_path):
    """.to(bfloat16) casts everything but delta / beta, which stay float32 (a step of 1e-3 is not lost
    to rounding); the bf16 forward and backward run, and load_cmha(dtype=bfloat16) keeps them float32."""
    conv = _converted(tiny_family("llama")).to(torch.bfloat16)
    attn = conv.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in cmha_parameters(conv)} == {torch.float32}
    ids, mask = padded_batch()
    conv(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert attn.delta.grad is not None and attn.delta.grad.dtype == torch.float32
    with torch.no_grad():
        attn.delta.add_(1e-3)
    assert bool((attn.delta != 1).all())
    with torch.no_grad():  # the 4-D mask path (packed sequences) too
        assert conv(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]] * 3)).logits.dtype == torch.bfloat16
    conv.save_pretrained(tmp_path)
    loaded = load_cmha(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in cmha_parameters(loaded)} == {torch.float32}
    assert torch.equal(loaded.model.layers[0].self_attn.delta, attn.delta)


# ---- bad input -----------------------------------------------------------------------------------
def test_inconsistent_config_names_the_fields():
    model = tiny_family("llama")
    model.config.num_attention_heads = model.config.num_key_value_heads = 2  # the projections hold 4 / 2 heads
    with pytest.raises(ValueError, match=r"LlamaConfig.head_dim \(16\) \* num_attention_heads \(2\) = 32.*q_proj"):
        convert_to_cmha(model)

def test_unsupported_model_names_supported_ones():
    from hf_testutil import tiny_gpt2

    with pytest.raises(NotImplementedError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        convert_to_cmha(tiny_gpt2())


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope_parameters\['rope_type'\] = 'dynamic' cannot be reproduced"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 64}, r"rope_parameters\['rope_type'\] = 'longrope' cannot be reproduced"),
])
def test_non_reproducible_rope_types_raise(rope, match):
    model = tiny_family("llama", rope_parameters={"rope_theta": 10000.0, **rope})
    with pytest.raises(NotImplementedError, match=match):
        convert_to_cmha(model)


def test_bad_configs_and_masks_raise():
    model = tiny_family("llama")
    bad = copy.deepcopy(model)
    bad.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads \\(3\\) must divide num_attention_heads \\(4\\)"):
        convert_to_cmha(bad)
    drop = copy.deepcopy(model)
    drop.config.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="attention_dropout"):
        convert_to_cmha(drop)
    with pytest.raises(ValueError, match="learnable"):
        convert_to_cmha(copy.deepcopy(model), learnable=("freqs",))
    conv = _converted(model)
    with pytest.raises(ValueError, match="already converted"):
        convert_to_cmha(conv)
    ids, mask = padded_batch()
    attn = conv.model.layers[0].self_attn
    x = torch.randn(3, 11, 64)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=mask[:, :5].bool())  # 2-D of the wrong length
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=torch.ones(3, 11, 11, dtype=torch.bool))  # 3-D
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, attention_mask=torch.ones(3, 1, 11, 10, dtype=torch.bool))  # 4-D of the wrong key length
    with pytest.raises(ValueError, match="position_ids"):
        attn(x, position_ids=torch.arange(5)[None])


def test_static_cache_raises_clearly():
    conv = _converted(tiny_family("llama"))
    ids, mask = left_padded_batch()
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        conv.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


# ---- training --------------------------------------------------------------------------------
def _freeze_all_but_angles(model):
    for p in model.parameters():
        p.requires_grad_(False)
    for p in cmha_parameters(model):
        p.requires_grad_(True)


@pytest.mark.parametrize("trainer_kind", ["pdl", "plain"])
def test_trainer_learns_only_the_angles(tmp_path, trainer_kind):
    """Only delta/beta trainable: one SGD step with PDLTrainer (or the plain Trainer's CE) moves
    exactly them, by lr * their gradient (checked against a hand-computed gradient)."""
    from complexformer.hf import PDLTrainer
    from transformers import Trainer

    examples = ragged_examples()
    conv = _converted(tiny_family("llama", dtype=torch.float64))
    _freeze_all_but_angles(conv)
    conv.train()
    before = copy.deepcopy(conv)
    lr = 0.5
    args = training_args(tmp_path, batch=8, accum=1, lr=lr)
    if trainer_kind == "pdl":
        weights = _pdl.pdl_weights(hand_counts(examples, TINY_VOCAB), alpha=1.0)
        trainer = PDLTrainer(model=conv, args=args, train_dataset=examples, data_collator=pad_collate,
                             pdl_weights=weights)
    else:
        trainer = Trainer(model=conv, args=args, train_dataset=examples, data_collator=pad_collate)
    trainer.train()

    # reference gradient of the same loss on the whole batch
    batch = pad_collate(examples)
    logits = before(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z, y = logits[:, :-1].reshape(-1, TINY_VOCAB), batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    nll = torch.nn.functional.cross_entropy(z[keep], y[keep], reduction="none")
    if trainer_kind == "pdl":
        w = weights.double()[y[keep]]
        loss = (w * nll).sum() / w.sum()
    else:
        loss = nll.mean()
    loss.backward()
    moved = 0
    for (name, p0), p1 in zip(before.named_parameters(), conv.parameters()):
        if name.endswith((".delta", ".beta")):
            torch.testing.assert_close(p1, p0 - lr * p0.grad, rtol=1e-9, atol=1e-10)
            moved += int(p0.grad.abs().max() > 0)
        else:
            assert torch.equal(p0, p1), name
    assert moved == 4  # delta and beta of both layers got a gradient


def test_separate_learning_rate_for_the_angles(tmp_path):
    from transformers import Trainer

    conv = _converted(tiny_family("llama", dtype=torch.float64))
    conv.train()
    angles = cmha_parameters(conv)
    ids = {id(p) for p in angles}
    rest = [p for p in conv.parameters() if id(p) not in ids]
    opt = torch.optim.SGD([{"params": angles, "lr": 0.0}, {"params": rest, "lr": 0.1}])
    before = copy.deepcopy(conv)
    trainer = Trainer(model=conv, args=training_args(tmp_path, batch=8, accum=1, lr=0.1),
                      train_dataset=ragged_examples(), data_collator=pad_collate, optimizers=(opt, None))
    trainer.train()
    changed = {n: not torch.equal(p0, p1) for (n, p0), p1 in zip(before.named_parameters(), conv.parameters())}
    assert not any(v for n, v in changed.items() if n.endswith((".delta", ".beta")))
    assert changed["model.layers.0.self_attn.q_proj.weight"]


def test_lora_with_learnable_angles(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Trainer

    conv = _converted(tiny_family("mistral"))
    lora = peft.get_peft_model(conv, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                                                                                       "v_proj", "o_proj"]))
    for p in cmha_parameters(lora):  # PEFT freezes every non-LoRA parameter: unfreeze the angles
        p.requires_grad_(True)
    attn = lora.base_model.model.model.layers[0].self_attn
    assert isinstance(attn, CMHAAttention) and hasattr(attn.q_proj, "lora_A")
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.endswith(".delta") for n in trainable)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    trainer = Trainer(model=lora, args=training_args(tmp_path, batch=4, accum=1, lr=0.1),
                      train_dataset=ragged_examples(), data_collator=pad_collate)
    trainer.train()
    after = dict(lora.named_parameters())
    for n, p in before.items():
        assert torch.equal(p, after[n]) != (n in trainable and ("lora_B" in n or n.endswith((".delta", ".beta")))), n


def test_missing_transformers_names_the_extra(tmp_path):
    """Without transformers, importing complexformer.hf still works (label_token_counts needs only
    torch) and every Hugging Face name raises an ImportError naming the [hf] extra."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import complexformer.hf as hf\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "for name in ('convert_to_cmha', 'load_cmha', 'PDLTrainer'):\n"
        "    try:\n"
        "        getattr(hf, name)\n"
        "    except ImportError as e:\n"
        "        assert 'complexformer[hf]' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(name)\n"
        "try:\n"
        "    import complexformer.models\n"
        "except ImportError as e:\n"
        "    assert 'complexformer[hf]' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('complexformer.models')\n"
        "print('ok')\n"
    )
    # cwd outside the checkout, whose source tree has no compiled extension
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_gradient_checkpointing_same_gradients():
    conv = _converted(tiny_family("llama", dtype=torch.float64)).train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    conv(ids, attention_mask=mask, labels=labels).loss.backward()
    ref = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    conv.gradient_checkpointing_enable()
    conv(ids, attention_mask=mask, labels=labels).loss.backward()
    for p, g in zip(conv.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert all(p.grad.abs().max() > 0 for p in cmha_parameters(conv))


@pytest.mark.parametrize("additive", [False, True])
def test_partial_rotary_follows_the_nan_and_empty_row_rules(additive):
    """Partial rotary (4 of 8 features rotated) with a 4-D mask goes through cmha_attention like
    every other case: a NaN key hidden by the mask (HF's additive form included) leaves the rows
    that do not see it finite; a row that sees a NaN key, or has a NaN query, is NaN; a row with no
    visible key is 0 (the rules of tests/test_attn_mask.py)."""
    torch.manual_seed(0)
    attn = CMHAAttention(hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, layer_idx=0, num_layers=1,
                         freqs=cmha_attention_module.rope_freqs(8, 10000.0), learnable=())
    attn._freqs_master, attn._derived = attn._freqs_master[:2], {}  # as conversion sets partial rotary
    L = 6
    q, k, v = torch.randn(1, 2, L, 8), torch.randn(1, 1, L, 8), torch.randn(1, 1, L, 8)
    k[0, 0, 1, 6] = float("nan")  # key 1, in a pass-through feature: seen by queries 1 and 2 only
    q[0, :, 4, 2] = float("nan")  # query 4, in a rotated feature
    m, n = torch.arange(L)[:, None], torch.arange(L)[None, :]
    visible = (n <= m) & (n > m - 2)  # a sliding window of 2
    visible[5] = False  # query 5 sees nothing
    mask = visible[None, None]
    if additive:
        mask = torch.zeros(1, 1, L, L).masked_fill(~visible, torch.finfo(torch.float32).min)
    pos = torch.arange(L)[None]
    with torch.no_grad():
        out = attn._attend(q, k, v, pos, pos, mask)
    nan_rows = out.isnan().any(-1)[0]  # (H, L)
    assert nan_rows.tolist() == [[False, True, True, False, True, False]] * 2
    assert bool((out[0, :, 5] == 0).all())
