#!/usr/bin/env python3
"""A/B of the policy's `rollout_graph` (keep vs recompute) on pipelines/tafs_grpo.yaml.

    scripts/rollout_graph_ab.py --flowrun target/tch/release/flowrun --device libtorch \
        --prompts-per-iter 32 --iterations 5 --pairs 1

Runs the pipeline `pairs` times in each mode, alternating (keep first), in a temporary runs
directory with evaluation off, under `/usr/bin/time` (peak RSS, user/system seconds, minor page
faults). Prints, per run, each iteration's `iter_s` / sampling (Σ time/predict@k) / update time,
then per mode the median over all runs of the iterations from `--skip + 1` on (the first ones
also fault the process's memory in) and the keep / recompute ratio.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, mode):
    runs = tempfile.mkdtemp(prefix="flowrun-rg-")
    try:
        cmd = ["/usr/bin/time", "-f", "%M %U %S %R", args.flowrun, "pipelines/tafs_grpo.yaml",
               "--device", args.device, "--set", f"iterations={args.iterations}",
               "--set", f"nodes.prompts.params.prompts_per_iter={args.prompts_per_iter}",
               "--set", "nodes.eval.every=1000000",
               "--set", f"resources.policy.params.rollout_graph={mode}",
               "--runs-dir", runs, "--quiet"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{mode}: flowrun failed:\n{p.stdout}{p.stderr}")
        rss_kb, user, system, faults = p.stderr.strip().splitlines()[-1].split()
        (metrics,) = glob.glob(os.path.join(runs, "*", "metrics.jsonl"))
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    its = [(r["iter_s"], sum(v for k, v in r.items() if k.startswith("time/predict@")),
            r["time/update"], r.get("update/graphs_reused", 0.0)) for r in rows]
    return dict(mode=mode, rss_gb=int(rss_kb) / 2**20, user_s=float(user), sys_s=float(system),
                faults=int(faults), iterations=its)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flowrun", default="target/release/flowrun")
    ap.add_argument("--device", default="flex")
    ap.add_argument("--prompts-per-iter", type=int, default=32, help="P (batch = 8·P)")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--skip", type=int, default=2, help="leading iterations left out of medians")
    ap.add_argument("--pairs", type=int, default=1)
    args = ap.parse_args()
    results = {"keep": [], "recompute": []}
    for _ in range(args.pairs):
        for mode in ("keep", "recompute"):
            r = run(args, mode)
            results[mode].append(r)
            its = " ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c, _ in r["iterations"])
            print(f"{mode:9s} peak {r['rss_gb']:.2f} GiB, user {r['user_s']:.1f} s, sys "
                  f"{r['sys_s']:.1f} s, {r['faults']} faults; iter/sampling/update s: {its}; "
                  f"graphs reused {r['iterations'][-1][3]:.0f}", flush=True)
    med = {}
    for mode, rs in results.items():
        tail = [it for r in rs for it in r["iterations"][args.skip:]]
        med[mode] = [statistics.median(it[j] for it in tail) for j in range(3)]
        print(f"{mode:9s} median of iterations {args.skip + 1}–{args.iterations}: iteration "
              f"{med[mode][0]:.2f} s (sampling {med[mode][1]:.2f} s, update {med[mode][2]:.2f} s)")
    k, r = med["keep"], med["recompute"]
    print(f"keep / recompute: iteration {k[0] / r[0]:.2f}×, sampling {k[1] / r[1]:.2f}×, update "
          f"{k[2] / r[2]:.2f}× (B = {8 * args.prompts_per_iter}, {args.device}, {args.flowrun})")


if __name__ == "__main__":
    main()
