"""Shared pieces of the Hugging Face tests: a tiny GPT-2 built from a config (no download), ragged
causal-LM data, a padding collator, and the hand-written float64 PDL step they are checked against."""
import collections
import copy

import torch

TINY_VOCAB = 72
LENGTHS = [3, 12, 5, 9, 4, 11, 7, 6]  # ragged on purpose: micro-batches get different weight sums


def tiny_gpt2(vocab=TINY_VOCAB, dtype=torch.float64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=vocab,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).to(dtype)


def ragged_examples(lengths=LENGTHS, vocab=TINY_VOCAB, seed=1):
    """Causal-LM examples with Zipf-like token ids (so PDL weights differ a lot) and, in every
    other sequence, a masked 2-token prompt (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.multinomial(probs, n, replacement=True, generator=g)
        labels = ids.clone()
        if i % 2:
            labels[:2] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def hand_counts(examples, vocab, shift=True, ignore_index=-100, key="labels"):
    c = collections.Counter()
    for ex in examples:
        seq = ex[key] if isinstance(ex, dict) else ex
        for t in list(seq)[1 if shift else 0:]:
            if int(t) != ignore_index:
                c[int(t)] += 1
    out = torch.zeros(vocab, dtype=torch.int64)
    for t, n in c.items():
        out[t] = n
    return out


def pad_collate(features):
    """Right-pad: input_ids with 0, attention_mask 0, labels -100."""
    T = max(len(f["input_ids"]) for f in features)
    B = len(features)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.as_tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hand_pdl_step(model, examples, weights, lr, normalize="weights"):
    """One SGD step on the whole batch with the shifted PDL loss written out by hand:
    sum_t w[y_t] * nll_t / sum_t w[y_t] (normalize="weights"), or / number of targets
    (normalize="tokens", the wrong normaliser). Returns the updated copy of the model."""
    model = copy.deepcopy(model)
    batch = pad_collate(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    y = batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    z, y = z[keep], y[keep]
    w = weights.to(z.dtype)[y]
    nll = -torch.log_softmax(z, dim=-1).gather(1, y[:, None])[:, 0]
    denom = w.sum() if normalize == "weights" else torch.tensor(float(y.numel()), dtype=z.dtype)
    loss = (w * nll).sum() / denom
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return model


def training_args(out_dir, *, batch, accum, lr, **kw):
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=1, learning_rate=lr, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kw})


def max_param_diff(a, b):
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


# ---- CMHA conversion: tiny random Llama / Mistral / Qwen2 models with GQA -------------------------
FAMILIES = ("llama", "mistral", "qwen2")


def tiny_family(family, *, dtype=torch.float32, seed=0, vocab=TINY_VOCAB, layers=2, **overrides):
    """A random 2-layer model of ``family`` (4 query heads, 2 kv heads, head_dim 16) on SDPA
    attention. Mistral gets a sliding window of 6 (shorter than the test sequences) and Qwen2 its
    q/k/v biases (randomised so they matter)."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mistral":
        kw["sliding_window"] = 6
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def padded_batch(vocab=TINY_VOCAB, seed=3):
    """(input_ids, attention_mask) for 3 rows of length 11: left-padded, right-padded, unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, 8:] = 0
    ids[mask == 0] = 0
    return ids, mask


def left_padded_batch(vocab=TINY_VOCAB, seed=4):
    """(input_ids, attention_mask): 3 prompts of lengths 7, 4, 6, left-padded (for generate)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask
