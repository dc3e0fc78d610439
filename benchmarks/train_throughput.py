"""Training throughput of the same ComplexFormerForCausalLM with CMHA, RoPE and no position signal.

One optimizer step (forward, cross-entropy, backward, AdamW) on a fixed batch, timed round-robin
(one step of every model, then the next round), so load from other processes hits all alike;
median milliseconds, tokens/s, the ratio to RoPE, and the extra peak memory of one step (CUDA
allocator peak; on the CPU the process RSS high-water mark, rough).

    python benchmarks/train_throughput.py                      # CPU, float32, the experiment's model
    python benchmarks/train_throughput.py --device cuda        # bf16 autocast, a larger model
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from _util import fmt_bytes, markdown_table, peak_bytes, round_robin
from complexformer.hf import ATTENTIONS
from complexformer.lab.train import build_model

PRESETS = {
    "cpu": dict(hidden=128, layers=2, heads=4, vocab=1024, batch=16, seq=128),
    "cuda": dict(hidden=1024, layers=8, heads=8, vocab=32000, batch=8, seq=2048),
}


def make_step(model, x, y, dev):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with cast:
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=10)
    for k in PRESETS["cpu"]:
        p.add_argument(f"--{k}", type=int, default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in PRESETS[dev.type].items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), generator=g).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    steps = {}
    for att in ATTENTIONS:
        m = build_model(cfg["vocab"], att, hidden_size=cfg["hidden"], num_layers=cfg["layers"], num_heads=cfg["heads"],
                        max_position_embeddings=max(2048, cfg["seq"]), device=dev)
        steps[att] = make_step(m, x, y, dev)
        steps[att]()  # warm-up: allocator, kernels, optimizer state
    times = round_robin(steps, a.rounds, dev)
    tokens = cfg["batch"] * cfg["seq"]
    ms = {att: statistics.median(t) for att, t in times.items()}
    rows = [[att, f"{ms[att]:.1f}", f"{tokens / ms[att] * 1e3:.0f}", f"{ms['rope'] / ms[att]:.3f}",
             fmt_bytes(peak_bytes(steps[att], device=dev))] for att in ATTENTIONS]
    print(f"device {dev}, {'bf16 autocast' if dev.type == 'cuda' else 'float32'}, {torch.get_num_threads()} threads; "
          f"{cfg}; median of {a.rounds} round-robin steps")
    print(markdown_table(["attention", "ms/step", "tokens/s", "throughput vs RoPE", "extra peak memory"], rows))


if __name__ == "__main__":
    main()
