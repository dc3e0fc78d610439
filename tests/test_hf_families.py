"""CMHA conversion of every supported RoPE family (README table; docs/design.md, "HF families"):
tiny random models built from configs (offline), float32 on the CPU, "eager" reference attention.

At conversion delta = 1, beta = 0, so every converted model must reproduce the original's logits
to float32 noise on left-padded, right-padded and packed batches, generate the same tokens with
and without the cache, reload with moved angles, and train with fused PDL. Moving delta must move
the logits (the rotation is really used). The quick suite runs QUICK; the rest is marked slow.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_testutil import hand_counts, pad_collate, ragged_examples, training_args  # noqa: E402

from complexformer import pdl as _pdl  # noqa: E402
from complexformer.hf import (  # noqa: E402
    PDLTrainer, apply_fused_pdl, cmha_parameters, convert_to_cmha, load_cmha,
)

# name -> config class, causal LM class, base class, config kwargs on top of COMMON. Every pad /
# bos / eos id is set inside the 128-token vocabulary; Gemma 2 gets a softcap of 0.01 so that it
# bites at random-init scores (dropping it moves the logits by ~1e-2).
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
RECIPES = {
    "llama":      dict(config="LlamaConfig", causal_lm="LlamaForCausalLM", base="LlamaModel", kwargs={}),
    "llama-llama3": dict(config="LlamaConfig", causal_lm="LlamaForCausalLM", base="LlamaModel", kwargs=dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear": dict(config="LlamaConfig", causal_lm="LlamaForCausalLM", base="LlamaModel", kwargs=dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-yarn": dict(config="LlamaConfig", causal_lm="LlamaForCausalLM", base="LlamaModel", kwargs=dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "mistral":    dict(config="MistralConfig", causal_lm="MistralForCausalLM", base="MistralModel",
                       kwargs=dict(sliding_window=8)),
    "mixtral":    dict(config="MixtralConfig", causal_lm="MixtralForCausalLM", base="MixtralModel",
                       kwargs=dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "qwen2":      dict(config="Qwen2Config", causal_lm="Qwen2ForCausalLM", base="Qwen2Model",
                       kwargs=dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen2_moe":  dict(config="Qwen2MoeConfig", causal_lm="Qwen2MoeForCausalLM", base="Qwen2MoeModel",
                       kwargs=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=64)),
    "qwen3":      dict(config="Qwen3Config", causal_lm="Qwen3ForCausalLM", base="Qwen3Model",
                       kwargs=dict(head_dim=16)),
    "qwen3_moe":  dict(config="Qwen3MoeConfig", causal_lm="Qwen3MoeForCausalLM", base="Qwen3MoeModel",
                       kwargs=dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "gemma":      dict(config="GemmaConfig", causal_lm="GemmaForCausalLM", base="GemmaModel",
                       kwargs=dict(head_dim=16)),
    "gemma2":     dict(config="Gemma2Config", causal_lm="Gemma2ForCausalLM", base="Gemma2Model",
                       kwargs=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                   attn_logit_softcapping=0.01, final_logit_softcapping=2.0),
                       attn_implementation="eager"),
    "gemma3_text": dict(config="Gemma3TextConfig", causal_lm="Gemma3ForCausalLM", base="Gemma3TextModel",
                        kwargs=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"])),
    "gemma3_text-linear": dict(config="Gemma3TextConfig", causal_lm="Gemma3ForCausalLM", base="Gemma3TextModel",
                        kwargs=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"],
                                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                        "rope_theta": 1000000.0},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 10000.0}})),
    "phi3":       dict(config="Phi3Config", causal_lm="Phi3ForCausalLM", base="Phi3Model",
                       kwargs=dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5)),
    "olmo2":      dict(config="Olmo2Config", causal_lm="Olmo2ForCausalLM", base="Olmo2Model",
                       kwargs=dict(pad_token_id=1, eos_token_id=2)),
    "granite":    dict(config="GraniteConfig", causal_lm="GraniteForCausalLM", base="GraniteModel",
                       kwargs=dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                                   logits_scaling=4.0)),
    "smollm3":    dict(config="SmolLM3Config", causal_lm="SmolLM3ForCausalLM", base="SmolLM3Model",
                       kwargs=dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layer_interval=2)),
    "glm":        dict(config="GlmConfig", causal_lm="GlmForCausalLM", base="GlmModel",
                       kwargs=dict(head_dim=16, pad_token_id=0, eos_token_id=2)),
    "glm4":       dict(config="Glm4Config", causal_lm="Glm4ForCausalLM", base="Glm4Model",
                       kwargs=dict(head_dim=16, pad_token_id=0, eos_token_id=2)),
    "cohere":     dict(config="CohereConfig", causal_lm="CohereForCausalLM", base="CohereModel",
                       kwargs=dict(use_qk_norm=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   logit_scale=0.5)),
    "starcoder2": dict(config="Starcoder2Config", causal_lm="Starcoder2ForCausalLM", base="Starcoder2Model",
                       kwargs=dict(sliding_window=8, bos_token_id=1, eos_token_id=2)),
    "gpt_neox":   dict(config="GPTNeoXConfig", causal_lm="GPTNeoXForCausalLM", base="GPTNeoXModel",
                       kwargs=dict(rotary_pct=0.5, bos_token_id=1, eos_token_id=2), drop=("num_key_value_heads",)),
    "stablelm":   dict(config="StableLmConfig", causal_lm="StableLmForCausalLM", base="StableLmModel",
                       kwargs=dict(qk_layernorm=True, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2)),
    "phi":        dict(config="PhiConfig", causal_lm="PhiForCausalLM", base="PhiModel",
                       kwargs=dict(qk_layernorm=True, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2)),
}

QUICK = ("gemma2", "phi3", "cohere", "gpt_neox", "smollm3")
FAMILY_PARAMS = [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in RECIPES]
# Granite logits_scaling / Cohere logit_scale are folded into the fused head; the softcap is refused
LOGIT_TRANSFORMS = {"gemma2": "final_logit_softcapping"}
ATOL = 2e-6  # float32 noise: the measured max |d logits| is 3e-8 .. 4e-7
VOCAB = COMMON["vocab_size"]


def build(name, head="causal_lm", seed=0, **over):
    r = RECIPES[name]
    kw = {k: v for k, v in COMMON.items() if k not in r.get("drop", ())}
    kw.update(r["kwargs"])
    kw.update(over)
    cfg = getattr(transformers, r["config"])(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return getattr(transformers, r[head])(cfg).eval()


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    left = torch.ones(2, 12, dtype=torch.long)
    left[0, :3] = 0
    right = torch.ones(2, 12, dtype=torch.long)
    right[0, -4:] = 0
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    # packed: HF masks block-diagonally only without a cache (use_cache=False)
    return ids, {"left": dict(input_ids=ids, attention_mask=left), "right": dict(input_ids=ids, attention_mask=right),
                 "packed": dict(input_ids=ids[:1], position_ids=packed, use_cache=False)}


def _max_diff(a, b, kw):
    keep = kw.get("attention_mask", torch.ones(a.shape[:2], dtype=torch.long))[..., None].bool()
    return float(((a - b).abs() * keep).max())


def _move_angles(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cmha_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_logits_equal_and_the_rotation_is_used(name):
    ref, conv = build(name), convert_to_cmha(build(name))
    _, batches = _batches()
    with torch.no_grad():
        for tag, kw in batches.items():
            d = _max_diff(ref(**kw).logits, conv(**kw).logits, kw)
            assert d < ATOL, (tag, d)
        for m in conv.modules():
            if isinstance(getattr(m, "delta", None), torch.nn.Parameter):
                m.delta.fill_(1.5)
        kw = batches["left"]
        assert _max_diff(ref(**kw).logits, conv(**kw).logits, kw) > 50 * ATOL
    base_ref, base = build(name, head="base"), convert_to_cmha(build(name, head="base"))
    with torch.no_grad():
        kw = batches["left"]
        a, b = base_ref(**kw).last_hidden_state, base(**kw).last_hidden_state
        assert _max_diff(a, b, kw) < ATOL


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_greedy_generate_with_and_without_cache(name):
    ref, conv = build(name), convert_to_cmha(build(name))
    ids, batches = _batches()
    kw = dict(**batches["left"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = ref.generate(**kw)
    assert torch.equal(conv.generate(**kw), want)
    assert torch.equal(conv.generate(**kw, use_cache=False), want)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_sampling_and_beam_search(name):
    ref, conv = build(name), convert_to_cmha(build(name))
    _, batches = _batches()
    kw = dict(**batches["left"], max_new_tokens=5, pad_token_id=0)
    for extra in (dict(do_sample=True, top_k=0, temperature=1.0), dict(do_sample=False, num_beams=3)):
        torch.manual_seed(7)
        want = ref.generate(**kw, **extra)
        for use_cache in (True, False):
            torch.manual_seed(7)
            assert torch.equal(conv.generate(**kw, **extra, use_cache=use_cache), want), (extra, use_cache)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_save_load_with_moved_angles(tmp_path, name):
    conv = convert_to_cmha(build(name))
    _move_angles(conv)
    conv.save_pretrained(tmp_path / "a")
    back = load_cmha(tmp_path / "a").eval()
    back.save_pretrained(tmp_path / "b")  # a reloaded model saves and reloads again
    again = load_cmha(tmp_path / "b").eval()
    _, batches = _batches()
    with torch.no_grad():
        for kw in batches.values():
            want = conv(**kw).logits
            assert torch.equal(back(**kw).logits, want) and torch.equal(again(**kw).logits, want)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_fused_pdl_loss_equals_the_models_own(name):
    conv = convert_to_cmha(build(name))
    _move_angles(conv)
    batch = pad_collate(ragged_examples(vocab=VOCAB)[:4])
    if name in LOGIT_TRANSFORMS:  # the fused head + loss cannot apply the transform: a clear error
        with pytest.raises(NotImplementedError, match=LOGIT_TRANSFORMS[name]):
            apply_fused_pdl(copy.deepcopy(conv))
        return
    want = conv(**batch).loss
    got = apply_fused_pdl(copy.deepcopy(conv))(**batch).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_pdl_trainer_accumulated_step_equals_unaccumulated(tmp_path, name):
    examples = ragged_examples(vocab=VOCAB)
    weights = _pdl.pdl_weights(hand_counts(examples, VOCAB), alpha=1.0)
    conv = convert_to_cmha(build(name))
    _move_angles(conv)
    models = []
    for batch, accum in ((8, 1), (2, 4)):
        m = copy.deepcopy(conv).train()
        PDLTrainer(model=m, args=training_args(tmp_path / str(accum), batch=batch, accum=accum, lr=0.1),
                   train_dataset=examples, data_collator=pad_collate, pdl_weights=weights).train()
        models.append(m)
    moved = 0
    for (n, a), b, c in zip(models[0].named_parameters(), models[1].parameters(), conv.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
        moved += int(n.endswith((".delta", ".beta")) and not torch.equal(a, c))
    assert moved == 2 * COMMON["num_hidden_layers"]


def test_gemma2_softcap_is_applied_and_attentions_are_returned():
    """Gemma 2's attention logit softcap changes the logits here (cap 0.01): the converted model
    matches only because it applies it. output_attentions gives the original's probabilities."""
    _, batches = _batches()
    kw = batches["right"]
    ref, conv = build("gemma2"), convert_to_cmha(build("gemma2"))
    uncapped = build("gemma2", attn_logit_softcapping=None)
    with torch.no_grad():
        assert _max_diff(ref(**kw).logits, uncapped(**kw).logits, kw) > 1e-3
        a = ref(**kw, output_attentions=True).attentions
        b = conv(**kw, output_attentions=True).attentions
    assert len(a) == len(b) == 2
    keep = kw["attention_mask"].bool()
    for x, y in zip(a, b):
        torch.testing.assert_close(y.permute(0, 2, 1, 3)[keep], x.permute(0, 2, 1, 3)[keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, over, match", [
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "Qwen3MoeConfig.sliding_window"),
    ("gemma", dict(use_bidirectional_attention=True), "bidirectional"),
    ("gpt_neox", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_type.*dynamic"),
])
def test_family_refusals_name_the_field(name, over, match):
    with pytest.raises(NotImplementedError, match=match):
        convert_to_cmha(build(name, **over))


