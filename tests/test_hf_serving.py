"""Serving mode (complexformer/hf/serving.py, docs/design.md "Serving mode"): q and k rotated before
the model's standard attention function, rotated H-wide keys in the cache. It must compute what
training mode computes (float32 noise), generate the same tokens, run transformers' continuous
batching (paged cache) on the CPU, and survive save / load. Tiny random models, offline."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_families import ATOL, RECIPES, _batches, _max_diff, _move_angles, build  # noqa: E402

from complexformer.hf import (  # noqa: E402
    ComplexFormerConfig, ComplexFormerForCausalLM, cmha_mode, convert_to_cmha, load_cmha, set_cmha_mode,
)

QUICK = ("llama", "qwen3", "gemma2", "phi3", "cohere", "gpt_neox", "smollm3")
PARAMS = [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in RECIPES]
# Gemma 2's softcap exists only in its eager attention (transformers' sdpa refuses it)
IMPLS = {"gemma2": ("eager",)}


def _converted(name, seed=5):
    model = convert_to_cmha(build(name))
    _move_angles(model, seed)  # delta, beta away from RoPE: the per-head rotation of keys matters
    return model


def _complexformer(**over):
    cfg = ComplexFormerConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, eos_token_id=None, pad_token_id=0, **over)
    torch.manual_seed(0)
    return ComplexFormerForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", PARAMS)
def test_serving_logits_and_greedy_tokens_equal_training_mode(name):
    model = _converted(name)
    ids, batches = _batches()
    gen = dict(**batches["left"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = {tag: model(**kw).logits for tag, kw in batches.items()}
        want_tokens = model.generate(**gen)
        for impl in IMPLS.get(name, ("sdpa", "eager")):
            set_cmha_mode(model, "serving", attn_implementation=impl)
            assert cmha_mode(model) == "serving" and model.config._attn_implementation == impl
            for tag, kw in batches.items():
                assert _max_diff(model(**kw).logits, want[tag], kw) < ATOL, (impl, tag)
            assert torch.equal(model.generate(**gen), want_tokens), impl
        set_cmha_mode(model, "training")
        assert cmha_mode(model) == "training"
        for tag, kw in batches.items():
            assert torch.equal(model(**kw).logits, want[tag]), tag


def test_serving_cache_holds_rotated_keys_per_query_head():
    model = _converted("llama")
    H, Hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert Hkv < H
    ids, batches = _batches()
    set_cmha_mode(model, "serving")
    assert model.config.num_key_value_heads == H  # what engines size their caches by
    with torch.no_grad():
        out = model(**batches["left"], use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
    assert len(cache.layers) == model.config.num_hidden_layers  # no position layer: positions are in the rotation
    assert cache.layers[0].keys.shape[1] == H and cache.layers[0].values.shape[1] == H
    gen = dict(**batches["left"], max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # a static cache (refused in training mode) is sized H wide from the config
        assert torch.equal(model.generate(**gen, cache_implementation="static"), model.generate(**gen))
    set_cmha_mode(model, "training")
    assert model.config.num_key_value_heads == Hkv


def _cb_config():
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig(num_blocks=4, page_size=16, max_batch_tokens=64)


@pytest.mark.parametrize("make, impl", [
    (lambda: _converted("llama"), "sdpa"),            # CMHAAttention (Llama / Mistral / Qwen2), GQA
    (lambda: _converted("qwen3"), "eager"),           # an adapted family; CB runs it as "paged|eager"
    (lambda: _converted("phi3"), "paged|sdpa"),       # partial rotary; the older name of "sdpa" + paged cache
    (lambda: _complexformer(), "sdpa"),               # the model class
])
def test_continuous_batching_on_cpu_equals_generate(make, impl):
    """transformers' continuous batching (generate_batch: paged cache, requests packed into one
    row) in serving mode gives each request the tokens of a plain greedy generate in training mode."""
    from transformers import GenerationConfig

    model = make()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 3)]
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist() for p in prompts]
        set_cmha_mode(model, "serving", attn_implementation=impl)
        out = model.generate_batch(inputs=prompts, generation_config=gc, continuous_batching_config=_cb_config(),
                                   warmup=False)
    got = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    assert got == want
    assert len({tuple(t) for t in want}) > 1  # the requests really differ


def test_training_mode_refuses_a_paged_cache_naming_serving_mode():
    model = _converted("llama")

    class PagedLike:  # what continuous batching hands the attention: not a transformers Cache
        def update(self, *a, **k):
            raise AssertionError("not reached")

    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 4, model.config.hidden_size)
    with pytest.raises(TypeError, match="set_cmha_mode"):
        attn(hidden, position_embeddings=None, attention_mask=None, cache=PagedLike(),
             position_ids=torch.arange(4)[None])


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_saved_while_serving_reloads_serving_and_trains_again(tmp_path, name):
    model = _converted(name)
    ids, batches = _batches()
    kw = batches["left"]
    with torch.no_grad():
        want = model(**kw).logits
    set_cmha_mode(model, "serving", attn_implementation="eager")
    model.save_pretrained(tmp_path / "a")
    text = (tmp_path / "a" / "config.json").read_text()
    assert '"cmha_serving"' in text
    back = load_cmha(tmp_path / "a").eval()
    assert cmha_mode(back) == "serving" and back.config._attn_implementation == "eager"
    with torch.no_grad():
        assert _max_diff(back(**kw).logits, want, kw) < ATOL
        set_cmha_mode(back, "training")
        assert torch.equal(back(**kw).logits, want)
    back.save_pretrained(tmp_path / "b")
    again = load_cmha(tmp_path / "b").eval()
    assert cmha_mode(again) == "training"
    with torch.no_grad():
        assert torch.equal(again(**kw).logits, want)


def test_complexformer_saved_while_serving_reloads(tmp_path):
    model = _complexformer()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    set_cmha_mode(model, "serving")
    model.save_pretrained(tmp_path)
    back = ComplexFormerForCausalLM.from_pretrained(tmp_path).eval()
    assert cmha_mode(back) == "serving" and back.config.num_key_value_heads == 4
    with torch.no_grad():
        assert float((back(ids).logits - want).abs().max()) < ATOL
        set_cmha_mode(back, "training")
        assert back.config.num_key_value_heads == 2
        assert torch.equal(back(ids).logits, want)


def test_serving_under_peft_and_with_learnable_freqs():
    peft = pytest.importorskip("peft")
    model = _complexformer(learnable_freqs=True)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "omega"):
                m.omega.mul_(1.3)  # per-head frequencies away from the default
        want = model(ids).logits
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    set_cmha_mode(wrapped, "serving")
    with torch.no_grad():
        assert float((wrapped(input_ids=ids).logits - want).abs().max()) < ATOL


def test_set_cmha_mode_bad_input_names_the_argument():
    model = _converted("llama")
    with pytest.raises(ValueError, match="mode"):
        set_cmha_mode(model, "inference")
    with pytest.raises(ValueError, match="attn_implementation"):
        set_cmha_mode(model, "serving", attn_implementation="no_such_attention")
    with pytest.raises(ValueError, match="attn_implementation"):
        set_cmha_mode(model, "serving", attn_implementation="complexformer_cmha")
    with pytest.raises(TypeError, match="attn_implementation"):
        set_cmha_mode(model, "serving", attn_implementation=None)
    with pytest.raises(ValueError, match="convert_to_cmha"):
        set_cmha_mode(build("llama"), "serving")
    assert cmha_mode(model) == "training"  # nothing changed by the refused calls


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3"])
def test_training_mode_under_any_model_attn_implementation_is_still_cmha(name):
    """transformers advises model.set_attn_implementation("sdpa"); in training mode that changes
    only the masks HF builds, never the attention: the adapted modules read a config view whose
    attention function stays complexformer's (no rotation would be applied otherwise)."""
    model = _converted(name)
    ids, batches = _batches()
    with torch.no_grad():
        want = {tag: model(**kw).logits for tag, kw in batches.items()}
        for impl in ("sdpa", "eager"):
            model.set_attn_implementation(impl)
            assert cmha_mode(model) == "training"
            for tag, kw in batches.items():
                assert _max_diff(model(**kw).logits, want[tag], kw) < ATOL, (impl, tag)
