"""Training mode's decoding path (complexformer/hf/rotated_keys.py, docs/design.md "KV cache"): keys
rotated once, when they enter the cache. It must give what the fused path gives (float32 noise), be
used on decoding steps, and never use rotated keys out of step with the raw keys, the angles or
the cache (in-place angle updates, cropping, beam reordering, batch selection)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_families import _move_angles, build  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from complexformer.attention import attention_probs, attention_rotated_keys, cmha_attention  # noqa: E402
import complexformer.hf.rotated_keys as rotated_keys  # noqa: E402
from complexformer.hf import convert_to_cmha  # noqa: E402
from complexformer.reference import default_freqs  # noqa: E402
from complexformer.rotate import euler_rotate_qk  # noqa: E402

STEP_ATOL = 2e-5  # the reference math against the fused kernel, float32 logits of a 2-layer model


def _inputs(B=2, H=4, Hkv=2, Lq=2, Lk=9, d=8, rot=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (rot or d) // 2
    q, k, v = (torch.randn(B, n, L, d, generator=g, dtype=dtype) for n, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    delta = (1 + 0.5 * torch.randn(H, h, generator=g)).to(dtype)
    beta = (0.3 * torch.randn(H, h, generator=g)).to(dtype)
    freqs = default_freqs(2 * h).to(dtype)
    q_pos = torch.randint(0, 50, (B, Lq), generator=g) + 60
    k_pos = torch.randint(0, 50, (B, Lk), generator=g)
    return q, k, v, delta, beta, freqs, (q_pos, k_pos)


def _buffer(q, k, delta, beta, freqs, pos, n, layout="half", rot=None):
    """A k_rotated buffer whose first n keys hold the rotation and the rest NaN (must be overwritten)."""
    _, kr = euler_rotate_qk(q, k, delta, beta, freqs, q_positions=pos[0], k_positions=pos[1], layout=layout,
                            rotary_dim=rot)
    buf = torch.full_like(kr, float("nan"))
    buf[:, :, :n] = kr[:, :, :n]
    return buf


@pytest.mark.parametrize("case", ["plain", "padding", "bool_mask", "additive_mask", "partial", "interleaved",
                                  "softcap", "one_query", "nan_key", "float32", "long", "odd_width"])
@pytest.mark.parametrize("n_from_end", [None, 0, 2])  # n_rotated: 0 (rotate all), Lk - 2, Lk - 0
def test_attention_rotated_keys_equals_cmha_attention(case, n_from_end):
    rot = 4 if case == "partial" else None
    Lq = 1 if case == "one_query" else 2
    Lk = 150 if case == "long" else 9  # long: three key tiles of the CPU kernel (64 keys each)
    d = 10 if case == "odd_width" else 8  # 10: a head dim with a tail past the kernel's vector width
    dtype = torch.float32 if case in ("float32", "long", "odd_width") else torch.float64
    q, k, v, delta, beta, freqs, pos = _inputs(Lq=Lq, Lk=Lk, d=d, rot=rot, dtype=dtype)
    if case == "nan_key":
        k[0, 1, 4, 0] = float("nan")  # the rows of batch 0 that see key 4 (query heads 2, 3) become NaN
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    layout = "interleaved" if case == "interleaved" else "half"
    kw = dict(positions=pos, layout=layout, rotary_dim=rot)
    g = torch.Generator().manual_seed(3)
    if case == "padding":
        kpm = torch.rand(2, Lk, generator=g) > 0.3
        kpm[1] = False  # a row with no visible key: 0
        kw["key_padding_mask"] = kpm
    if case == "bool_mask":
        kw["attn_mask"] = torch.rand(2, 1, Lq, Lk, generator=g) > 0.4
    if case == "additive_mask":
        kw["attn_mask"] = torch.randn(2, 4, Lq, Lk, generator=g, dtype=q.dtype)
    n = 0 if n_from_end is None else Lk - n_from_end
    buf = _buffer(q, k, delta, beta, freqs, pos, n, layout, rot)
    with torch.no_grad():
        if case == "softcap":
            want, want_p = attention_probs(q, k, v, delta, beta, freqs, softcap=2.0, **kw)
            got, got_p = attention_rotated_keys(q, k, v, delta, beta, freqs, buf, n, softcap=2.0, return_probs=True,
                                                **kw)
            torch.testing.assert_close(got_p, want_p, rtol=0, atol=tol)
        else:
            want = cmha_attention(q, k, v, delta, beta, freqs, backend="reference", **kw)
            got = attention_rotated_keys(q, k, v, delta, beta, freqs, buf, n, **kw)
    assert torch.isnan(buf).any().item() == (case == "nan_key")  # every key was rotated into the buffer
    torch.testing.assert_close(got, want, rtol=0, atol=tol, equal_nan=True)
    if case == "nan_key":
        assert torch.isnan(got[0, 2:]).all() and not torch.isnan(got[0, :2]).any() and not torch.isnan(got[1]).any()
    if case == "padding":
        assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_attention_rotated_keys_refuses_grad_and_bad_buffers():
    q, k, v, delta, beta, freqs, pos = _inputs(dtype=torch.float32)
    buf = _buffer(q, k, delta, beta, freqs, pos, 9)
    with pytest.raises(RuntimeError, match="inference only"):
        attention_rotated_keys(q, k, v, delta, beta, freqs, buf, 9, positions=pos)
    with torch.no_grad():
        with pytest.raises(ValueError, match="k_rotated"):
            attention_rotated_keys(q, k, v, delta, beta, freqs, buf[:, :2], 9, positions=pos)
        with pytest.raises(TypeError, match="k_rotated"):
            attention_rotated_keys(q, k, v, delta, beta, freqs, buf.double(), 9, positions=pos)
        with pytest.raises(ValueError, match="n_rotated"):
            attention_rotated_keys(q, k, v, delta, beta, freqs, buf, 10, positions=pos)


# ----------------------------------------------------------------------------------------------
# Inside converted models: decoding steps against the fused path (rotated_keys disabled).
# ----------------------------------------------------------------------------------------------
def _model(name):
    model = convert_to_cmha(build(name)).eval()
    _move_angles(model)
    return model


def _prompt():
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _decode(model, ids, mask, steps, cache=None, between=None):
    """Logits of ``steps`` greedy decoding steps after the prompt, on one DynamicCache."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        for i in range(steps):
            if between is not None:
                ids, mask, logits = between(i, cache, ids, mask, logits)
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = model(nxt, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
            out.append(logits)
    return out, cache


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _without_rotated_keys(monkeypatch):
    monkeypatch.setattr(rotated_keys, "MAX_QUERIES", 0)


def _in_step(cache, n_layers):
    """How many layers carry rotated keys in step with all their keys."""
    return sum(1 for layer in cache.layers[:n_layers]
               if getattr(layer, "_cmha_rotated_keys", None) is not None
               and layer._cmha_rotated_keys.n == layer.keys.shape[2])


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "cohere", "gemma2"])
def test_decoding_steps_equal_the_fused_path_and_use_rotated_keys(name, monkeypatch):
    model = _model(name)
    ids, mask = _prompt()
    got, cache = _decode(model, ids, mask, 5)
    n_layers = model.config.num_hidden_layers
    plain = sum(type(layer) is DynamicLayer for layer in cache.layers[:n_layers])  # not sliding-window layers
    assert plain > 0 and _in_step(cache, n_layers) == plain
    _without_rotated_keys(monkeypatch)
    want, cache = _decode(model, ids, mask, 5)
    assert _in_step(cache, n_layers) == 0
    assert _max_diff(got, want) < STEP_ATOL


