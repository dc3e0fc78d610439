"""Train a small causal LM on a text file with the Power-Law Decay Loss (PDL), on CPU, no downloads.

    python examples/finetune_pdl.py --text-file my_corpus.txt --max-steps 300
    python examples/finetune_pdl.py --text-file my_corpus.txt --alpha 0.5 --max-weight 100 --compare-ce

Steps: train a byte-level BPE tokenizer on the file (the `tokenizers` library), pack lines into
ragged examples that end in EOS, count the label tokens the loss will see
(complexformer.hf.label_token_counts), turn the counts into weights
(complexformer.pdl_weights: w = (count + eps)^-alpha), and train a tiny GPT-2 built from a config
with complexformer.hf.PDLTrainer. At the end it prints, on held-out text, the plain (unweighted)
cross-entropy, perplexity and next-token accuracy for frequent / middle / rare target tokens.
`--compare-ce` trains the same model from the same initialisation with alpha = 0 (plain
cross-entropy) and prints both side by side.

What to expect: the model here starts from scratch, and at alpha = 1 PDL makes every seen token type
count about equally, so the model is slow to learn even the frequent tokens. Beside `--compare-ce`'s
cross-entropy run, PDL at alpha = 1 then has a much higher held-out CE and can be worse in every
bucket, rare tokens included (examples/README.md). PDL is meant for finetuning a model that already
knows the frequent tokens: there, at alpha 0.25-0.5, it trades some perplexity for rare-token
accuracy (`python -m complexformer.experiment`, benchmarks/RESULTS.md). A smaller --alpha flattens
the weights here too.
"""
import argparse
import math
import os
import sys
import tempfile
import time

import torch

from complexformer.lab.train import HelpFormatter


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--text-file", required=True, help="UTF-8 text, one paragraph/verse per line")
    p.add_argument("--max-lines", type=int, default=None, help="use only the first N non-empty lines")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (special tokens included)")
    p.add_argument("--seq-len", type=int, default=128, help="max tokens per packed example")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of the examples held out")
    p.add_argument("--alpha", type=float, default=1.0, help="PDL exponent; 0 = plain cross-entropy")
    p.add_argument("--eps", type=float, default=1e-7, help="PDL weights are (count + eps)^-alpha")
    p.add_argument("--max-weight", type=float, default=None, help="clip weights (guards unseen targets)")
    p.add_argument("--compare-ce", action="store_true", help="also train with alpha=0 from the same init")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--n-layer", type=int, default=2, help="GPT-2 layers")
    p.add_argument("--n-embd", type=int, default=128, help="GPT-2 width")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (must divide --n-embd)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, split and data-order seed")
    p.add_argument("--output-dir", default=None, help="Trainer output dir (default: a temp dir; nothing is saved)")
    args = p.parse_args()
    for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "n_layer", "n_embd", "n_head"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    if args.max_lines is not None and args.max_lines < 2:
        p.error(f"--max-lines must be at least 2 (one line to train on, one held out), got {args.max_lines}")
    if args.seq_len < 2:
        p.error(f"--seq-len must be at least 2 (a token and the EOS after it), got {args.seq_len}")
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval-fraction must lie in (0, 1), got {args.eval_fraction}")
    if args.alpha < 0:
        p.error(f"--alpha must be >= 0, got {args.alpha}")
    if args.n_embd % args.n_head:
        p.error(f"--n-head {args.n_head} must divide --n-embd {args.n_embd}")
    return args


