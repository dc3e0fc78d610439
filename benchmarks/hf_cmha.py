"""A CMHA-converted Hugging Face model against the original model with SDPA attention.

Training step (default): one training step (forward with labels -> HF's causal-LM loss, backward)
of a small random causal LM (``--family``: Llama, Qwen3 or Gemma 3 text) with
attn_implementation="sdpa", and of the same model after ``complexformer.hf.convert_to_cmha``
(delta and beta learnable, attention through CMHA's "auto" backend). Both models hold the same
weights and see the same batch (no padding). Before timing, the converted model's logits are
checked against the original's.

Decoding (``--decode``): greedy ``generate`` of a fixed number of new tokens (min_new_tokens =
max_new_tokens, so every path produces as many) for batch 1 with 64- and 1024-token prompts and
batch 4 with a 512-token prompt, tokens/s of the original model (sdpa) against the converted
model with its training-mode cache (raw keys + positions; from 256 cached keys on, each key is
rotated once into a buffer beside the cache, complexformer/hf/rotated_keys.py, below that the
fused kernel re-rotates the keys at every step) and with its serving-mode cache (``set_cmha_mode(model, "serving")``: rotated keys in
a normal HF cache, attention by torch's SDPA). Before timing, every path's greedy tokens are
compared with the original's; a difference (a near-tie on a random model) is reported, not hidden.
Also timed: one decoding step alone (one token per row on a cache holding the prompt, cropped
back after each step), which leaves the prefill out.

Timing: all paths in one process, round-robin (rep 1 of every path, then rep 2, ...), median (and
min). Extra peak memory: one step / one generate in a fresh process per path (CPU: RSS high-water
mark; CUDA: allocator peak).

    python benchmarks/hf_cmha.py                              # CPU: float32, batch 4, seq 512
    python benchmarks/hf_cmha.py --family qwen3               # the same for Qwen3 (q / k norms)
    python benchmarks/hf_cmha.py --family gemma3_text         # Gemma 3 (sliding-window layers)
    python benchmarks/hf_cmha.py --decode                     # greedy decoding, tokens/s
    python benchmarks/hf_cmha.py --device cuda                # GPU: bfloat16, batch 4, seq 4096
"""
import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import fmt_bytes, markdown_table, peak_bytes, round_robin, run_worker, sync, worker_result  # noqa: E402

PRESETS = {"cpu": dict(dtype="float32", batch=4, seq=512), "cuda": dict(dtype="bfloat16", batch=4, seq=4096)}
BASE = "original-sdpa"
STEP_PATHS = (BASE, "converted-cmha")
DECODE_PATHS = (BASE, "cmha-training", "cmha-serving")
DECODE_CASES = ((1, 64), (1, 1024), (4, 512))  # (batch, prompt tokens)
FAMILIES = ("llama", "qwen3", "gemma3_text")


def config(args):
    """A small random config of ``args.family``: the same widths for every family. Gemma 3 gets
    its local:global layer pattern with a sliding window of a quarter of the sequence, so the
    window binds (the 4-D mask path of the converted model)."""
    from transformers import CONFIG_MAPPING

    kw = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
              max_position_embeddings=max(args.seq, 2048))
    if args.family != "llama":
        kw["head_dim"] = args.hidden // args.heads
    if args.family == "gemma3_text":
        kw.update(query_pre_attn_scalar=kw["head_dim"], sliding_window=max(args.seq // 4, 1),
                  layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                               for i in range(args.layers)])
    cfg = CONFIG_MAPPING[args.family](**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(args, path):
    from transformers import AutoModelForCausalLM

    import complexformer.hf as cfh

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args)).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.train(not args.decode)
    if path != BASE:
        model = cfh.convert_to_cmha(model)
    if path == "cmha-serving":
        cfh.set_cmha_mode(model, "serving", attn_implementation="sdpa")
    return model


def serving_available():
    import complexformer.hf as cfh

    return hasattr(cfh, "set_cmha_mode")


def batch(args, B=None, L=None):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (B or args.batch, L or args.seq), generator=g).to(args.device)


def step_fn(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return step


def generate_fn(args, model, ids):
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, pad_token_id=0)

    @torch.no_grad()
    def gen():
        return model.generate(**kw)[:, ids.shape[1]:]
    return gen


def check(args):
    """Converted logits == original logits (float32 noise; bf16 rounding on the GPU preset)."""
    small = copy.copy(args)
    small.seq, small.batch = min(args.seq, 256), 2
    orig = build(small, BASE).eval()
    conv = build(small, "converted-cmha").eval()
    ids = batch(small)
    with torch.no_grad():
        a, b = orig(ids).logits.float(), conv(ids).logits.float()
    err = ((a - b).abs().max() / a.abs().max()).item()
    tol = 1e-5 if args.dtype == "float32" else 3e-2
    print(f"check: converted vs original logits, max relative error {err:.2e} (tolerance {tol:g})")
    if not err < tol:
        sys.exit("converted model does not reproduce the original: not timing it")


def step_after_prompt(model, ids):
    """One decoding step (one new token per row) on a cache holding the prompt, cropped back after
    each call so that every call sees the same cache length (len(prompt) + 1 keys)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        nxt = model(ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=ids.dtype, device=ids.device)

    @torch.no_grad()
    def step():
        model(nxt, attention_mask=mask, cache=cache, use_cache=True)
        cache.crop(-1)
    return step


def check_tokens(tokens):
    """Print, per path, whether its greedy tokens equal the original's (and where they first differ)."""
    ref = tokens[BASE]
    for p, t in tokens.items():
        if p == BASE:
            continue
        diff = (t != ref).any(0).nonzero()
        if len(diff) == 0:
            print(f"  tokens: {p} == {BASE} ({tuple(t.shape)})")
        else:
            rows = (t != ref).any(1).nonzero().flatten().tolist()
            print(f"  tokens: {p} DIFFERS from {BASE}: rows {rows}, first at new token {int(diff[0])} "
                  "(a near-tie of greedy argmax on a random model; lengths stay equal, timing goes on)")