def test_family_errors_inconsistent_widths_and_unsupported_caches():
    model = build("qwen3")
    model.model.layers[1].self_attn.k_proj = torch.nn.Linear(64, 24, bias=False)
    with pytest.raises(ValueError, match=r"head_dim \(16\).*layers\.1\.self_attn\.k_proj\.out_features is 24"):
        convert_to_cmha(model)
    conv = convert_to_cmha(build("phi3"))
    _, batches = _batches()
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        conv.generate(**batches["left"], max_new_tokens=2, pad_token_id=0, cache_implementation="static")


def test_unsupported_family_lists_the_supported_ones():
    from hf_testutil import tiny_gpt2

    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*Gemma3ForCausalLM.*PhiForCausalLM"):
        convert_to_cmha(tiny_gpt2())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi3", "gemma2", "cohere"])
def test_family_compile_fullgraph_with_a_padding_mask(name):
    ref, conv = build(name), convert_to_cmha(build(name))
    _, batches = _batches()
    kw = batches["left"]
    with torch.no_grad():
        assert _max_diff(ref(**kw).logits, torch.compile(conv, fullgraph=True)(**kw).logits, kw) < ATOL


def test_family_bf16_angles_and_peft_round_trip(tmp_path):
    """Phi-3 (fused qkv_proj): delta / beta stay float32 under a bf16 cast; LoRA on the module's own
    projection names; the angles saved beside the adapter come back exactly."""
    peft = pytest.importorskip("peft")
    from complexformer.hf import load_cmha_angles, save_cmha_angles

    conv = convert_to_cmha(build("phi3"))
    names = [n for n, _ in conv.named_parameters() if n.endswith((".delta", ".beta"))]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("delta", "beta")]
    assert {p.dtype for p in cmha_parameters(copy.deepcopy(conv).to(torch.bfloat16))} == {torch.float32}
    _move_angles(conv)
    lora = peft.get_peft_model(conv, peft.LoraConfig(r=2, target_modules=["qkv_proj", "o_proj"]))
    save_cmha_angles(lora, tmp_path)
    fresh = peft.get_peft_model(convert_to_cmha(build("phi3")), peft.LoraConfig(r=2, target_modules=["qkv_proj", "o_proj"]))
    load_cmha_angles(fresh, tmp_path)
    for a, b in zip(cmha_parameters(lora), cmha_parameters(fresh)):
        assert torch.equal(a, b)
