#!/usr/bin/env python3
"""PyTorch peer of examples/update_breakdown.rs: the shipped model at batch 64, three
transitions' forward (one graph, as the reference's `TafsGrpo.update`), one backward, and the
optimizer step (global-norm clipping, AdamW, EMA). Median of 6 rounds after one warm-up.

    python bench/reference/update_breakdown.py [--threads N]
"""

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True
import flowref  # noqa: E402

BATCH, TRANSITIONS, ROUNDS = 64, 3, 6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = flowref.load_checkpoint(os.path.join(ROOT, "checkpoints", "shapes-small.safetensors"))
    max_tokens, vocab = model.cfg["max_tokens"], model.cfg["vocab_size"]
    # The same prompts as the Rust example: 6 real tokens, then padding.
    ids = [[1 + ((i * max_tokens + j) * 7 + j) % (vocab - 1) if j < 6 else 0
            for j in range(max_tokens)] for i in range(BATCH)]
    tokens = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ema = [p.detach().clone() for p in model.parameters()]
    fwd, bwd, step = [], [], []
    for rnd in range(ROUNDS + 1):
        t0 = time.perf_counter()
        loss = 0.0
        for k in range(TRANSITIONS):
            x = torch.randn(BATCH, 3, 32, 32)
            v = model(x, torch.full((BATCH,), 1.0 - 0.25 * k), tokens)
            loss = loss + (x - v).square().mean()
        loss.item()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.99).add_(p.detach(), alpha=0.01)
        t3 = time.perf_counter()
        if rnd > 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            step.append(t3 - t2)
    f, b, o = (statistics.median(v) for v in (fwd, bwd, step))
    print(f"pytorch: forward {f:.3f} s, backward {b:.3f} s, optimizer {o:.3f} s, total {f + b + o:.3f} s "
          f"(batch {BATCH}, {TRANSITIONS} transitions, median of {ROUNDS})")


if __name__ == "__main__":
    main()