def _edits():
    def angles(i, cache, ids, mask, logits):  # an optimizer step between two decoding steps
        if i == 2:
            _move_angles(_edits.model, seed=9)
        return ids, mask, logits

    def angles_data(i, cache, ids, mask, logits):  # a write that bumps no version counter
        if i == 2:
            for m in _edits.model.modules():
                if isinstance(getattr(m, "delta", None), torch.nn.Parameter):
                    m.delta.data.mul_(1.1)
        return ids, mask, logits

    def crop(i, cache, ids, mask, logits):
        if i == 2:
            cache.crop(-3)
            return ids[:, :-3], mask[:, :-3], logits
        return ids, mask, logits

    def reorder(i, cache, ids, mask, logits):  # beam search's reordering
        if i == 2:
            cache.reorder_cache(torch.tensor([1, 0]))
            return ids.flip(0), mask.flip(0), logits.flip(0)
        return ids, mask, logits

    def select(i, cache, ids, mask, logits):  # batch selection (contrastive search)
        if i == 2:
            cache.batch_select_indices(torch.tensor([1]))
            return ids[1:], mask[1:], logits[1:]
        return ids, mask, logits

    return {"angles": angles, "angles_data": angles_data, "crop": crop, "reorder": reorder, "select": select}


@pytest.mark.parametrize("edit", ["angles", "angles_data", "crop", "reorder", "select"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_rotated_keys_follow_edits_of_the_cache_and_the_angles(name, edit, monkeypatch):
    ids, mask = _prompt()
    runs = []
    for fused in (False, True):
        if fused:
            _without_rotated_keys(monkeypatch)
        _edits.model = _model(name)  # the same weights and angles each time (seeded)
        runs.append(_decode(_edits.model, ids, mask, 5, between=_edits()[edit])[0])
    assert _max_diff(*runs) < STEP_ATOL


def test_rotated_keys_unused_with_grad_and_for_a_first_call():
    model = _model("llama")
    ids, mask = _prompt()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :2], attention_mask=mask[:, :2], cache=cache, use_cache=True)  # a first call: nothing cached
    assert _in_step(cache, 2) == 0
    model(ids[:, 2:3], attention_mask=mask[:, :3], cache=cache, use_cache=True).logits.sum().backward()
    assert _in_step(cache, 2) == 0  # grad mode: the differentiable fused path
    assert model.model.layers[0].self_attn.delta.grad is not None


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_beam_search_and_sampling_tokens_equal_the_fused_path(name, monkeypatch):
    model = _model(name)
    ids, mask = _prompt()
    kws = [dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=5)]
    got = []
    for fused in (False, True):
        if fused:
            _without_rotated_keys(monkeypatch)
        with torch.no_grad():
            for kw in kws:
                torch.manual_seed(0)
                got.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw))
    for a, b in zip(got[:2], got[2:]):
        assert torch.equal(a, b)


