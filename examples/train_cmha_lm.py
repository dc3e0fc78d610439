"""Train a tiny byte-level CMHA language model on a text file, then greedy-generate with the KV cache.

    python examples/train_cmha_lm.py --text-file my_corpus.txt --steps 300

Tokens are bytes (vocab 256), so any UTF-8 text works without a tokenizer. The loss is the
Power-Law Decay Loss (complexformer.causal_lm_pdl_loss, fused with the LM head) with weights (count + eps)^-alpha from the counts of
the training targets (complexformer.token_counts / pdl_weights): counting the very label stream the
loss sees means no target is ever unseen (an unseen token would get weight eps^-alpha = 1e7).
--pdl-alpha 0 (or --loss ce) is plain cross-entropy. Validation reports plain cross-entropy in
bits per byte either way, so runs with different losses compare.
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import complexformer
from complexformer.models import ComplexFormerConfig, ComplexFormerForCausalLM
from complexformer.lab.train import HelpFormatter, resolve_device


def load_bytes(path, max_bytes):
    """The file's bytes as int64 tokens, or exit with a one-line error."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes if max_bytes > 0 else -1)
    except FileNotFoundError:
        sys.exit(f"error: --text-file {path}: no such file")
    except IsADirectoryError:
        sys.exit(f"error: --text-file {path}: is a directory, not a text file")
    if len(data) < 1024:
        sys.exit(f"error: --text-file {path}: only {len(data)} bytes; need at least 1 KiB of text")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def check_args(ap, args):
    """Exit with a one-line usage error for settings the model or the data cannot take."""
    for name in ("steps", "batch_size", "seq_len", "dim", "depth", "heads", "kv_heads", "val_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    if args.dim % args.heads:
        ap.error(f"--heads {args.heads} must divide --dim {args.dim}")
    if (args.dim // args.heads) % 2:
        ap.error(f"--dim / --heads = {args.dim // args.heads} must be even (CMHA pairs the head dimensions)")
    if args.heads % args.kv_heads:
        ap.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if args.gen_tokens < 0:
        ap.error(f"--gen-tokens must be >= 0, got {args.gen_tokens}")
    if not args.prompt:
        ap.error("--prompt must not be empty")
    try:
        return resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))


def batches(data, batch, seq_len, gen):
    """Random windows: inputs (B, T) and next-byte targets (B, T)."""
    i = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    w = torch.stack([data[j:j + seq_len + 1] for j in i.tolist()])
    return w[:, :-1], w[:, 1:]


def make_weights(train, args):
    """PDL weights from the label stream's counts, or None (plain cross-entropy)."""
    if args.loss == "pdl" and args.pdl_alpha > 0:
        counts = complexformer.token_counts(train[1:], 256)
        weights = complexformer.pdl_weights(counts, alpha=args.pdl_alpha)
        w = weights[counts > 0]
        print(f"PDL weights from {len(train) - 1} target bytes ({len(w)} distinct): "
              f"alpha={args.pdl_alpha}, weight range {w.min():.3g} .. {w.max():.3g}")
        return weights
    print("loss: plain cross-entropy")
    return None


@torch.no_grad()
def val_bits_per_byte(model, data, args, gen):
    model.eval()
    tot = 0.0
    for _ in range(args.val_batches):
        x, y = batches(data, args.batch_size, args.seq_len, gen)
        tot += F.cross_entropy(model(x, use_cache=False).logits.flatten(0, 1), y.flatten()).item()
    model.train()
    return tot / args.val_batches / math.log(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--text-file", required=True, help="any UTF-8 text file, at least 1 KiB (bytes are the tokens)")
    ap.add_argument("--max-bytes", type=int, default=0, help="read at most this many bytes (0: all)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per step")
    ap.add_argument("--seq-len", type=int, default=128, help="bytes per window")
    ap.add_argument("--dim", type=int, default=128, help="model width")
    ap.add_argument("--depth", type=int, default=2, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (must divide --dim)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads, grouped-query attention (must divide --heads)")
    ap.add_argument("--attention", default="cmha", choices=["cmha", "rope", "none"],
                    help="cmha: learnable delta/beta; rope: delta=1, beta=0 fixed; none: no positions")
    ap.add_argument("--backend", default="auto", choices=["auto", "fused", "sdpa", "reference"],
                    help="cmha_attention backend")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    ap.add_argument("--loss", default="pdl", choices=["pdl", "ce"], help="training loss")
    ap.add_argument("--pdl-alpha", type=float, default=0.25,
                    help="PDL exponent. The paper's default 1.0 is meant for finetuning a pretrained model; "
                         "from scratch it up-weights rare bytes so much that greedy text fills with them")
    ap.add_argument("--val-batches", type=int, default=4, help="random held-out batches per validation")
    ap.add_argument("--prompt", default="And God said", help="start of the generated text")
    ap.add_argument("--gen-tokens", type=int, default=120, help="bytes to generate")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    args = ap.parse_args()
    dev = check_args(ap, args)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_bytes(args.text_file, args.max_bytes)
    n_val = max(len(data) // 20, args.seq_len + 2)
    if len(data) - n_val < args.seq_len + 2:
        sys.exit(f"error: --text-file {args.text_file}: {len(data)} bytes are too few for --seq-len {args.seq_len} "
                 f"(need about {2 * args.seq_len + 4}: a window to train on and one held out)")
    train, val = data[:-n_val], data[-n_val:]

    config = ComplexFormerConfig(vocab_size=256, hidden_size=args.dim, num_hidden_layers=args.depth,
                                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                 attention=args.attention, attn_backend=args.backend, tie_word_embeddings=True)
    model = ComplexFormerForCausalLM(config).to(dev)
    print(model.model.layers[0].self_attn)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train)} train bytes")
    weights = make_weights(train, args)
    weights = None if weights is None else weights.to(dev)
    # delta / beta (model.cmha_parameters()) get no weight decay: decay would pull the angles to 0, not to RoPE
    angles = {id(p) for p in model.cmha_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in angles], "weight_decay": 0.01},
              {"params": model.cmha_parameters(), "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))

    print(f"val bits/byte before training: {val_bits_per_byte(model, val, args, gen):.3f}")
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train")
    for _ in bar:
        x, y = batches(train, args.batch_size, args.seq_len, gen)
        x, y = x.to(dev), y.to(dev)
        # the loss from the final hidden states and the LM head, fused: the (B, T, 256) logits are never built
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state
        loss = complexformer.causal_lm_pdl_loss(hidden, y, weights, shift=False, lm_head=model.lm_head.weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    dt = time.time() - t0
    tok = args.steps * args.batch_size * args.seq_len
    print(f"trained {args.steps} steps in {dt:.1f}s ({tok / dt:.0f} tokens/s); "
          f"val bits/byte: {val_bits_per_byte(model, val, args, gen):.3f}")

    model.eval()
    prompt = torch.tensor([list(args.prompt.encode())], device=dev)
    t0 = time.time()
    greedy = dict(do_sample=False, pad_token_id=0)
    out = model.generate(prompt, max_new_tokens=args.gen_tokens, **greedy)
    dt = time.time() - t0
    n_check = min(20, args.gen_tokens)  # the cache must not change greedy decoding
    same = torch.equal(out[:, :prompt.shape[1] + n_check],
                       model.generate(prompt, max_new_tokens=n_check, use_cache=False, **greedy))
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(f"greedy, KV cache ({args.gen_tokens} tokens in {dt:.2f}s; first {n_check} match no-cache decoding: {same}):")
    print(repr(text))


if __name__ == "__main__":
    main()
