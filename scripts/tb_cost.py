"""What TensorBoard logging costs an iteration: runs a pipeline with `logging.tensorboard` on and
off, alternating, and prints the mean iteration time, the mean time of the nodes that prepare
summaries, and the run loop's own hand-over time (`critical_path_s` in log.jsonl).

    python3 scripts/tb_cost.py [PIPELINE] [--iterations N] [--pairs P] [--set KEY=VALUE ...]

Defaults: the tiny TAFS pipeline, 20 iterations, 2 on/off pairs, images every iteration
(`logging.image_every=1`, the worst case; the default is every 10th).
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import tempfile


def run(binary, pipeline, iterations, on, extra):
    d = tempfile.mkdtemp(prefix="tb-cost-")
    cmd = [binary, pipeline, "--runs-dir", d, "--quiet", "--set", f"iterations={iterations}",
           "--set", f"logging.tensorboard={'true' if on else 'false'}"]
    for s in extra:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    rd = glob.glob(os.path.join(d, "*"))[0]
    rows = [json.loads(l) for l in open(os.path.join(rd, "metrics.jsonl"))]
    crit = 0.0
    for l in open(os.path.join(rd, "log.jsonl")):
        f = json.loads(l).get("fields", {})
        if f.get("message") == "TensorBoard event file written":
            crit = f["critical_path_s"]
    subprocess.run(["rm", "-rf", d], check=True)
    # The first iteration warms caches up: left out of the means.
    return rows[1:], crit / max(len(rows), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline", nargs="?", default="tests/pipelines/valid-tafs-tiny.yaml")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--set", action="append", default=["logging.image_every=1"])
    ap.add_argument("--bin", default="./target/release/flowrun")
    args = ap.parse_args()
    res = {True: [], False: []}
    crit = []
    per_run = []
    for _ in range(args.pairs):
        for on in (True, False):
            rows, c = run(args.bin, args.pipeline, args.iterations, on, args.set)
            res[on] += rows
            per_run.append(("on" if on else "off", statistics.mean(r["iter_s"] for r in rows)))
            if on:
                crit.append(c)
    mean = lambda on, k: statistics.mean(r[k] for r in res[on])
    print(f"load average at the end (1, 5, 15 min): {os.getloadavg()}")
    print("mean iter_s of each run, in order: " + ", ".join(f"{w} {m * 1e3:.1f} ms" for w, m in per_run))
    print(f"{args.pipeline}, {args.iterations} iterations x {args.pairs} pairs, --set {' '.join(args.set)}")
    for k in ["iter_s", "time/advantages", "time/update"]:
        on, off = mean(True, k), mean(False, k)
        print(f"  {k:18s} on {on * 1e3:9.3f} ms   off {off * 1e3:9.3f} ms   diff {(on - off) * 1e3:+8.3f} ms ({(on - off) / mean(False, 'iter_s') * 100:+.2f}% of an iteration)")
    c = statistics.mean(crit)
    print(f"  run loop hand-over (critical_path_s / iteration): {c * 1e6:.1f} us = {c / mean(True, 'iter_s') * 100:.4f}% of an iteration")


if __name__ == "__main__":
    main()