def test_kernel_binding_checks_the_key_cache():
    """The C binding validates the rotated-key cache itself (the kernel writes into it)."""
    from complexformer import _ext

    q, k, v, delta, beta, freqs, (qp, kp) = _inputs(dtype=torch.float32)
    out, lse = torch.empty(2, 4, 2, 8), torch.empty(2, 4, 2)

    def call(cache, n):
        _ext.launch("attn_fwd", q, k, v, delta.float(), beta.float(), freqs.float(), qp, kp, None, None, out, lse, 1,
                    0.35, 7, 0, 1, 0, None, None, cache, n)

    call(torch.zeros(2, 4, 12, 8), 0)  # more rows than keys: fine
    with pytest.raises(ValueError, match="k_cache"):
        call(torch.zeros(2, 4, 8, 8), 0)  # fewer rows than the 9 keys
    with pytest.raises(ValueError, match="k_cache"):
        call(torch.zeros(2, 2, 9, 8), 0)  # kv heads, not query heads
    with pytest.raises(TypeError, match="k_cache"):
        call(torch.zeros(2, 4, 9, 8, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="n_cached"):
        call(torch.zeros(2, 4, 9, 8), 10)


def test_generate_under_inference_mode_uses_rotated_keys():
    """Inference tensors have no version counter: the cache is then followed by identity alone."""
    model = _model("llama")
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
    with torch.inference_mode():
        got = model.generate(ids, **kw)
        cache = DynamicCache(config=model.config)
        _decode(model, ids, mask, 3, cache=cache)
    assert torch.equal(got, want)
    assert _in_step(cache, 2) == 2
