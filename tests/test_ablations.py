"""The ablation fields of ComplexFormerConfig: learnable_freqs, fixed_delta, rotary_fraction."""
import pytest
import torch

pytest.importorskip("transformers")

from complexformer.hf.ablation_attention import partial_freqs  # noqa: E402
from complexformer.lab.train import build_model, train  # noqa: E402

V, D, L, H = 64, 32, 2, 2
h = D // H // 2


def _model(attention, **kw):
    return build_model(V, attention, hidden_size=D, num_layers=L, num_heads=H, seed=3, **kw)


def _logits(m, seed=0):
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(input_ids=x, use_cache=False).logits


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts():
    rope, cmha = _count(_model("rope")), _count(_model("cmha"))
    per_layer = L * H * h
    assert cmha == rope + 2 * per_layer  # delta and beta
    assert _count(_model("rope", learnable_freqs=True)) == rope + per_layer  # omega
    assert _count(_model("cmha", learnable_freqs=True)) == cmha + per_layer
    assert _count(_model("cmha", fixed_delta=0.0)) == cmha - per_layer  # beta only
    assert _count(_model("rope", rotary_fraction=0.25)) == rope


def test_identities_at_init():
    # learnable frequencies start at the fixed ones; partial RoPE at fraction 1 is RoPE
    assert torch.equal(_logits(_model("rope", learnable_freqs=True)), _logits(_model("rope")))
    assert torch.equal(_logits(_model("cmha", learnable_freqs=True)), _logits(_model("cmha")))
    assert torch.equal(_logits(_model("rope", rotary_fraction=1.0)), _logits(_model("rope")))
    assert not torch.equal(_logits(_model("rope", rotary_fraction=0.25)), _logits(_model("rope")))
    f = torch.arange(1.0, 9.0)
    assert partial_freqs(f, 0.25).tolist() == [1, 2, 0, 0, 0, 0, 0, 0] and torch.equal(partial_freqs(f, 1.0), f)


def test_partial_rope_unrotated_pairs_ignore_position():
    # with every pair at frequency 0 (the limit of a tiny fraction) the model no longer sees
    # positions: identical to attention="none" up to the shared modulus epsilon
    m = _model("rope", rotary_fraction=1e-9)
    assert torch.allclose(_logits(m), _logits(_model("none")), atol=1e-6)


def test_fixed_delta_zero_differs_from_cmha_and_trains():
    m = _model("cmha", fixed_delta=0.0)
    assert not torch.allclose(_logits(m), _logits(_model("cmha")))
    assert not any(n.endswith(".delta") for n, _ in m.named_parameters())
    beta0 = m.model.layers[0].self_attn.beta.detach().clone()
    stream = torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(1))
    hist = train(m, stream, steps=15, batch_size=4, seq_len=16, lr=1e-2, progress=False)
    assert hist["loss"][-1] < hist["loss"][0]
    assert not torch.equal(m.model.layers[0].self_attn.beta, beta0)  # beta learns


def test_learnable_freqs_train():
    m = _model("rope", learnable_freqs=True)
    before = m.model.layers[0].self_attn.omega.detach().clone()
    train(m, torch.randint(0, V, (500,)), steps=5, batch_size=4, seq_len=16, lr=1e-2, progress=False)
    assert not torch.equal(m.model.layers[0].self_attn.omega, before)


@pytest.mark.parametrize("attention", ["rope", "cmha"])
def test_learned_freqs_are_angles_for_peft(attention, tmp_path):
    """omega of learnable_freqs is returned by cmha_parameters and carried by save_cmha_angles /
    load_cmha_angles, so a PEFT run that trains it keeps it (and is warned when it would not)."""
    peft = pytest.importorskip("peft")
    from complexformer.hf import cmha_parameters, load_cmha_angles, save_cmha_angles
    from complexformer.hf.angles import _angles_at_risk

    m = _model(attention, learnable_freqs=True)
    names = {n.rsplit(".", 1)[1] for n, p in m.named_parameters() if any(p is q for q in cmha_parameters(m))}
    assert names == ({"omega"} if attention == "rope" else {"omega", "delta", "beta"})
    lora = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not _angles_at_risk(lora)  # frozen by PEFT, still at their start
    with torch.no_grad():
        for p in cmha_parameters(lora):
            p.mul_(1.1)
    assert _angles_at_risk(lora)  # moved: PeftModel.save_pretrained would warn
    want = _logits(lora)
    save_cmha_angles(lora, tmp_path)
    fresh = peft.get_peft_model(_model(attention, learnable_freqs=True),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    fresh.load_state_dict(lora.state_dict())  # the adapter (and base) weights; the angles come from the file
    with torch.no_grad():
        for p in cmha_parameters(fresh):
            p.fill_(0.5)
    load_cmha_angles(fresh, tmp_path)
    assert torch.equal(_logits(fresh), want)


@pytest.mark.parametrize("kw", [dict(attention="rope", learnable_freqs=True), dict(attention="cmha", fixed_delta=0.0),
                                dict(attention="cmha", learnable_freqs=True),
                                dict(attention="rope", rotary_fraction=0.25)])
def test_save_load_round_trip(kw, tmp_path):
    from complexformer.hf.modeling_complexformer import ComplexFormerForCausalLM

    kw = dict(kw)
    m = _model(kw.pop("attention"), **kw)
    with torch.no_grad():
        for p in m.parameters():  # move off the init, so a reinitialised tensor would show
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(tmp_path)
    m2 = ComplexFormerForCausalLM.from_pretrained(tmp_path)
    for k, v in kw.items():
        assert getattr(m2.config, k) == v
    assert torch.equal(_logits(m2), _logits(m))


@pytest.mark.parametrize("attention,kw,match", [("rope", dict(fixed_delta=0.0), "fixed_delta"),
                                                ("none", dict(learnable_freqs=True), "learnable_freqs"),
                                                ("rope", dict(rotary_fraction=0), "rotary_fraction"),
                                                ("rope", dict(rotary_fraction=1.5), "rotary_fraction"),
                                                ("cmha", dict(fixed_delta=float("nan")), "fixed_delta")])
def test_bad_fields(attention, kw, match):
    with pytest.raises(ValueError, match=match):
        _model(attention, **kw)
