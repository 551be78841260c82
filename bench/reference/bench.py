#!/usr/bin/env python3
"""Times one TAFS-GRPO iteration of the PyTorch reference (eager, CPU).

    python bench/reference/bench.py [--repeats 5] [--warmup 1] [--threads N]

The iteration is pipelines/tafs_grpo.yaml's with its defaults: P·G = 8·8 = 64 samples, K = 4
one-step predictions (t = 1, 0.75, 0.5, 0.25) with annealed re-noising in between (τ = 1 →
0.6), per-step rewards, `mix` advantages, one clipped-GRPO AdamW step over the 3 transitions
(plus the EMA update flowrun's trainer also does). The reward is a stand-in (mean brightness of
x̂0, see flowref.brightness_reward): flowrun's verifier costs about 10 ms per iteration, the
stand-in less than 1 ms. Prints the median, min and max over `repeats` iterations after
`warmup` iterations, and the rollout / update split of the median iteration.

With `--flowrun BIN:DEVICE` (repeatable) it first runs
`BIN pipelines/tafs_grpo.yaml --set iterations=1+repeats --device DEVICE` in a temporary runs
directory and reads `iter_s`, `time/predict@*` and `time/update` from its metrics.jsonl
(median over iterations 2…, iteration 1 being the warm-up), then prints the ratios, e.g.

    python bench/reference/bench.py --repeats 2 \
        --flowrun target/release/flowrun:flex --flowrun target/tch/release/flowrun:libtorch

The machine's speed drifts over minutes, so one flowrun run against one reference run is a noisy
ratio. `--rounds R` alternates them R times (flowrun's runs, then `repeats` reference
iterations, in each round; the reference warms up once) and reports each round's ratio and
their median, min and max: the figure to quote.

`--keep-graph` makes the reference keep the rollout's autograd graphs and back-propagate through
them (what flowrun's `rollout_graph: keep` does); `--flowrun-set KEY=VALUE` passes overrides to
flowrun, e.g. `resources.policy.params.rollout_graph=recompute`.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import flowref  # noqa: E402


def time_flowrun(spec, iterations, prompts_per_iter, overrides=()):
    """Runs the pipeline with BIN on DEVICE; medians of its per-iteration times (iterations 2…)."""
    binary, _, device = spec.rpartition(":")
    runs = tempfile.mkdtemp(prefix="flowrun-refbench-")
    try:
        cmd = [binary, "pipelines/tafs_grpo.yaml", "--set", f"iterations={iterations}",
               "--set", f"nodes.prompts.params.prompts_per_iter={prompts_per_iter}",
               "--device", device]
        for o in overrides:
            cmd += ["--set", o]
        cmd += ["--runs-dir", runs, "--quiet"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            return dict(spec=spec, error=(p.stdout + p.stderr).strip()[-500:])
        (metrics,) = glob.glob(os.path.join(runs, "*", "metrics.jsonl"))
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    timed = [r for r in rows if r["iteration"] > 1] or rows

    def med(f):
        return statistics.median(f(r) for r in timed)

    return dict(spec=spec, command=" ".join(cmd[:-4] + ["--runs-dir", "/tmp/…", "--quiet"]),
                first_s=rows[0]["iter_s"], median_s=med(lambda r: r["iter_s"]),
                rollout_s=med(lambda r: sum(v for k, v in r.items()
                                            if k.startswith("time/predict@"))),
                update_s=med(lambda r: r["time/update"]), iterations=len(timed))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints",
                                                          "shapes-small.safetensors"))
    ap.add_argument("--prompts", default=os.path.join(ROOT, "datasets", "shapes", "train.jsonl"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--prompts-per-iter", type=int, default=8,
                    help="P (batch = P x group size 8) for both peers; the pipeline's own default is 32")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate flowrun and the reference this many times (paired ratios)")
    ap.add_argument("--keep-graph", action="store_true",
                    help="the reference keeps the rollout's autograd graphs and back-propagates "
                         "through them (as flowrun's `rollout_graph: keep`) instead of recomputing")
    ap.add_argument("--flowrun-set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to flowrun as --set KEY=VALUE, e.g. "
                         "resources.policy.params.rollout_graph=recompute")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    ap.add_argument("--flowrun", action="append", default=[], metavar="BIN:DEVICE",
                    help="also time flowrun's pipeline with this binary on this device")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = flowref.load_checkpoint(args.checkpoint)
    grpo = flowref.TafsGrpo(model, hp=dict(prompts_per_iter=args.prompts_per_iter,
                                           keep_graph=args.keep_graph))
    hp = grpo.hp
    prompts = flowref.load_prompts(args.prompts, hp["prompts_per_iter"])
    tokens, groups = flowref.prompt_batch(prompts, hp["group_size"])
    gen = torch.Generator().manual_seed(0)

    def reference(iterations, warmup):
        """`warmup` + `iterations` reference iterations: their times and rollout/update splits."""
        times, splits = [], []
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            b = tokens.shape[0]
            noise = torch.randn(b, 3, 32, 32, generator=gen)
            eps = [torch.randn(b, 3, 32, 32, generator=gen) for _ in hp["t"][:-1]]
            transitions, rewards = grpo.rollout(tokens, groups, noise, eps)
            adv = flowref.step_advantages(rewards, groups, hp["mode"], hp["lam"], eps=hp["adv_eps"])
            t1 = time.perf_counter()
            loss, grad_norm = grpo.update(tokens, transitions, adv)
            t2 = time.perf_counter()
            if i >= warmup:
                times.append(t2 - t0)
                splits.append((t1 - t0, t2 - t1))
            if not args.json:
                print(f"iteration {i + 1}{' (warm-up)' if i < warmup else ''}: "
                      f"{t2 - t0:.3f} s (rollout {t1 - t0:.3f} s, update {t2 - t1:.3f} s), "
                      f"loss {loss:.3e}, grad norm {grad_norm:.4f}", flush=True)
        med = statistics.median(times)
        rollout, update = splits[min(range(len(times)), key=lambda j: abs(times[j] - med))]
        return dict(median_s=med, min_s=min(times), max_s=max(times), repeats=len(times),
                    rollout_s=rollout, update_s=update)

    rounds = []
    for rnd in range(args.rounds):
        peers = []
        for spec in args.flowrun:
            r = time_flowrun(spec, 1 + args.repeats, args.prompts_per_iter, args.flowrun_set)
            peers.append(r)
            if not args.json:
                if "error" in r:
                    print(f"flowrun {spec}: failed: {r['error']}")
                else:
                    print(f"flowrun {spec}: median {r['median_s']:.3f} s over {r['iterations']} "
                          f"(first {r['first_s']:.3f} s; sampling {r['rollout_s']:.3f} s, update "
                          f"{r['update_s']:.3f} s)", flush=True)
        ref = reference(args.repeats, args.warmup if rnd == 0 else 0)
        rounds.append(dict(reference=ref, flowrun=peers))
        if not args.json:
            print(f"reference TAFS-GRPO iteration (B = {tokens.shape[0]}, K = {len(hp['t'])}, "
                  f"{'kept rollout graphs' if args.keep_graph else 'forward recomputed'}, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads): median "
                  f"{ref['median_s']:.3f} s, min {ref['min_s']:.3f} s, max {ref['max_s']:.3f} s over "
                  f"{ref['repeats']} (rollout {ref['rollout_s']:.3f} s + update {ref['update_s']:.3f} s)")
            for r in peers:
                if "error" not in r:
                    print(f"reference / flowrun {r['spec']}: {ref['median_s'] / r['median_s']:.2f}× the "
                          f"time (sampling {ref['rollout_s'] / r['rollout_s']:.2f}×, update "
                          f"{ref['update_s'] / r['update_s']:.2f}×)", flush=True)
    result = dict(rounds[-1]["reference"], threads=torch.get_num_threads(), torch=torch.__version__,
                  keep_graph=args.keep_graph, flowrun_set=args.flowrun_set,
                  batch=int(tokens.shape[0]), steps=len(hp["t"]), flowrun=rounds[-1]["flowrun"],
                  rounds=rounds)
    summary = {}
    for j, spec in enumerate(args.flowrun):
        ratios = sorted(rd["flowrun"][j]["median_s"] / rd["reference"]["median_s"]
                        for rd in rounds if "error" not in rd["flowrun"][j])
        if ratios:
            summary[spec] = dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1],
                                 rounds=len(ratios))
    result["flowrun_over_reference"] = summary
    if args.json:
        print(json.dumps(result))
    elif args.rounds > 1:
        for spec, r in summary.items():
            print(f"flowrun {spec} / reference, paired over {r['rounds']} rounds: median "
                  f"{r['median']:.3f}× (min {r['min']:.3f}×, max {r['max']:.3f}×)")

if __name__ == "__main__":
    main()
