"""Train one small causal LM on a text file and evaluate it on held-out text from the file's end.

    python -m complexformer.train                                   # the embedded corpus, CMHA, CE
    python -m complexformer.train --text-file my.txt --attention rope --steps 500
    python -m complexformer.train --init-from runs/pre --corpus poetry --loss pdl --alpha 0.5
    torchrun --nproc_per_node 2 -m complexformer.train --batch-size 32      # DDP (gloo on CPU)

The model is ``complexformer.hf.ComplexFormerForCausalLM`` (attention "cmha", "rope" or "none").
The tokenizer is a byte-level BPE trained on the training split (default; see
``complexformer.lab.data`` for why) or raw bytes. The last 5% of the text (at a line boundary) is held
out. Output: a progress bar with the loss, ``metrics.json``, the model and ``tokenizer.json`` in
``--out``, and a last stdout line ``val_ppl=<float>``.

Under ``torchrun`` (WORLD_SIZE > 1) the process group comes from the environment (gloo on CPU,
NCCL on CUDA); every rank draws the same global batch and trains on its own rows of it, and the
loss is normalised by the global token (or PDL weight) sum, so the loss curve equals a one-process
run at the same global batch.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm  # a widget bar in notebooks
else:  # tqdm.auto would warn "IProgress not found" in a notebook, then use the text bar anyway
    from tqdm import tqdm

from ..counts import pdl_weights, token_counts
from ..hf import ATTENTIONS, LOSSES
from ..hf.label_counts import dist_info
from ..causal_lm import causal_lm_normalizer, causal_lm_pdl_loss
from . import data as cfdata
from .runs import load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_json


def resolve_device(name):
    """torch.device for ``name``, or a ValueError naming --device (unknown or unavailable)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device: unknown device {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available in this torch build / on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {name!r}")
    return dev


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows each option's default (unless None / off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def positive_int(text):
    """argparse type: an int >= 1 (argparse names the flag in its error)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def _float_at_least(lo, strict, what):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    parse.__name__ = what  # argparse's "invalid <type> value" message
    return parse


positive_float = _float_at_least(0.0, True, "a positive number")
nonnegative_float = _float_at_least(0.0, False, "a number >= 0")


def _cores_and_cpus():
    """(physical cores, logical CPUs) this process may run on: its affinity set (Linux), with SMT
    siblings counted once; os.cpu_count() for both where that is unknown."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
        return n, None
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return len(cores), cpus


def _busy_cpus(cpus, seconds=0.25):
    """How many of ``cpus`` other processes keep busy right now: /proc/stat sampled over ``seconds``
    (None where that is unavailable)."""
    def sample():
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    v = [int(x) for x in fields]
                    out[name] = (sum(v[:8]), v[3] + v[4])  # total, idle + iowait
        return out

    try:
        a = sample()
        time.sleep(seconds)
        b = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for name, (total, idle) in b.items():
        dt = total - a.get(name, (0, 0))[0]
        if dt > 0:
            busy += 1 - (idle - a[name][1]) / dt
    return busy


def choose_threads(requested=None):
    """Set torch's CPU thread count and return a line that says what was chosen and why.

    Default: one thread per physical core this process may use that no other process keeps busy
    right now (at least 1; divided among the ranks of a local torchrun). The models here are small,
    so a thread that has to share its core stalls every op at the next barrier: on a 2-core machine
    with one other busy process, 2 threads trained at 9.5k tokens/s and 1 thread at 16.7k, while on
    the idle machine 2 threads were 1.3x faster than 1 (benchmarks/RESULTS.md). OMP_NUM_THREADS, when
    set, is respected; ``requested`` (--threads) overrides both.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads: expected a positive int, got {requested}")
        torch.set_num_threads(requested)
        return f"threads: {requested} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS; --threads N overrides)"
    cores, cpus = _cores_and_cpus()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    busy = _busy_cpus(set(cpus)) if cpus else None
    free = cores if busy is None else cores * max(0.0, len(cpus) - busy) / len(cpus)
    n = max(1, min(cores, int(free + 0.5)) // ranks)
    torch.set_num_threads(n)
    load = "" if busy is None else f", {busy:.1f} of {len(cpus)} CPUs busy with other work"
    per = f" / {ranks} local ranks" if ranks > 1 else ""
    return f"threads: {n} ({cores} cores available{load}{per}; --threads N overrides)"


def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1) start the process group from the environment: NCCL for a
    CUDA device (each rank on cuda:LOCAL_RANK), gloo for the CPU. Returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def build_model(vocab_size, attention="cmha", *, hidden_size=128, num_layers=2, num_heads=4,
                max_position_embeddings=2048, seed=0, device="cpu", **config):
    """A fresh ComplexFormerForCausalLM, initialised from ``seed``; ``config`` goes to
    ComplexFormerConfig (e.g. delta_init="rope")."""
    from ..hf.modeling_complexformer import ComplexFormerConfig, ComplexFormerForCausalLM

    if attention not in ATTENTIONS:
        raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
    torch.manual_seed(seed)
    cfg = ComplexFormerConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=num_heads, max_position_embeddings=max_position_embeddings,
                              attention=attention, tie_word_embeddings=True, **config)
    return ComplexFormerForCausalLM(cfg).to(device)


def load_model(directory, device="cpu"):
    """A ComplexFormerForCausalLM saved with ``save_pretrained`` in ``directory``."""
    from ..hf.modeling_complexformer import ComplexFormerForCausalLM

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"--init-from: no config.json in {directory!r} (not a complexformer.train output?)")
    return ComplexFormerForCausalLM.from_pretrained(directory).to(device)


def lr_at(step, steps, lr, warmup):
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, stream, *, loss="ce", alpha=1.0, max_weight=None, steps=300, batch_size=16, seq_len=128, lr=3e-3,
          warmup=None, weight_decay=0.01, seed=0, progress=True, desc="train", evaluate=None, eval_every=None,
          checkpoint=None, checkpoint_every=100):
    """Train ``model`` in place on random windows of the int64 token ``stream``.

    loss: "ce", or "pdl" (weights (count + eps)^-alpha from the counts of the stream's targets,
    clipped at ``max_weight``: :func:`complexformer.pdl_weights`). Under an initialised process group the model is wrapped in
    DDP and ``batch_size`` is the global batch. Returns a history dict: per-step ``loss`` (the
    global training loss), ``lr``, ``seconds``, ``tokens_per_s``.

    ``evaluate(model) -> float`` (on rank 0), when given, is recorded before the first step, every
    ``eval_every`` steps and after the last as ``eval``: [[steps done, value], ...]; its time is not
    counted in ``seconds``.

    ``checkpoint`` (a path), when given: every ``checkpoint_every`` steps the model, optimizer, data
    generator, global RNG states, step and history so far are saved there atomically (rank 0), and
    a run that finds the file resumes from it, so that its result equals an uninterrupted run's
    bit for bit (CPU, same thread count). The learning rate is a function of the step (``lr_at``),
    so the step is the whole schedule state.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if len(stream) < seq_len + 1:
        raise ValueError(f"--seq-len {seq_len} is longer than the training text ({len(stream)} tokens)")
    rank, world = dist_info()
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    if int(stream.max()) >= vocab:
        raise ValueError(f"the token stream has id {int(stream.max())} >= the model's vocab_size {vocab} "
                         "(a tokenizer that does not match the model?)")
    weights = None
    if loss == "pdl":
        # count the label stream the loss sees: every window's targets come from stream[1:]
        weights = pdl_weights(token_counts(stream[1:], vocab), alpha=alpha, max_weight=max_weight).to(dev)
    warmup = max(1, steps // 10) if warmup is None else warmup

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    # bf16 autocast on the GPU (CMHA's fused CUDA kernels take half precision); float32 on the CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    hist = {"loss": [], "lr": []}
    eval_seconds = 0.0
    if evaluate is not None:
        hist["eval"] = []

    def record_eval(done):
        nonlocal eval_seconds
        if evaluate is not None and rank == 0:
            t = time.perf_counter()
            hist["eval"].append([done, float(evaluate(model))])
            model.train()
            eval_seconds += time.perf_counter() - t

    start, seconds_before = 0, 0.0
    if checkpoint is not None and os.path.isfile(checkpoint):
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        start, hist, seconds_before = state["step"], state["history"], state["seconds"]

    def save(done):
        if rank == 0:
            save_checkpoint(checkpoint, {
                "step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "data_generator": gen.get_state(), "rng": rng_state(), "history": hist,
                "seconds": seconds_before + time.perf_counter() - t0 - eval_seconds,
                "lr_schedule": {"lr": lr, "warmup": warmup, "steps": steps}})
        if world > 1:
            dist.barrier()

    model.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress or rank != 0, dynamic_ncols=True,
               initial=start, total=steps)
    t0 = time.perf_counter()
    if start == 0:
        record_eval(0)
    for step in bar:
        x, y = cfdata.random_windows(stream, batch_size, seq_len, gen, rank=rank, world_size=world)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        cur_lr = lr_at(step, steps, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        with autocast:
            logits = net(input_ids=x, use_cache=False).logits
        # this rank's loss sum / the global normaliser: the gradients DDP averages over ranks
        # (hence the factor world) are exactly those of the global batch
        norm = causal_lm_normalizer(y, weights, shift=False)
        if world > 1:
            dist.all_reduce(norm)
        step_loss = causal_lm_pdl_loss(logits.float(), y, weights, shift=False, normalizer=norm)
        opt.zero_grad(set_to_none=True)
        (step_loss * world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        logged = step_loss.detach()
        if world > 1:
            dist.all_reduce(logged)
        hist["loss"].append(logged.item())
        hist["lr"].append(cur_lr)
        bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}")
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            record_eval(step + 1)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    hist["seconds"] = seconds_before + time.perf_counter() - t0 - eval_seconds
    hist["tokens_per_s"] = steps * batch_size * seq_len / hist["seconds"]
    model.eval()
    return hist


# the model's shape and tokenizer: taken from the saved model under --init-from, so giving one of
# them there with another value is refused rather than silently ignored
MODEL_FLAGS = {"tokenizer": "bpe", "vocab_size": 1024, "hidden_size": 128, "layers": 2, "heads": 4}
CHECKPOINT = "checkpoint.pt"
# what a finished (or started) run leaves in --out; a directory holding any of them without a
# run.json is an older run's and is never overwritten
OUTPUTS = ("metrics.json", "config.json", "model.safetensors", "tokenizer.json", CHECKPOINT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m complexformer.train", description=__doc__,
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="UTF-8 text to train on (default: the embedded corpus, see --corpus)")
    src.add_argument("--corpus", choices=cfdata.CORPUS_PARTS, default="narrative",
                     help="embedded corpus part used when no --text-file is given")
    p.add_argument("--attention", choices=ATTENTIONS, default=None,
                   help="position scheme (default: cmha, or the --init-from model's)")
    p.add_argument("--loss", choices=LOSSES, default="ce", help="training loss")
    p.add_argument("--alpha", type=nonnegative_float, default=1.0, help="PDL exponent (with --loss pdl)")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per training window")
    p.add_argument("--batch-size", type=positive_int, default=16, help="global batch (split over DDP ranks)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: one per physical core not busy with other work)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    p.add_argument("--init-from", metavar="DIR", help="start from a model + tokenizer saved by an earlier run "
                   "(its shape and tokenizer: the flags below that set them are refused with it)")
    p.add_argument("--out", metavar="DIR", default="runs/train",
                   help="where metrics.json, the model and the checkpoint go; rerun with the same --out to "
                        "resume an interrupted run")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="N",
                   help="save a resumable checkpoint in --out every N steps")
    p.add_argument("--tokenizer", choices=cfdata.TOKENIZERS, default=None,
                   help=f"byte-level BPE or raw bytes (default: {MODEL_FLAGS['tokenizer']})")
    for flag, what in (("vocab-size", "BPE vocabulary size"), ("hidden-size", "model width"),
                       ("layers", "decoder layers"), ("heads", "attention heads")):
        p.add_argument(f"--{flag}", type=positive_int, default=None,
                       help=f"{what} (default: {MODEL_FLAGS[flag.replace('-', '_')]})")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the text held out (its end)")
    p.add_argument("--no-save", action="store_true", help="write metrics.json only, not the model")
    args = p.parse_args(argv)
    args.given_model_flags = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if args.init_from:  # checked against the saved model once it is loaded
        args.__dict__.update(dict.fromkeys(MODEL_FLAGS))
    for k, v in MODEL_FLAGS.items():
        if not args.init_from and getattr(args, k) is None:
            setattr(args, k, v)
    if not 0 < args.val_fraction < 1:
        p.error(f"argument --val-fraction: expected a number in (0, 1), got {args.val_fraction}")
    if not args.init_from and (args.hidden_size % args.heads or (args.hidden_size // args.heads) % 2):
        p.error(f"argument --heads: --hidden-size {args.hidden_size} must split into {args.heads} heads of an "
                "even size (CMHA rotates pairs of features)")
    return args


def _load_init_from(directory, device, given):
    """(tokenizer, model) saved in ``directory``, or an error naming the file that cannot be read;
    ``given``: the shape / tokenizer flags given on the command line, refused where they differ."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--init-from: no such directory: {directory!r}")
    path = os.path.join(directory, "tokenizer.json")
    try:
        tok = cfdata.load_tokenizer(directory)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init-from: {e}") from None
    except Exception as e:  # a damaged file fails inside json / tokenizers in many ways
        raise ValueError(f"--init-from: cannot read {path!r} ({type(e).__name__}: {e})") from None
    try:
        model = load_model(directory, device)
    except FileNotFoundError:
        raise
    except Exception as e:
        files = [n for n in sorted(os.listdir(directory)) if n == "config.json" or n.endswith(".safetensors")]
        raise ValueError(f"--init-from: cannot load the model from {', '.join(os.path.join(directory, n) for n in files)}"
                         f" ({type(e).__name__}: {e})") from None
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"--init-from: {path!r} has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    c = model.config
    saved = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "hidden_size": c.hidden_size,
             "layers": c.num_hidden_layers, "heads": c.num_attention_heads}
    differ = [f"--{k.replace('_', '-')} {v} (the saved model has {saved[k]})"
              for k, v in given.items() if v != saved[k]]
    if differ:
        raise ValueError(f"--init-from {directory!r} fixes the model's shape and tokenizer: drop "
                         + "; ".join(differ))
    return tok, model


def _run_settings(args, source_text, source, attention):
    """What determines a run's results (its --out's run.json): a rerun resumes only when they match."""
    import hashlib

    keys = ("loss", "alpha", "steps", "seq_len", "batch_size", "lr", "seed", "val_fraction")
    s = {k: getattr(args, k) for k in keys}
    s.update(source=source, text_sha256=hashlib.sha256(source_text.encode("utf-8")).hexdigest(),
             attention=attention, world_size=dist_info()[1],
             init_from=os.path.abspath(args.init_from) if args.init_from else None)
    if not args.init_from:
        s.update({k: getattr(args, k) for k in MODEL_FLAGS})
    return s


def main(argv=None):
    from .runs import RUN_FILE, check_run_dir, prepare_out, save_pretrained_atomic

    args = parse_args(argv)
    dev = resolve_device(args.device)
    prepare_out(args.out)
    if args.text_file is not None:
        text, source = cfdata.read_text_file(args.text_file), os.path.abspath(args.text_file)
    else:
        text, source = cfdata.load_corpus(args.corpus), f"embedded:{args.corpus}"
    dev = init_distributed(dev)
    rank, world = dist_info()
    threads = choose_threads(args.threads)
    if rank == 0:
        print(threads, flush=True)
    train_text, val_text = cfdata.split_held_out(text, args.val_fraction)

    if args.init_from:
        tok, model = _load_init_from(args.init_from, dev, args.given_model_flags)
        if args.attention is not None and args.attention != model.config.attention:
            raise ValueError(f"--attention {args.attention} differs from the --init-from model's "
                             f"({model.config.attention})")
    else:
        model = None
    attention = model.config.attention if model is not None else (args.attention or "cmha")
    settings = _run_settings(args, text, source, attention)
    resume = check_run_dir(args.out, settings, OUTPUTS)
    metrics_path = os.path.join(args.out, "metrics.json")
    if resume and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            done = json.load(f)
        if rank == 0:
            print(f"{args.out} holds this run, finished; nothing to do")
            print(f"val_ppl={done['val_ppl']:.4f}")
        return
    if model is None:
        saved = os.path.join(args.out, "tokenizer.json")
        if resume and os.path.isfile(saved):  # resume with exactly the ids the checkpoint was trained on
            tok = cfdata.load_tokenizer(args.out)
        else:
            tok = cfdata.build_tokenizer(args.tokenizer, train_text, args.vocab_size)
        if world > 1 and tok.kind == "bpe":
            # every rank must use the same ids: take rank 0's merges rather than trust the
            # trainer to break ties identically in every process
            msg = [tok.to_str() if rank == 0 else None]
            dist.broadcast_object_list(msg, src=0)
            tok = cfdata.BPETokenizer.from_str(msg[0])
        model = build_model(tok.vocab_size, attention, hidden_size=args.hidden_size,
                            num_layers=args.layers, num_heads=args.heads, seed=args.seed, device=dev)
    train_ids, val_ids = cfdata.encode_stream(tok, train_text), cfdata.encode_stream(tok, val_text)
    if len(train_ids) < args.seq_len + 1:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the training text ({len(train_ids)} tokens)")
    if len(val_ids) < args.seq_len + 1:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the held-out text ({len(val_ids)} tokens; "
                         f"use a longer file or a larger --val-fraction)")
    checkpoint = os.path.join(args.out, CHECKPOINT)
    if rank == 0 and not resume:
        write_json(os.path.join(args.out, RUN_FILE), settings)
        if not args.no_save:
            tok.save(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        step = load_checkpoint(checkpoint)["step"] if os.path.isfile(checkpoint) else 0
        print(f"{source}: {len(train_ids)} train / {len(val_ids)} held-out tokens ({tok.kind}, vocab "
              f"{tok.vocab_size}); {model.config.attention} model, {n_params / 1e6:.2f}M parameters; "
              f"seed {args.seed}; {world} process(es)" + (f"; resuming at step {step}" if step else ""))
    hist = train(model, train_ids, loss=args.loss, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
                 seq_len=args.seq_len, lr=args.lr, seed=args.seed, checkpoint=checkpoint,
                 checkpoint_every=args.checkpoint_every)

    if rank == 0:
        from .metrics import evaluate_lm

        val = evaluate_lm(model, *cfdata.sequential_windows(val_ids, args.seq_len))
        metrics = {"args": vars(args), "source": source, "seed": args.seed, "world_size": world,
                   "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "parameters": n_params,
                   "train_tokens": len(train_ids), "val_tokens": len(val_ids), "history": hist,
                   "val": val, "val_ppl": val["ppl"]}
        if not args.no_save:
            save_pretrained_atomic(model, args.out)
        write_json(metrics_path, metrics)  # last: its presence says the run finished
        if os.path.isfile(checkpoint):
            os.unlink(checkpoint)
        print(f"trained {args.steps} steps in {hist['seconds']:.1f} s ({hist['tokens_per_s']:.0f} tokens/s); "
              f"final train loss {hist['loss'][-1]:.4f}; held-out ce {val['ce']:.4f}; wrote {args.out}")
        print(f"val_ppl={val['ppl']:.4f}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_cli(main):
    """Run a command's ``main()`` with bad input reported as one line "error: ..." and exit status 1."""
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_cli(main)
