"""The comparison grid: does CMHA beat RoPE, and does PDL finetuning help rare tokens and diversity?

    python -m complexformer.experiment                  # quick: 1 seed, about 8 CPU-minutes
    python -m complexformer.experiment --full           # 3 seeds, mean +- std, 3x as long
    python -m complexformer.experiment --device cuda --out runs/gpu

On the embedded corpus (``complexformer.lab.data``), with the training function of
``complexformer.lab.train`` and one BPE tokenizer trained on the pretraining split:

1. Position schemes. The same model (``ComplexFormerForCausalLM``) with attention "cmha" (the
   authors' init, and started as RoPE with delta = 1), "rope" and "none" (no position signal),
   and the ablations that ask what in CMHA helps, each one ``ComplexFormerConfig`` field: CMHA with
   delta fixed at 0 (rotation by beta + omega p only), CMHA with learnable frequencies, RoPE with
   learnable per-head frequencies (AdaRoPE-like) and partial RoPE (a quarter of the pairs rotated).
   Same initialisation seed, data order and steps, pretrained with CE on the narrative part
   (Genesis to Judges). Held-out perplexity at 1x, 2x, 4x and 8x the training length (length
   extrapolation), parameter count and training throughput.
2. Finetuning. The CMHA model from (1) is finetuned on a different register, the poetry part
   (Psalms, Proverbs), with CE, with PDL at a few alphas, and at alpha = 1 with the weights capped
   (``max_weight``), from the same weights, with the same data order. Held-out perplexity, top-1
   accuracy per token-frequency quartile of the finetuning data (Q1 = the rarest quarter of the
   token ids: the "rare-token recall"), and distinct-1/2 of greedy and sampled continuations of
   held-out prompts.

Output: tables on stdout, ``results.json`` (every run, per seed, and the mean/std) and PNG plots in
``--out`` (default runs/experiment): training curves (pretraining CE; finetuning: held-out
unweighted CE, the same quantity for CE and PDL), the PDL weight curves, accuracy per frequency
quartile, perplexity against evaluation length, and perplexity against rare-quartile accuracy.
Each run's result is kept in ``--out/runs/seed<N>/`` as it finishes: a rerun with the same
``--out`` and settings redoes only what is missing.
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import torch

from ..counts import pdl_weights, token_counts
from . import data as cfdata
from .metrics import distinct_n, evaluate_lm, frequency_quartiles, generate
from .runs import RUN_FILE, check_run_dir, load_checkpoint, prepare_out, save_checkpoint, write_atomic, write_json
from .train import (HelpFormatter, build_model, choose_threads, nonnegative_float, positive_float, positive_int,
                    resolve_device,
                    run_cli, train)

# The quick grid is sized for a few minutes on a 2-core CPU (3-5 measured, see benchmarks/RESULTS.md);
# --full repeats it for 3 seeds.
DEFAULTS = dict(pretrain_steps=400, finetune_steps=150, batch_size=16, seq_len=128, lr=3e-3, finetune_lr=1e-3,
                hidden_size=128, num_layers=2, num_heads=4, vocab_size=1024, alphas=(0.25, 0.5, 1.0),
                max_weights=(1e-2, 1e-3), extrapolation=(1, 2, 4, 8),
                prompts=48, prompt_len=16, new_tokens=32, temperature=1.0, finetune_eval_every=10)


# (row, attention, extra config): CMHA with the authors' init (delta ~ N(0, 1/sqrt(d/2)), so the
# semantic angle starts almost switched off), CMHA started as RoPE (delta = 1), RoPE, no position
POSITION_RUNS = (("cmha", "cmha", {}), ("cmha, delta=1 init", "cmha", {"delta_init": "rope"}),
                 ("rope", "rope", {}), ("none", "none", {}),
                 # ablations (ComplexFormerConfig fields, docs/design.md "Ablations"): what in CMHA helps?
                 ("cmha, delta=0 fixed", "cmha", {"fixed_delta": 0.0}),
                 ("cmha, learnable freqs", "cmha", {"learnable_freqs": True}),
                 ("rope, learnable freqs", "rope", {"learnable_freqs": True}),
                 ("rope, 1/4 of pairs rotated", "rope", {"rotary_fraction": 0.25}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m complexformer.experiment", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--full", action="store_true", help="3 seeds (0, 1, 2), mean +- std")
    p.add_argument("--seeds", type=int, nargs="+", help="explicit seeds (default: 0, or 0 1 2 with --full)")
    p.add_argument("--steps", type=positive_int, default=DEFAULTS["pretrain_steps"],
                   help=f"pretraining steps; finetuning takes {DEFAULTS['finetune_steps']}/"
                        f"{DEFAULTS['pretrain_steps']} of it")
    p.add_argument("--alphas", type=nonnegative_float, nargs="+", default=list(DEFAULTS["alphas"]), help="PDL exponents")
    p.add_argument("--max-weights", type=positive_float, nargs="*", default=list(DEFAULTS["max_weights"]),
                   help="PDL weight caps tried at alpha = 1 (weights are count^-1 <= 1: a cap 1/c weighs "
                        "every token rarer than c occurrences as one of c)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: one per physical core not busy with other work)")
    p.add_argument("--out", default="runs/experiment", metavar="DIR",
                   help="where results.json and the plots go; each run's result is kept there as it finishes, "
                        "and a rerun with the same --out and settings skips the finished runs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def _require_plotting():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the experiment's plots need matplotlib: pip install 'complexformer[experiment]'") from None
    return plt


def _machine(dev):
    m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
         "device": str(dev)}
    if dev.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(dev)
    return m


def _continuations(model, tok, prompts, cfg, seed, context):
    """Decoded greedy and sampled continuations of the prompts."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for mode, kw in (("greedy", {}), ("sampled", {"do_sample": True, "temperature": cfg["temperature"],
                                                  "generator": gen})):
        new = generate(model, prompts, cfg["new_tokens"], context=context, **kw)
        out[mode] = [tok.decode(row.tolist()) for row in new]
    return out