def worker(payload):
    args = argparse.Namespace(**payload["args"])
    model = build(args, payload["path"])
    if args.decode:
        B, L = payload["case"]
        fn = generate_fn(args, model, batch(args, B, L))
    else:
        fn = step_fn(model, batch(args))
    fn()  # warm-up (allocations, lazy init)
    sync(args.device)
    worker_result({"peak": peak_bytes(fn, device=args.device)})


def peaks_of(args, paths, case=None):
    from tqdm.auto import tqdm

    if args.no_memory:
        return {}
    payload_args = {k: v for k, v in vars(args).items() if k != "_worker"}
    return {p: run_worker(__file__, {"args": payload_args, "path": p, "case": case})["peak"]
            for p in tqdm(paths, desc="peak memory (fresh process per path)")}


def run_step(args):
    check(args)
    ids = batch(args)
    steps = {p: step_fn(build(args, p), ids) for p in STEP_PATHS}
    for s in steps.values():
        s()
    times = round_robin(steps, args.reps, args.device, "timing (round-robin)")
    del steps
    peaks = peaks_of(args, STEP_PATHS)
    ms = {p: statistics.median(v) for p, v in times.items()}
    base = ms[BASE]
    rows = [[p, f"{ms[p]:.1f}", f"{min(times[p]):.1f}", f"{base / ms[p]:.2f}", fmt_bytes(peaks.get(p))]
            for p in STEP_PATHS]
    print(markdown_table(["path", "fwd+bwd ms (median)", "min ms", f"speed vs {BASE}", "extra peak memory"], rows))
    print(f"converted / original speed: {base / ms['converted-cmha']:.3f}x")


def run_decode(args):
    paths = list(DECODE_PATHS)
    if not serving_available():
        paths.remove("cmha-serving")
        print("note: complexformer.hf has no set_cmha_mode in this checkout: the serving-mode path is skipped")
    models = {p: build(args, p) for p in paths}
    rows, summary = [], []
    for B, L in args.cases:
        print(f"batch {B}, prompt {L}, {args.new_tokens} new tokens:")
        ids = batch(args, B, L)
        gens = {p: generate_fn(args, m, ids) for p, m in models.items()}
        check_tokens({p: g() for p, g in gens.items()})  # also the warm-up
        times = round_robin(gens, args.reps, args.device, "  timing (round-robin)")
        steps = {p: step_after_prompt(m, ids) for p, m in models.items()}
        for f in steps.values():
            f()
        step_ms = round_robin(steps, args.step_reps, args.device, "  one decoding step (round-robin)")
        peaks = peaks_of(args, paths, (B, L))
        tps = {p: B * args.new_tokens / (statistics.median(v) / 1e3) for p, v in times.items()}
        sms = {p: statistics.median(v) for p, v in step_ms.items()}
        for p in paths:
            rows.append([B, L, p, f"{tps[p]:.1f}", f"{B * args.new_tokens / (min(times[p]) / 1e3):.1f}",
                         f"{tps[p] / tps[BASE]:.3f}", f"{sms[p]:.2f} / {min(step_ms[p]):.2f}",
                         f"{sms[BASE] / sms[p]:.3f}", fmt_bytes(peaks.get(p))])
        summary.append(f"batch {B}, prompt {L}: " + ", ".join(
            f"{p} {tps[p] / tps[BASE]:.3f}x (one step {sms[BASE] / sms[p]:.3f}x)" for p in paths if p != BASE))
    print(markdown_table(["batch", "prompt", "path", "tokens/s (median)", "tokens/s (best)", f"vs {BASE}",
                          "one step ms (median / min)", f"step speed vs {BASE}", "extra peak memory"], rows))
    print("\n".join(summary))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", default="llama", choices=FAMILIES)
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
    ap.add_argument("--decode", action="store_true", help="time greedy generate (tokens/s) instead of a training step")
    ap.add_argument("--new-tokens", type=int, default=64, help="--decode: tokens generated per call")
    ap.add_argument("--step-reps", type=int, default=50, help="--decode: timed single decoding steps per path")
    ap.add_argument("--cases", default=None,
                    help="--decode: batch x prompt cases, e.g. '1x64,4x512' (default: 1x64,1x1024,4x512)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        import json

        return worker(json.loads(args._worker))
    preset = PRESETS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.cases = (DECODE_CASES if args.cases is None else
                  [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")])
    if args.decode:  # positions up to the longest prompt + the new tokens
        args.seq = max(args.seq, max(L for _, L in args.cases) + args.new_tokens)
    import transformers

    what = (f"greedy generate, {args.new_tokens} new tokens" if args.decode
            else f"batch {args.batch}, seq {args.seq}, forward + backward")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}; {args.family} {args.layers} layers, hidden {args.hidden}, heads "
          f"{args.heads}/{args.kv_heads} (head_dim {args.hidden // args.heads}), vocab {args.vocab}; "
          f"{args.dtype}, {what}")
    return run_decode(args) if args.decode else run_step(args)


if __name__ == "__main__":
    main()
