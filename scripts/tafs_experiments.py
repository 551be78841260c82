#!/usr/bin/env python3
"""TAFS-GRPO experiments (issue #4): the results table and the advantage/temperature ablation.

Everything goes through the `flowrun` binary; this script only launches runs, evaluates their
final policies with `flowrun eval`, and collects the figures into CSV and Markdown (stdlib only).

  scripts/tafs_experiments.py table    --budget 20m [--device libtorch] [--out results/table]
  scripts/tafs_experiments.py ablation --iterations 15 [--seeds 0 1] [--out results/ablation]
  scripts/tafs_experiments.py sweep --config lr1e-4 "policy.lr=1e-4" --config ... --iterations 40
  scripts/tafs_experiments.py curve --policies DIR [--out results/curve]
  scripts/tafs_experiments.py methods  --budget 5m --seeds 0 1 [--methods tafs_grpo mixgrpo ...]
  scripts/tafs_experiments.py table --smoke     # seconds: checks the harness end to end

`table`: verifier accuracy at K = 1, 2, 4 (TAFS sampler) of the base checkpoint and of the
policies after TAFS-GRPO and after Flow-GRPO trained for the same wall-clock budget
(`--time-limit`), on training prompts and on the held-in / held-out evaluation prompts; plus
each run's final-image reward against wall-clock (CSV; `flowrun report --compare` plots it).
`ablation`: TAFS-GRPO with each advantage mode x temperature schedule x seed for a fixed number
of iterations; 4-step accuracy after training, mean and spread over seeds.
`sweep`: TAFS-GRPO hyper-parameter search: each named `--config NAME SET...` (pipeline `--set`
overrides, `;`-separated) x seed for a fixed number of iterations, then all of eval.jsonl at
K = 1, 2, 4 with the same initial noise as the base checkpoint (paired comparison).
`methods`: every algorithm's pipeline (`METHODS`: TAFS-GRPO, Flow-GRPO, MixGRPO, DiffusionNFT,
BranchGRPO, TempFlow-GRPO) x seed trained for the same wall-clock budget from the shipped checkpoint, each
final policy evaluated under one common sampler (TAFS at K = 1, 2, 4) and at the 10 Euler steps
of the SDE/ODE methods' own schedule, on all held-in and held-out evaluation prompts with the
base checkpoint's initial noise; mean and spread over seeds, the binomial noise of one
evaluation, and every run's final-image reward against wall-clock in one PNG. Resumable: cells
already in `methods.csv` are skipped.
`curve`: accuracy against RL updates of one long run: every `NAME.safetensors` policy snapshot
in `--policies` (e.g. copies of a run's `checkpoints/iter-*/resources/policy/model.safetensors`,
which the run itself prunes to the last `keep_checkpoints`) plus the base checkpoint, evaluated
exactly as `table` does.
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ["final", "step", "gain", "return", "mix"]
TAUS = {
    "linear1-0.6": "{schedule: linear, start: 1.0, end: 0.6}",
    "const1": "{schedule: constant, start: 1.0}",
    "cosine1-0.3": "{schedule: cosine, start: 1.0, end: 0.3}",
}


# The algorithms `methods` compares: name -> pipeline file (each trains from the shipped checkpoint).
METHODS = {
    "tafs_grpo": "pipelines/tafs_grpo.yaml",
    "flow_grpo": "pipelines/flow_grpo.yaml",
    "mixgrpo": "pipelines/mixgrpo.yaml",
    "diffusion_nft": "pipelines/diffusion_nft.yaml",
    "branch_grpo": "pipelines/branch_grpo.yaml",
    "tempflow_grpo": "pipelines/tempflow_grpo.yaml",
}


def sh(cmd, log):
    """Run a command, appending it and its output to `log`; fail loudly with its output."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        t0 = time.time()
        p = subprocess.run(list(map(str, cmd)), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        f.write(f"# exit {p.returncode} after {time.time() - t0:.1f} s\n")
    if p.returncode != 0:
        sys.exit(f"command failed (exit {p.returncode}): {' '.join(map(str, cmd))}; see {log}")


def newest_run(runs):
    dirs = sorted(p for p in Path(runs).iterdir() if p.is_dir())
    if not dirs:
        sys.exit(f"no run directory was created under {runs}")
    return dirs[-1]


def final_policy(run):
    latest = (run / "checkpoints" / "latest").read_text().strip()
    p = run / "checkpoints" / latest / "resources" / "policy" / "model.safetensors"
    if not p.is_file():
        sys.exit(f"{p} is missing")
    return p


def metrics(run):
    rows = []
    with open(run / "metrics.jsonl") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                rows.append(json.loads(line))
    return rows


def evaluate(a, checkpoint, prompts, out_csv, log, limit, sampler="tafs", steps="1,2,4"):
    tau = ["--tau", "1.0", "--tau-end", a.tau_end] if sampler == "tafs" else []
    sh(
        [a.flowrun, "eval", "--checkpoint", checkpoint, "--prompts", prompts, "--steps", steps,
         "--sampler", sampler, *tau, "--limit", limit, "--device", a.device, "--csv", out_csv],
        log,
    )
    acc = {}
    with open(out_csv) as f:
        for r in csv.DictReader(f):
            acc[(r["category"], int(r["steps"]))] = (int(r["correct"]), int(r["total"]))
    return acc


def evaluate_splits(a, name, checkpoint, out, log, limit):
    """`evaluate` on the training prompts (`--train-limit` per category) and on eval.jsonl
    (`limit`): {"train": acc, "eval": acc}, CSVs as out/NAME.train.csv and out/NAME.eval.csv."""
    return {
        "train": evaluate(a, checkpoint, "datasets/shapes/train.jsonl", out / f"{name}.train.csv", log,
                          "2" if a.smoke else str(a.train_limit)),
        "eval": evaluate(a, checkpoint, "datasets/shapes/eval.jsonl", out / f"{name}.eval.csv", log, limit),
    }


def train(a, pipeline, runs, log, sets, time_limit=None):
    cmd = [a.flowrun, pipeline, "--device", a.device, "--runs-dir", runs, "--quiet",
           "--set", "nodes.eval.every=1000000"]
    if time_limit:
        cmd += ["--time-limit", time_limit, "--set", "iterations=100000"]
    for s in list(a.set or []) + list(sets):
        cmd += ["--set", s]
    sh(cmd, log)
    return newest_run(runs)


def frac(acc, cat, k):
    """Accuracy of category `cat` at K = `k` from an `evaluate` table, as a 4-decimal string."""
    c, n = acc[(cat, k)]
    return f"{c / max(n, 1):.4f}"


def finished_cells(path, *keys):
    """The rows already in the results CSV at `path` and the set of their `keys` tuples: the
    cells a resumed command skips."""
    if not path.exists():
        return [], set()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows, {tuple(r[k] for k in keys) for r in rows}


def append_csv(path, row):
    """Append `row` (a dict) to the CSV at `path`, writing the header when the file is new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def reward_key(rows):
    """The final image's reward: the highest-numbered `score@K` (TAFS) or `score` (Flow-GRPO)."""
    keys = [k for k in rows[0] if k.startswith("score") and k.endswith("/reward_mean")]
    return max(keys, key=lambda k: int(k.split("@")[1].split("/")[0]) if "@" in k else 0)


def training_reward(runs, last=10):
    """(reward of the 2nd step's x̂0, of the last step's) averaged over the last `last` updates
    of the newest run under `runs` (the policy's own samples on training prompts: `last` x 256
    samples, a finer measure than the evaluation's 600 prompts); None without a run."""
    runs = Path(runs)
    dirs = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if not dirs or not (dirs[-1] / "metrics.jsonl").is_file():
        return None
    rows = metrics(dirs[-1])[-last:]
    if not rows or "score@2/reward_mean" not in rows[0]:
        return None
    return (statistics.mean(r["score@2/reward_mean"] for r in rows),
            statistics.mean(r[reward_key(rows)] for r in rows))


def fmt(acc, cat, k):
    c, n = acc.get((cat, k), (0, 0))
    return f"{100 * c / max(n, 1):.1f}%"


def budgeted(a, group_size):
    """(out dir, command log, wall-clock budget, eval limit, smoke overrides) of a budgeted
    comparison; `--smoke` shrinks the budget, the evaluation and the batch (groups of
    `group_size`)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = ["nodes.prompts.params.prompts_per_iter=2",
             f"nodes.prompts.params.group_size={group_size}"] if a.smoke else []
    return (out, out / "commands.log", "3s" if a.smoke else a.budget, "2" if a.smoke else str(a.limit),
            smoke)


def cmd_table(a):
    out, log, budget, limit, smoke = budgeted(a, 2)
    base = ROOT / "checkpoints" / "shapes-small.safetensors"
    policies = {"base": base}
    runs = {}
    for name, pipe in [("tafs_grpo", "pipelines/tafs_grpo.yaml"), ("flow_grpo", "pipelines/flow_grpo.yaml")]:
        runs[name] = train(a, pipe, Path(a.runs_dir) / name, log, smoke, time_limit=budget)
        policies[name] = final_policy(runs[name])
    table = {name: evaluate_splits(a, name, ck, out, log, limit) for name, ck in policies.items()}
    lines = [
        f"Budget per RL run: {budget} wall-clock on `{a.device}`; accuracy with the TAFS sampler "
        f"(τ linear from 1.0 to {a.tau_end} over the K steps, as in training) at K steps; "
        f"{'all' if limit == '0' else limit} prompts per split and category; overrides: {' '.join(a.set or []) or 'none'}.",
        "",
        "| model | iterations | train K=1 | K=2 | K=4 | held-in K=1 | K=2 | K=4 | held-out K=1 | K=2 | K=4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "iteration", "elapsed_s", "final_reward"])
        for name, run in runs.items():
            rows = metrics(run)
            key = reward_key(rows)
            for r in rows:
                w.writerow([name, r["iteration"], r["elapsed_s"], r[key]])
    for name in policies:
        t, e = table[name]["train"], table[name]["eval"]
        its = len(metrics(runs[name])) if name in runs else 0
        heldin = "all"
        lines.append(
            f"| {name} | {its} | " + " | ".join(fmt(t, "all", k) for k in (1, 2, 4)) + " | "
            + " | ".join(fmt(e, heldin, k) for k in (1, 2, 4)) + " | "
            + " | ".join(fmt(e, "heldout", k) for k in (1, 2, 4)) + " |"
        )
    for name, run in runs.items():
        rows = metrics(run)
        key = reward_key(rows)
        first = statistics.mean(r[key] for r in rows[: max(1, len(rows) // 10)])
        last = statistics.mean(r[key] for r in rows[-max(1, len(rows) // 10):])
        lines.append("")
        lines.append(
            f"- {name}: {len(rows)} iterations in {rows[-1]['elapsed_s']:.0f} s; final-image "
            f"reward ({key}) {first:.3f} → {last:.3f} (mean of the first / last 10% of iterations)"
        )
    sh([a.flowrun, "compare", runs["tafs_grpo"], runs["flow_grpo"], "--y", reward_key(metrics(runs["tafs_grpo"])),
        "--y", reward_key(metrics(runs["flow_grpo"])), "--smooth", "5", "--out", out / "reward_vs_wallclock.png",
        "--title", "final-image reward vs wall-clock: TAFS-GRPO and Flow-GRPO"], log)
    lines += ["", "Reward against wall-clock: `reward_vs_wallclock.png` (`flowrun compare`, mean of 5 iterations)."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def binomial_sd(p, n):
    """Standard deviation (percentage points) of an accuracy p measured on n independent prompts."""
    return 100 * (p * (1 - p) / max(n, 1)) ** 0.5


def cmd_methods(a):
    out, log, budget, limit, smoke = budgeted(a, 8)  # BranchGRPO's trees need 8 leaves
    # (split label, category in eval.jsonl's table, sampler, K)
    cols = [(s, cat, "tafs", k) for s, cat in (("held-in", "all"), ("held-out", "heldout")) for k in (1, 2, 4)]
    cols += [(s, cat, "euler", 10) for s, cat in (("held-in", "all"), ("held-out", "heldout"))]
    res_csv = out / "methods.csv"
    results, done = finished_cells(res_csv, "method", "seed")  # resume: skip finished cells

    def cell(method, seed, ck, rows):
        tag = method if method == "base" else f"{method}-s{seed}"
        tafs = evaluate(a, ck, "datasets/shapes/eval.jsonl", out / f"{tag}.tafs.csv", log, limit)
        euler = evaluate(a, ck, "datasets/shapes/eval.jsonl", out / f"{tag}.euler.csv", log, limit,
                         sampler="euler", steps="10")
        r = {"method": method, "seed": str(seed), "iterations": len(rows),
             "wall_s": f"{rows[-1]['elapsed_s']:.1f}" if rows else "0.0"}
        if rows:
            key = reward_key(rows)
            n = max(1, len(rows) // 5)
            r["reward_first20pct"] = f"{statistics.mean(x[key] for x in rows[:n]):.4f}"
            r["reward_last20pct"] = f"{statistics.mean(x[key] for x in rows[-n:]):.4f}"
        else:
            r["reward_first20pct"] = r["reward_last20pct"] = "nan"
        for split, cat, sampler, k in cols:
            c, total = (tafs if sampler == "tafs" else euler)[(cat, k)]
            r[f"{sampler}{k}_{split}"] = f"{c / max(total, 1):.4f}"
            r[f"n_{split}"] = str(total)
        results.append(r)
        append_csv(res_csv, r)

    if ("base", "-") not in done:
        cell("base", "-", ROOT / "checkpoints" / "shapes-small.safetensors", [])
    curves = out / "runs"  # one folder per run with a copy of its metrics.jsonl (kept with the table)
    curves.mkdir(exist_ok=True)
    for method in a.methods:
        for seed in a.seeds:
            if (method, str(seed)) in done:
                continue
            runs = Path(a.runs_dir) / f"{method}-s{seed}"
            run = train(a, METHODS[method], runs, log, smoke + [f"seed={seed}"], time_limit=budget)
            copy = curves / f"{method}-s{seed}"  # `flowrun compare` labels each curve by this name
            copy.mkdir(exist_ok=True)
            shutil.copyfile(run / "metrics.jsonl", copy / "metrics.jsonl")
            cell(method, seed, final_policy(run), metrics(run))

    order = ["base"] + [m for m in METHODS if any(r["method"] == m for r in results)]
    lines = [
        f"Budget per RL run: {budget} wall-clock on `{a.device}` (a run stops after the iteration that "
        f"reaches it), from `checkpoints/shapes-small.safetensors`, each method's shipped pipeline; seeds "
        f"{' '.join(map(str, a.seeds))}. Accuracy of the final policy (`flowrun eval` of the "
        f"weights the run samples with, its checkpoint's `model.safetensors`: DiffusionNFT's old policy, the EMA; "
        f"the current weights for the others) "
        f"with one common sampler, TAFS (τ linear 1.0 → {a.tau_end}) at K = 1, 2, 4, and with 10 Euler "
        f"steps (the SDE/ODE methods' own step count, deterministic); {'all' if limit == '0' else limit} "
        f"evaluation prompts per split, the base checkpoint's initial noise for every policy. Mean ± sd over seeds.",
        "",
        "| method | seeds | iterations | wall s | final-image reward first → last 20% | held-in K=1 | K=2 | K=4 "
        "| Euler 10 | held-out K=1 | K=2 | K=4 | Euler 10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in order:
        rs = [r for r in results if r["method"] == m]

        def ms(key, scale=100.0, digits=1, pct="%"):
            v = [float(r[key]) * scale for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}{pct}" if len(v) > 1 else f"{v[0]:.{digits}f}{pct}"

        accs = [ms(f"{s}{k}_{split}") for split in ("held-in", "held-out")
                for s, k in (("tafs", 1), ("tafs", 2), ("tafs", 4), ("euler", 10))]
        if m == "base":
            lines.append(f"| base (no RL) | – | 0 | – | – | " + " | ".join(accs) + " |")
            continue
        its = "/".join(str(r["iterations"]) for r in rs)
        wall = "/".join(f"{float(r['wall_s']):.0f}" for r in rs)
        rew = (f"{statistics.mean(float(r['reward_first20pct']) for r in rs):.3f} → "
               f"{statistics.mean(float(r['reward_last20pct']) for r in rs):.3f}")
        lines.append(f"| {m} | {len(rs)} | {its} | {wall} | {rew} | " + " | ".join(accs) + " |")
    n_in = int(results[0]["n_held-in"])
    n_out = int(results[0]["n_held-out"])
    base = results[0]
    lines += [
        "",
        f"Binomial noise of one evaluation (sd of an accuracy p over n prompts, √(p(1−p)/n)), at the base "
        f"checkpoint's accuracy: held-in (n = {n_in}) K=4 ±{binomial_sd(float(base['tafs4_held-in']), n_in):.1f} pp, "
        f"K=1 ±{binomial_sd(float(base['tafs1_held-in']), n_in):.1f} pp; held-out (n = {n_out}) "
        f"K=4 ±{binomial_sd(float(base['tafs4_held-out']), n_out):.1f} pp; at most ±{binomial_sd(0.5, n_in):.1f} / "
        f"±{binomial_sd(0.5, n_out):.1f} pp. Every policy sees the same initial noise, so differences between "
        f"rows are paired and less noisy than that.",
        "The final-image reward is each method's own (TAFS-GRPO: its 4th step's x̂0; the others: their "
        "10-step final image, SDE for Flow-GRPO and BranchGRPO, SDE in the window for MixGRPO, the old "
        "policy's ODE image for DiffusionNFT), so its levels are comparable only within a method.",
    ]
    linked = sorted(p for p in curves.iterdir() if (p / "metrics.jsonl").is_file())
    if linked:
        keys = sorted({reward_key(metrics(p)) for p in linked})
        y = []
        for k in keys:
            y += ["--y", k]
        sh([a.flowrun, "compare", *linked, *y, "--smooth", "3", "--out", out / "reward_vs_wallclock.png",
            "--title", "final-image reward vs wall-clock"], log)
        lines += ["", "Reward against wall-clock: `reward_vs_wallclock.png` (`flowrun compare`, mean of 3 iterations)."]
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_ablation(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    iters = 2 if a.smoke else a.iterations
    limit = "2" if a.smoke else str(a.limit)
    smoke = ["nodes.prompts.params.prompts_per_iter=2", "nodes.prompts.params.group_size=2"] if a.smoke else []
    modes = MODES[:2] if a.smoke else a.modes
    taus = list(TAUS)[:1] if a.smoke else a.taus
    res_csv = out / "ablation.csv"
    results, done = finished_cells(res_csv, "mode", "tau", "seed")  # resume: skip finished cells
    if ("base", "-", "-") not in done:  # the starting checkpoint, same evaluation
        acc = evaluate(a, ROOT / "checkpoints" / "shapes-small.safetensors", "datasets/shapes/eval.jsonl",
                       out / "base.eval.csv", log, limit)
        r = {"mode": "base", "tau": "-", "seed": "-", "iterations": 0, "wall_s": "0.0",
             "final_reward_last": "nan", "acc2_heldin": frac(acc, "all", 2),
             "acc4_heldin": frac(acc, "all", 4), "acc4_heldout": frac(acc, "heldout", 4)}
        results.append(r)
        append_csv(res_csv, r)
    for mode in modes:
        for tau in taus:
            for seed in a.seeds:
                if (mode, tau, str(seed)) in done:
                    continue
                name = f"{mode}-{tau}-s{seed}"
                run = train(
                    a, "pipelines/tafs_grpo.yaml", Path(a.runs_dir) / name, log,
                    smoke + [f"iterations={iters}", f"seed={seed}",
                             f"nodes.advantages.params.mode={mode}",
                             f"nodes.step.vars.tau={TAUS[tau]}"],
                )
                acc = evaluate(a, final_policy(run), "datasets/shapes/eval.jsonl",
                               out / f"{name}.eval.csv", log, limit)
                rows = metrics(run)
                key = reward_key(rows)
                r = {"mode": mode, "tau": tau, "seed": str(seed), "iterations": len(rows),
                     "wall_s": f"{rows[-1]['elapsed_s']:.1f}",
                     "final_reward_last": f"{rows[-1][key]:.4f}", "acc2_heldin": frac(acc, "all", 2),
                     "acc4_heldin": frac(acc, "all", 4), "acc4_heldout": frac(acc, "heldout", 4)}
                results.append(r)
                append_csv(res_csv, r)
    lines = ["| mode | τ schedule | seeds | 2-step acc. held-in (mean ± sd) | 4-step held-in | 4-step held-out | last reward "
             "| training reward x̂0₂ / x̂0_K, last 10 updates |",
             "|---|---|---|---|---|---|---|---|"]
    cells = []
    for r in results:  # every cell on record, this invocation's and earlier ones'
        if (r["mode"], r["tau"]) not in cells:
            cells.append((r["mode"], r["tau"]))
    for mode, tau in cells:
        cell = [r for r in results if r["mode"] == mode and r["tau"] == tau]
        def ms(key):
            v = [float(r[key]) for r in cell if key in r]
            if not v:
                return "–"
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{100 * statistics.mean(v):.1f} ± {100 * sd:.1f}%"
        if mode == "base":
            lines.append(f"| base (no RL) | – | – | {ms('acc2_heldin')} | {ms('acc4_heldin')} | "
                         f"{ms('acc4_heldout')} | – | – |")
            continue
        rew = statistics.mean(float(r["final_reward_last"]) for r in cell)
        rewards = [training_reward(Path(a.runs_dir) / f"{mode}-{tau}-s{r['seed']}") for r in cell]
        rewards = [t for t in rewards if t]
        if rewards:
            tr = (f"{statistics.mean(t[0] for t in rewards):.3f} / "
                  f"{statistics.mean(t[1] for t in rewards):.3f}")
        else:
            tr = "–"
        lines.append(f"| {mode} | {tau} | {len(cell)} | {ms('acc2_heldin')} | {ms('acc4_heldin')} | "
                     f"{ms('acc4_heldout')} | {rew:.3f} | {tr} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_sweep(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    res_csv = out / "sweep.csv"
    results, done = finished_cells(res_csv, "config", "seed")  # resume: skip finished cells
    configs = [("base", "")] + [(n, s) for n, s in (a.config or [])]
    for name, sets in configs:
        for seed in ([0] if name == "base" else a.seeds):
            if (name, str(seed)) in done:
                continue
            tag = f"{name}-s{seed}"
            if name == "base":
                ck, its, wall, first, last = ROOT / "checkpoints" / "shapes-small.safetensors", 0, 0.0, 0.0, 0.0
            else:
                extra = [x.strip() for x in sets.split(";") if x.strip()]
                run = train(a, "pipelines/tafs_grpo.yaml", Path(a.runs_dir) / tag, log,
                            [f"iterations={a.iterations}", f"seed={seed}"] + extra)
                ck = final_policy(run)
                rows = metrics(run)
                key = reward_key(rows)
                n = max(1, len(rows) // 5)
                its, wall = len(rows), rows[-1]["elapsed_s"]
                first = statistics.mean(r[key] for r in rows[:n])
                last = statistics.mean(r[key] for r in rows[-n:])
            acc = evaluate(a, ck, "datasets/shapes/eval.jsonl", out / f"{tag}.eval.csv", log, str(a.limit))
            r = {"config": name, "sets": sets, "seed": str(seed), "iterations": its, "wall_s": f"{wall:.1f}",
                 "reward_first20pct": f"{first:.4f}", "reward_last20pct": f"{last:.4f}"}
            for k in (1, 2, 4):
                r[f"acc{k}_heldin"] = frac(acc, "all", k)
            r["acc4_heldout"] = frac(acc, "heldout", 4)
            results.append(r)
            append_csv(res_csv, r)
    lines = ["| config | overrides | seed | iterations | wall s | reward first→last 20% | held-in K=1 | K=2 | K=4 | held-out K=4 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        pct = lambda k: f"{100 * float(r[k]):.1f}%"
        lines.append(f"| {r['config']} | `{r['sets']}` | {r['seed']} | {r['iterations']} | {r['wall_s']} | "
                     f"{r['reward_first20pct']} → {r['reward_last20pct']} | {pct('acc1_heldin')} | "
                     f"{pct('acc2_heldin')} | {pct('acc4_heldin')} | {pct('acc4_heldout')} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_curve(a):
    if not a.policies:
        sys.exit("curve needs --policies DIR (a directory of NAME.safetensors snapshots)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    limit = "2" if a.smoke else str(a.limit)
    snaps = sorted(Path(a.policies).glob("*.safetensors"))
    if not snaps:
        sys.exit(f"no *.safetensors under {a.policies}")
    policies = [("base", ROOT / "checkpoints" / "shapes-small.safetensors")] + [(p.stem, p) for p in snaps]
    rows = []
    for name, ck in policies:
        split = evaluate_splits(a, name, ck, out, log, limit)
        t, e = split["train"], split["eval"]
        row = {"policy": name}
        for split, acc, cat in [("train", t, "all"), ("heldin", e, "all"), ("heldout", e, "heldout")]:
            for k in (1, 2, 4):
                row[f"{split}_k{k}"] = frac(acc, cat, k)
        rows.append(row)
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Accuracy with the TAFS sampler (τ linear 1.0 → {a.tau_end}) at K steps; "
        f"{'all' if limit == '0' else limit} eval prompts per category, {a.train_limit} training prompts per category.",
        "",
        "| policy | train K=1 | K=2 | K=4 | held-in K=1 | K=2 | K=4 | held-out K=1 | K=2 | K=4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{100 * float(r[f'{s}_k{k}']):.1f}%" for s in ("train", "heldin", "heldout") for k in (1, 2, 4)]
        lines.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["table", "methods", "ablation", "sweep", "curve"])
    p.add_argument("--flowrun", default=str(ROOT / "target" / "release" / "flowrun"))
    p.add_argument("--device", default="flex")
    p.add_argument("--budget", default="20m", help="table, methods: wall-clock per RL run")
    p.add_argument("--iterations", type=int, default=15, help="ablation: iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="methods: the algorithms to train (default: all)")
    p.add_argument("--taus", nargs="+", default=list(TAUS)[:2], choices=list(TAUS))
    p.add_argument("--limit", type=int, default=None,
                   help="eval prompts per split and category (0 = all; default 20, methods: all)")
    p.add_argument("--train-limit", type=int, default=100, help="table: training prompts per category")
    p.add_argument("--config", nargs=2, action="append", metavar=("NAME", "SETS"),
                   help="sweep: a named configuration, `;`-separated --set overrides")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="an override for every RL run (repeatable), e.g. resources.policy.params.lr=1e-4")
    p.add_argument("--tau-end", default="0.6",
                   help="evaluation: TAFS temperature at step K, linear from 1.0 (the pipeline's schedule)")
    p.add_argument("--policies", default=None, help="curve: directory of NAME.safetensors policy snapshots")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny budgets: checks the harness only")
    p.add_argument("--runs-dir", default=None,
                   help="where the RL runs go (default runs/experiments-<what>; keep them out of results/)")
    a = p.parse_args()
    if a.limit is None:
        a.limit = 0 if a.what == "methods" else 20
    a.out = a.out or str(ROOT / "results" / (a.what + ("-smoke" if a.smoke else "")))
    a.runs_dir = a.runs_dir or str(ROOT / "runs" / f"experiments-{a.what}")
    if not os.access(a.flowrun, os.X_OK):
        sys.exit(f"no flowrun binary at {a.flowrun}: cargo build --release (or pass --flowrun)")
    {"table": cmd_table, "methods": cmd_methods, "ablation": cmd_ablation, "sweep": cmd_sweep, "curve": cmd_curve}[a.what](a)


if __name__ == "__main__":
    main()
