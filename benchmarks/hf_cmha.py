"""A CMHA-converted Hugging Face Llama against the original model with SDPA attention.

What is measured: one training step (forward with labels -> HF's causal-LM loss, backward) of a
small random LlamaForCausalLM with attn_implementation="sdpa", and of the same model after
``complexformer.hf.convert_to_cmha`` (delta and beta learnable, attention through CMHA's "auto"
backend). Both models hold the same weights and see the same batch (no padding). Timing: both
paths in one process, round-robin (rep 1 of every path, then rep 2, ...), median ms. Extra peak
memory: one step in a fresh process per path (CPU: RSS high-water mark; CUDA: allocator peak).
Before timing, the converted model's logits are checked against the original's.

    python benchmarks/hf_cmha.py                              # CPU: float32, batch 4, seq 512
    python benchmarks/hf_cmha.py --device cuda                # GPU: bfloat16, batch 4, seq 4096
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import fmt_bytes, markdown_table, peak_bytes, run_worker, sync, worker_result  # noqa: E402

PRESETS = {"cpu": dict(dtype="float32", batch=4, seq=512), "cuda": dict(dtype="bfloat16", batch=4, seq=4096)}
PATHS = ("original-sdpa", "converted-cmha")


def build(args, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from complexformer.hf import convert_to_cmha

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 2048))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).train()
    if path == "converted-cmha":
        model = convert_to_cmha(model)
    return model


def batch(args):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)


def step_fn(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return step


def check(args):
    """Converted logits == original logits (float32 noise; bf16 rounding on the GPU preset)."""
    small = copy.copy(args)
    small.seq, small.batch = min(args.seq, 256), 2
    orig = build(small, "original-sdpa").eval()
    conv = build(small, "converted-cmha").eval()
    ids = batch(small)
    with torch.no_grad():
        a, b = orig(ids).logits.float(), conv(ids).logits.float()
    err = ((a - b).abs().max() / a.abs().max()).item()
    tol = 1e-5 if args.dtype == "float32" else 3e-2
    print(f"check: converted vs original logits, max relative error {err:.2e} (tolerance {tol:g})")
    if not err < tol:
        sys.exit("converted model does not reproduce the original: not timing it")


def worker(payload):
    args = argparse.Namespace(**payload["args"])
    model = build(args, payload["path"])
    ids = batch(args)
    step = step_fn(model, ids)
    step()  # warm-up (allocations, lazy init)
    sync(args.device)
    worker_result({"peak": peak_bytes(step, device=args.device)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        import json

        return worker(json.loads(args._worker))
    preset = PRESETS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}; Llama {args.layers} layers, hidden {args.hidden}, heads "
          f"{args.heads}/{args.kv_heads} (head_dim {args.hidden // args.heads}), vocab {args.vocab}; "
          f"{args.dtype}, batch {args.batch}, seq {args.seq}, forward + backward")
    check(args)

    from tqdm.auto import tqdm

    ids = batch(args)
    steps = {p: step_fn(build(args, p), ids) for p in PATHS}
    for s in steps.values():
        s()
    times = {p: [] for p in PATHS}
    for _ in tqdm(range(args.reps), desc="timing (round-robin)"):
        for p, s in steps.items():
            sync(args.device)
            t = time.perf_counter()
            s()
            sync(args.device)
            times[p].append((time.perf_counter() - t) * 1e3)
    ms = {p: statistics.median(v) for p, v in times.items()}
    del steps
    peaks = {}
    if not args.no_memory:
        payload_args = {k: v for k, v in vars(args).items() if k != "_worker"}
        for p in tqdm(PATHS, desc="peak memory (fresh process per path)"):
            peaks[p] = run_worker(__file__, {"args": payload_args, "path": p})["peak"]
    base = ms["original-sdpa"]
    rows = [[p, f"{ms[p]:.1f}", f"{base / ms[p]:.2f}", fmt_bytes(peaks.get(p))] for p in PATHS]
    print(markdown_table(["path", "fwd+bwd ms (median)", "speed vs original-sdpa", "extra peak memory"], rows))
    print(f"converted / original speed: {base / ms['converted-cmha']:.3f}x")


if __name__ == "__main__":
    main()