def read_lines(path, max_lines):
    """The file's non-empty lines (stripped), or exit with a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except FileNotFoundError:
        sys.exit(f"error: --text-file {path}: no such file")
    except IsADirectoryError:
        sys.exit(f"error: --text-file {path}: is a directory, not a text file")
    except UnicodeDecodeError as e:
        sys.exit(f"error: --text-file {path}: not UTF-8 text ({e.reason} at byte {e.start})")
    if not lines:
        sys.exit(f"error: --text-file {path}: no text (the file is empty or has only blank lines)")
    return lines[:max_lines] if max_lines else lines


EOS = "<|endoftext|>"


def build_tokenizer(lines, vocab_size):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=True)
    return tok


def pack(lines, tok, seq_len):
    """Consecutive lines, each followed by EOS, packed greedily into examples of <= seq_len tokens.
    Lengths differ from example to example: the collator pads them (labels -100)."""
    eos = tok.token_to_id(EOS)
    examples, cur = [], []
    for enc in tok.encode_batch(lines):
        ids = enc.ids[: seq_len - 1] + [eos]
        if cur and len(cur) + len(ids) > seq_len:
            examples.append(cur)
            cur = []
        cur = cur + ids
    if cur:
        examples.append(cur)
    return [{"input_ids": e, "labels": list(e)} for e in examples]


def collate(features):
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def frequency_buckets(counts):
    """Token ids split by training frequency: 'frequent' covers the top 50% of target occurrences,
    'rare' the ids outside the top 90% (never-seen ids included), 'middle' the rest."""
    order = torch.argsort(counts, descending=True)
    cum = torch.cumsum(counts[order].double(), 0) / counts.sum()
    bucket = torch.empty_like(counts)
    bucket[order] = torch.where(cum <= 0.5, 0, torch.where(cum <= 0.9, 1, 2))
    return bucket  # 0 frequent, 1 middle, 2 rare


@torch.no_grad()
def evaluate(model, examples, bucket, batch_size=32):
    """Unweighted next-token CE and accuracy on held-out examples, overall and per frequency bucket."""
    model.eval()
    nll = torch.zeros(3, dtype=torch.float64)
    correct = torch.zeros(3, dtype=torch.float64)
    n = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i: i + batch_size])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        y = b["labels"][:, 1:]
        keep = y != -100
        z, y = logits[keep].double(), y[keep]
        tok_nll = torch.nn.functional.cross_entropy(z, y, reduction="none")
        hit = (z.argmax(-1) == y).double()
        k = bucket[y]
        nll.index_add_(0, k, tok_nll)
        correct.index_add_(0, k, hit)
        n.index_add_(0, k, torch.ones_like(hit))
    return {
        "ce": (nll.sum() / n.sum()).item(),
        "acc": (correct.sum() / n.sum()).item(),
        "acc_by_bucket": (correct / n.clamp(min=1)).tolist(),
        "tokens_by_bucket": n.long().tolist(),
    }


def train_one(name, weights, init_state, cfg, train, args, out_dir):
    from transformers import GPT2LMHeadModel, TrainingArguments

    from complexformer.hf import PDLTrainer

    model = GPT2LMHeadModel(cfg)
    model.load_state_dict(init_state)
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, name), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.01, max_grad_norm=1.0, logging_steps=max(1, args.max_steps // 10),
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, dataloader_num_workers=0,
    )
    trainer = PDLTrainer(model=model, args=targs, train_dataset=train, data_collator=collate, pdl_weights=weights)
    t0 = time.perf_counter()
    out = trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"[{name}] {args.max_steps} steps in {time.perf_counter() - t0:.1f} s; training loss (weighted "
          f"mean): first logged {logged[0]:.4f}, last logged {logged[-1]:.4f}, mean {out.training_loss:.4f}")
    return model


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    lines = read_lines(args.text_file, args.max_lines)
    print(f"{len(lines)} lines from {args.text_file}")

    tok = build_tokenizer(lines, args.vocab_size)
    vocab = tok.get_vocab_size()  # special tokens included: the model's output size
    examples = pack(lines, tok, args.seq_len)
    if len(examples) < 2:
        sys.exit(f"error: --text-file {args.text_file}: its {len(lines)} line(s) pack into {len(examples)} example "
                 f"of <= {args.seq_len} tokens; need at least 2 (one to train on, one held out): give more "
                 f"lines or a smaller --seq-len")

    from transformers import GPT2Config, GPT2LMHeadModel

    import complexformer
    from complexformer.hf import label_token_counts

    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    n_eval = max(1, int(len(examples) * args.eval_fraction))
    eval_set = [examples[i] for i in perm[:n_eval]]
    train = [examples[i] for i in perm[n_eval:]]
    print(f"vocab {vocab}, {len(train)} train / {len(eval_set)} eval examples of <= {args.seq_len} tokens")

    # Count exactly what the loss sees: shifted labels (EOS included), padding excluded.
    counts = label_token_counts(train, vocab)
    weights = complexformer.pdl_weights(counts, alpha=args.alpha, eps=args.eps, max_weight=args.max_weight)
    seen = counts > 0
    print(f"{int(counts.sum())} label tokens, {int(seen.sum())}/{vocab} ids seen; "
          f"weights of seen ids in [{weights[seen].min().item():.3g}, {weights[seen].max().item():.3g}] "
          f"(alpha={args.alpha}, unseen ids get {weights[~seen].max().item() if (~seen).any() else float('nan'):.3g})")

    cfg = GPT2Config(vocab_size=vocab, n_positions=args.seq_len, n_layer=args.n_layer, n_embd=args.n_embd,
                     n_head=args.n_head, bos_token_id=tok.token_to_id(EOS), eos_token_id=tok.token_to_id(EOS))
    init_state = {k: v.clone() for k, v in GPT2LMHeadModel(cfg).state_dict().items()}
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="finetune_pdl_")
    bucket = frequency_buckets(counts)

    runs = [(f"pdl alpha={args.alpha}", weights)]
    if args.compare_ce and args.alpha != 0:
        runs.append(("ce (alpha=0)", complexformer.pdl_weights(counts, alpha=0.0)))
    results = {}
    for name, w in runs:
        model = train_one(name.split()[0], w, init_state, cfg, train, args, out_dir)
        results[name] = evaluate(model, eval_set, bucket)

    print("\nheld-out next-token metrics (CE is unweighted; buckets by training frequency: frequent ids "
          "cover 50% of targets, rare ids lie outside the top 90%)")
    print(f"{'run':<16}{'CE':>8}{'ppl':>9}{'acc':>8}{'freq':>8}{'middle':>8}{'rare':>8}")
    for name, r in results.items():
        a = r["acc_by_bucket"]
        print(f"{name:<16}{r['ce']:>8.3f}{math.exp(r['ce']):>9.1f}{r['acc']:>8.3f}{a[0]:>8.3f}{a[1]:>8.3f}{a[2]:>8.3f}")
    print(f"eval tokens per bucket: {next(iter(results.values()))['tokens_by_bucket']}")


if __name__ == "__main__":
    main()