def _saved_run(directory, kind, name):
    """(path, result or None): one run's result file in ``directory``; None until the run finished."""
    path = os.path.join(directory, f"{kind}-{re.sub(r'[^A-Za-z0-9.=-]+', '_', name)}.json")
    if not os.path.isfile(path):
        return path, None
    with open(path) as f:
        return path, json.load(f)


def run_seed(seed, cfg, corpora, tok, dev, progress, directory=None):
    """Both experiments for one seed; returns (position_runs, finetune_runs, finetuning counts).

    ``directory``: each run's result is written there (atomically) as it finishes, and a run whose
    result is there already is not run again (the pretrained CMHA weights are kept for finetuning)."""
    pre_train, pre_val, ft_train, ft_val = corpora
    L = cfg["seq_len"]
    common = dict(batch_size=cfg["batch_size"], seq_len=L, seed=seed, progress=progress)
    skipped = []
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    weights_path = None if directory is None else os.path.join(directory, "pretrained-cmha.pt")

    def cached(kind, name):
        if directory is None:
            return None, None
        path, result = _saved_run(directory, kind, name)
        if result is not None:
            skipped.append(name)
        return path, result

    position, pretrained = {}, None
    for name, att, extra in POSITION_RUNS:
        path, result = cached("position", name)
        if result is not None:
            position[name] = result
            continue
        model = build_model(tok.vocab_size, att, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                            num_heads=cfg["num_heads"], seed=seed, device=dev, **extra)
        hist = train(model, pre_train, steps=cfg["pretrain_steps"], lr=cfg["lr"], desc=f"pretrain {name} s{seed}",
                     **common)
        position[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "val": evaluate_lm(model, *cfdata.sequential_windows(pre_val, L)),
            # held-out perplexity at k times the training length (every window scored whole)
            "extrapolation": {str(k): evaluate_lm(model, *cfdata.sequential_windows(pre_val, k * L),
                                                  batch_size=max(1, 16 // k))["ppl"] for k in cfg["extrapolation"]},
            "tokens_per_s": hist["tokens_per_s"], "seconds": hist["seconds"], "loss": hist["loss"],
        }
        if name == "cmha":
            pretrained = model
            if directory is not None:  # before its result: a finished "cmha" run always has its weights
                save_checkpoint(weights_path, model.state_dict())
        if directory is not None:
            write_json(path, position[name])

    # finetuning on the other register, all from the same CMHA weights and data order
    counts = token_counts(ft_train[1:], tok.vocab_size)
    buckets = frequency_quartiles(counts)
    vx, vy = cfdata.sequential_windows(ft_val, L)
    starts = torch.linspace(0, len(ft_val) - cfg["prompt_len"] - 1, cfg["prompts"]).long()
    prompts = torch.stack([ft_val[s:s + cfg["prompt_len"]] for s in starts.tolist()])
    runs = [("pretrained (no finetune)", None, 0.0, None), ("CE", "ce", 0.0, None)]
    runs += [(f"PDL alpha={a:g}", "pdl", a, None) for a in cfg["alphas"]]
    runs += [(f"PDL alpha=1, max_weight={w:g}", "pdl", 1.0, w) for w in cfg["max_weights"]]
    finetune = {}
    for name, loss, alpha, max_weight in runs:
        path, result = cached("finetune", name)
        if result is not None:
            finetune[name] = result
            continue
        if pretrained is None:  # pretrained by an earlier, interrupted invocation
            pretrained = build_model(tok.vocab_size, "cmha", hidden_size=cfg["hidden_size"],
                                     num_layers=cfg["num_layers"], num_heads=cfg["num_heads"], seed=seed, device=dev)
            pretrained.load_state_dict(load_checkpoint(weights_path))
            pretrained.eval()
        model = type(pretrained)(pretrained.config).to(dev)
        model.load_state_dict(pretrained.state_dict())
        hist, last = None, {}

        def held_out_ce(m):
            last["ev"] = evaluate_lm(m, vx, vy, buckets=buckets)
            return last["ev"]["ce"]

        if loss is not None:
            # held-out plain CE along the way: the one loss that compares CE with PDL (whose training
            # loss is weighted); the evaluation after the last step is the table's
            hist = train(model, ft_train, loss=loss, alpha=alpha, max_weight=max_weight, steps=cfg["finetune_steps"],
                         lr=cfg["finetune_lr"],
                         warmup=max(1, cfg["finetune_steps"] // 20), desc=f"finetune {name} s{seed}",
                         evaluate=held_out_ce, eval_every=cfg["finetune_eval_every"], **common)
        ev = last["ev"] if hist is not None else evaluate_lm(model, vx, vy, buckets=buckets)
        texts = _continuations(model, tok, prompts, cfg, seed, L)
        finetune[name] = {
            "loss": loss, "alpha": alpha, "max_weight": max_weight, "val": ev,
            "rare_acc": ev["acc_by_bucket"][0],
            "distinct": {m: {"d1": distinct_n(t, 1), "d2": distinct_n(t, 2)} for m, t in texts.items()},
            "samples": {m: t[:3] for m, t in texts.items()},
            "train_loss": None if hist is None else hist["loss"],
            "val_ce_curve": None if hist is None else hist["eval"],
        }
        if directory is not None:
            write_json(path, finetune[name])
    if skipped:
        print(f"seed {seed}: kept the finished runs {skipped} from {directory}", flush=True)
    return position, finetune, counts


def _stat(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


POSITION_COLS = [("params", lambda r: r["parameters"], "{:.0f}"),
                 ("val ppl", lambda r: r["val"]["ppl"], "{:.2f}"),
                 ("ppl @2x len", lambda r: r["extrapolation"]["2"], "{:.2f}"),
                 ("@4x", lambda r: r["extrapolation"]["4"], "{:.2f}"),
                 ("@8x", lambda r: r["extrapolation"]["8"], "{:.2f}"),
                 ("tokens/s", lambda r: r["tokens_per_s"], "{:.0f}")]
FINETUNE_COLS = [("val ppl", lambda r: r["val"]["ppl"], "{:.2f}"),
                 ("acc", lambda r: r["val"]["acc"], "{:.4f}"),
                 ("rare acc (Q1)", lambda r: r["val"]["acc_by_bucket"][0], "{:.4f}"),
                 ("Q2", lambda r: r["val"]["acc_by_bucket"][1], "{:.4f}"),
                 ("Q3", lambda r: r["val"]["acc_by_bucket"][2], "{:.4f}"),
                 ("Q4 (freq)", lambda r: r["val"]["acc_by_bucket"][3], "{:.4f}"),
                 ("d1 greedy", lambda r: r["distinct"]["greedy"]["d1"], "{:.3f}"),
                 ("d2 greedy", lambda r: r["distinct"]["greedy"]["d2"], "{:.3f}"),
                 ("d1 sampled", lambda r: r["distinct"]["sampled"]["d1"], "{:.3f}"),
                 ("d2 sampled", lambda r: r["distinct"]["sampled"]["d2"], "{:.3f}")]


def summarise(per_seed, key, cols):
    """{row: {column: {mean, std, n}}} over seeds for one experiment ("position" or "finetune")."""
    rows = per_seed[0][key].keys()
    return {row: {c: _stat([f(s[key][row]) for s in per_seed]) for c, f, _ in cols} for row in rows}


def format_table(summary, cols, first="run"):
    """A Markdown table; 'mean ± std' cells when there is more than one seed."""
    fmt = dict((c, f) for c, _, f in cols)
    head = [first] + [c for c, _, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in summary.items():
        out = [row]
        for c, _, _ in cols:
            s = cells[c]
            cell = fmt[c].format(s["mean"])
            if s["n"] > 1:
                cell += " ± " + fmt[c].format(s["std"])
            out.append(cell)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def _smooth(y, k=21):
    """Centred moving average over ``k`` points (fewer at the ends, where the window is cut off):
    one value per step, so the curve covers every step and is not shifted."""
    h = max(0, min(k, len(y) // 5) // 2)
    t = torch.tensor(y, dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)])
    i = torch.arange(len(y))
    lo, hi = (i - h).clamp(min=0), (i + h + 1).clamp(max=len(y))
    return ((c[hi] - c[lo]) / (hi - lo)).tolist()


# Distinct line styles and offset markers: "cmha, delta=1 init" follows "rope" closely and would
# hide under it with solid lines alone
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _styled(i, n_points):
    every = max(1, n_points // 8)
    return dict(linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                markevery=(i * every // 4 % every, every))


def _seeds_note(per_seed):
    seeds = [s["seed"] for s in per_seed]
    return f"1 seed ({seeds[0]})" if len(seeds) == 1 else f"mean of {len(seeds)} seeds ({', '.join(map(str, seeds))})"


def _save_figure(fig, path):
    """Lay out, write atomically and close: every plot's last step."""
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    _require_plotting().close(fig)


def _binomial_se(p, n):
    """The binomial standard error of an accuracy p over n targets (the one-seed error bar)."""
    return (p * (1 - p) / n) ** 0.5


def _plot_curves(per_seed, path):
    plt = _require_plotting()
    s0 = per_seed[0]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (att, r) in enumerate(s0["position"].items()):
        y = _smooth(r["loss"])
        ax[0].plot(range(1, len(y) + 1), y, label=f"{att} (end {y[-1]:.3f})", **_styled(i, len(y)))
    ax[0].set(title=f"pretraining (narrative), seed {s0['seed']}", xlabel="step",
              ylabel="training CE (centred moving mean)")
    base = s0["finetune"].get("pretrained (no finetune)")
    if base is not None:
        ax[1].axhline(base["val"]["ce"], color="gray", linewidth=1, label="pretrained (no finetune)")
    runs = [(n, r) for n, r in s0["finetune"].items() if r.get("val_ce_curve")]
    for i, (name, r) in enumerate(runs):
        steps, ce = zip(*r["val_ce_curve"])
        ax[1].plot(steps, ce, label=f"{name} (end {ce[-1]:.3f})", **_styled(i, len(steps)))
    ax[1].set(title=f"finetuning (poetry), seed {s0['seed']}", xlabel="step",
              ylabel="held-out CE (unweighted, all runs)")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    _save_figure(fig, path)


def _plot_weights(counts, alphas, path):
    plt = _require_plotting()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    c = counts[counts > 0].double().sort(descending=True).values
    rank = torch.arange(1, len(c) + 1)
    for a in alphas:
        w = pdl_weights(c, alpha=a).double()
        ax.loglog(rank.tolist(), (w / w.min()).tolist(), label=f"alpha={a:g}")
    ax.set(title="PDL weight by token rank (finetuning data)", xlabel="token rank (by count)",
           ylabel="weight / weight of the most frequent token")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save_figure(fig, path)


def _plot_buckets(per_seed, path):
    """Mean accuracy per quartile; error bars: the std over seeds, or with one seed the binomial
    standard error of the held-out targets in the quartile (Q1 has only a few hundred)."""
    plt = _require_plotting()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = list(per_seed[0]["finetune"].keys())
    width = 0.8 / len(names)
    n = torch.tensor(per_seed[0]["finetune"][names[0]]["val"]["tokens_by_bucket"], dtype=torch.float64)
    for i, name in enumerate(names):
        accs = torch.tensor([s["finetune"][name]["val"]["acc_by_bucket"] for s in per_seed], dtype=torch.float64)
        mean = accs.mean(0)
        err = accs.std(0) if len(per_seed) > 1 else _binomial_se(mean, n.clamp(min=1))
        ax.bar([q + i * width for q in range(4)], mean.tolist(), width, yerr=err.tolist(), capsize=2, label=name)
    quart = ["Q1 (rare)", "Q2", "Q3", "Q4 (frequent)"]
    ax.set_xticks([q + 0.4 - width / 2 for q in range(4)],
                  [f"{q}\n{int(k)} targets" for q, k in zip(quart, n.tolist())])
    bars = "std over seeds" if len(per_seed) > 1 else "binomial standard error"
    ax.set(title=f"held-out top-1 accuracy by token frequency quartile\n{_seeds_note(per_seed)}; "
                 f"error bars: {bars}", ylabel="accuracy")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def _mean_err(values):
    """(mean, error bar): the std over seeds (0 with one seed)."""
    s = _stat(values)
    return s["mean"], s["std"]


def _plot_extrapolation(per_seed, path):
    """Held-out perplexity against evaluation length (multiples of the training length), one line
    per position scheme; error bars: std over seeds."""
    plt = _require_plotting()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(per_seed[0]["position"]):
        ks = list(per_seed[0]["position"][name]["extrapolation"])
        stats = [_mean_err([s["position"][name]["extrapolation"][k] for s in per_seed]) for k in ks]
        ax.errorbar([int(k) for k in ks], [m for m, _ in stats], yerr=[e for _, e in stats], capsize=3,
                    label=name, linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=f"length extrapolation (narrative, held out); {_seeds_note(per_seed)}",
           xlabel="evaluation length / training length", ylabel="held-out perplexity (log scale)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _save_figure(fig, path)


def _plot_tradeoff(per_seed, path):
    """PDL's trade-off: held-out perplexity against rare-quartile (Q1) accuracy, one point per
    finetuning setting; error bars: std over seeds in both directions, or with one seed the
    binomial standard error of the Q1 accuracy (as in bucket_accuracy.png)."""
    plt = _require_plotting()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(per_seed[0]["finetune"]):
        x = _mean_err([s["finetune"][name]["rare_acc"] for s in per_seed])
        y = _mean_err([s["finetune"][name]["val"]["ppl"] for s in per_seed])
        if len(per_seed) == 1:
            n = max(1, per_seed[0]["finetune"][name]["val"]["tokens_by_bucket"][0])
            x = (x[0], _binomial_se(x[0], n))
        ax.errorbar([x[0]], [y[0]], xerr=[x[1]], yerr=[y[1]], capsize=3, marker=_MARKERS[i % len(_MARKERS)],
                    linestyle="none", label=name)
    bars = "std over seeds" if len(per_seed) > 1 else "binomial standard error"
    ax.set(title=f"finetuning on poetry: perplexity vs rare-token accuracy\n{_seeds_note(per_seed)}; error bars: {bars}",
           xlabel="held-out top-1 accuracy, rarest quartile (Q1)", ylabel="held-out perplexity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


PLOTS = ("training_curves.png", "pdl_weights.png", "bucket_accuracy.png", "extrapolation.png", "pdl_tradeoff.png")


def plot_all(per_seed, counts, alphas, out):
    """The PLOTS in ``out``; returns their paths."""
    paths = [os.path.join(out, n) for n in PLOTS]
    _plot_curves(per_seed, paths[0])
    _plot_weights(counts, alphas, paths[1])
    _plot_buckets(per_seed, paths[2])
    _plot_extrapolation(per_seed, paths[3])
    _plot_tradeoff(per_seed, paths[4])
    return paths


def main(argv=None):
    args = parse_args(argv)
    dev = resolve_device(args.device)
    _require_plotting()  # fail before training, not after
    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    cfg = dict(DEFAULTS, alphas=tuple(args.alphas), max_weights=tuple(args.max_weights))
    cfg["finetune_steps"] = max(1, round(args.steps * cfg["finetune_steps"] / cfg["pretrain_steps"]))
    cfg["pretrain_steps"] = args.steps
    prepare_out(args.out)
    # the seeds are not part of the settings: each seed's runs are kept apart, so a --full run
    # reuses the quick run's seed 0
    settings = dict(cfg, grid=[[n, a, e] for n, a, e in POSITION_RUNS], device=dev.type)
    resume = check_run_dir(args.out, settings, ("results.json", "runs", "tokenizer.json"))
    print(choose_threads(args.threads), flush=True)

    t0 = time.perf_counter()
    pre_train_text, pre_val_text = cfdata.split_held_out(cfdata.load_corpus("narrative"))
    # 10% held out of the smaller part, so the rarest quartile has a few hundred held-out targets
    ft_train_text, ft_val_text = cfdata.split_held_out(cfdata.load_corpus("poetry"), 0.1)
    if resume and os.path.isfile(os.path.join(args.out, "tokenizer.json")):
        tok = cfdata.load_tokenizer(args.out)  # the ids the kept runs were trained on
    else:
        tok = cfdata.build_tokenizer("bpe", pre_train_text, cfg["vocab_size"])
        write_json(os.path.join(args.out, RUN_FILE), settings)
        tok.save(args.out)
    corpora = tuple(cfdata.encode_stream(tok, t) for t in (pre_train_text, pre_val_text, ft_train_text, ft_val_text))
    print(f"corpus: narrative {len(corpora[0])} train / {len(corpora[1])} held-out tokens, poetry "
          f"{len(corpora[2])} / {len(corpora[3])} (BPE vocab {tok.vocab_size}); seeds {seeds}; device {dev}")

    per_seed = []
    for seed in seeds:
        position, finetune, counts = run_seed(seed, cfg, corpora, tok, dev, not args.no_progress,
                                              os.path.join(args.out, "runs", f"seed{seed}"))
        per_seed.append({"seed": seed, "position": position, "finetune": finetune})
    summary = {"position": summarise(per_seed, "position", POSITION_COLS),
               "finetune": summarise(per_seed, "finetune", FINETUNE_COLS)}
    minutes = (time.perf_counter() - t0) / 60
    plots = plot_all(per_seed, counts, cfg["alphas"], args.out)
    results = {"command": "python -m complexformer.experiment " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": cfg, "seeds": seeds, "machine": _machine(dev), "minutes": minutes,
               "summary": summary, "per_seed": per_seed, "plots": [os.path.basename(p) for p in plots]}
    write_json(os.path.join(args.out, "results.json"), results)

    n = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"\n## Position schemes: pretrained on narrative, held-out narrative ({n})\n")
    print(format_table(summary["position"], POSITION_COLS, "attention"))
    print(f"\n## Finetuning on poetry from the CMHA model ({n}); Q1..Q4 = accuracy per frequency quartile\n")
    print(format_table(summary["finetune"], FINETUNE_COLS))
    nq = per_seed[0]["finetune"]["CE"]["val"]["tokens_by_bucket"]
    print(f"held-out targets per quartile Q1..Q4: {nq} (Q1 = the rarest quarter of the token ids)")
    tp = summary["position"]
    print(f"\nthroughput CMHA / RoPE: {tp['cmha']['tokens/s']['mean'] / tp['rope']['tokens/s']['mean']:.3f}; "
          f"{minutes:.1f} min; wrote results.json and {', '.join(os.path.basename(p) for p in plots)} to {args.out}")


if __name__ == "__main__":
    run_cli(main)
