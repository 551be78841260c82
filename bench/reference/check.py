#!/usr/bin/env python3
"""Cross-checks of the PyTorch reference (flowref.py) against the flowrun binary.

    python bench/reference/check.py [--flowrun target/release/flowrun] [--run-dir RUN_DIR]

1. velocity: the same weights and inputs give the same velocity v_θ(x_t, t, c) in flowrun
   (`flowrun velocity`, flex) and in the reference: the shipped checkpoint with and without
   classifier-free guidance, and a randomly initialised tiny model written by the reference
   (tests the checkpoint format both ways). Inputs include t = 0 and 1 and the null prompt.
2. trajectories (needs pyarrow): runs pipelines/tafs_grpo.yaml for 2 iterations with a small
   batch, `tensors: f32` and a checkpoint every iteration (or reads --run-dir), then
   * recomputes every stored old log-prob from the stored x_t, x_next, t and kernel with the
     reference model and the weights that sampled that iteration,
   * recomputes the advantages from the stored per-step rewards (group-normalised, the
     run's default `mix` mode, λ = 0.5),
   * replays iteration 1's GRPO update in the reference (clipped loss, grad-norm clip, AdamW
     with the pipeline's defaults) and compares the gradient norm flowrun logged and the
     updated weights flowrun checkpointed.

Exits 1 on any failure (2 on a usage or setup error). Needs torch, numpy, safetensors;
pyarrow for part 2 (skipped with a NOTICE without it).
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import flowref  # noqa: E402

# Tolerances (see README.md).
VELOCITY_REL_TOL = 1e-4       # max |Δv| / max |v|
LOGPROB_ABS_TOL = 1e-4        # |Δ log π| (mean over dims); 1e-4 is GRPO's default clip range
LOGPROB_ABS_TOL_F16 = 2e-3    # when the run stored the states as float16
ADVANTAGE_ABS_TOL = 1e-5
GRAD_NORM_REL_TOL = 1e-3
LOSS_ABS_TOL = 1e-6
UPDATE_FLIP_FRAC_TOL = 1e-4   # fraction of weights whose update differs by more than lr/2

PROMPTS = [
    "a red circle", "", "two blue squares to the left of a green cross", "three crosses",
    "an orange triangle above a purple diamond", "a yellow square", "", "two circles",
]
TIMES = [1.0, 0.75, 0.5, 0.25, 0.0, 0.9, 0.33, 0.05]

failures = []


def report(name, value, tol, ok=None):
    ok = value <= tol if ok is None else ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3e} (tolerance {tol:.0e})")
    if not ok:
        failures.append(name)


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    if p.returncode != 0:
        print(f"error: {' '.join(cmd)} exited {p.returncode}\n{p.stdout}{p.stderr}")
        sys.exit(2)
    return p


def rel_diff(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ------------------------------------------------------------------------------------------
# 1. velocity
# ------------------------------------------------------------------------------------------

def velocity_check(flowrun, work, name, checkpoint, model, cfg):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(PROMPTS), 3, 32, 32, generator=g)
    t = torch.tensor(TIMES, dtype=torch.float32)
    tokens = flowref.tokens_tensor(PROMPTS)
    inputs = os.path.join(work, f"velocity-in-{name}.safetensors")
    out = os.path.join(work, f"velocity-out-{name}.safetensors")
    save_file({"x_t": x.numpy(), "t": t.numpy(), "tokens": tokens.numpy()}, inputs)
    run([flowrun, "velocity", "--checkpoint", checkpoint, "--inputs", inputs, "--out", out,
         "--cfg", str(cfg)])
    v_flowrun = load_file(out)["v"]
    with torch.no_grad():
        v_ref = model.forward_cfg(x, t, tokens, cfg).numpy()
    if np.abs(v_flowrun).max() < 1e-4:
        print(f"FAIL velocity {name}: flowrun's velocity is zero, nothing compared")
        failures.append(f"velocity {name}")
        return
    report(f"velocity {name} max|Δv|/max|v| (max|v| = {np.abs(v_flowrun).max():.2f})",
           rel_diff(v_ref, v_flowrun), VELOCITY_REL_TOL)


def tiny_random_model(path):
    """A randomly initialised tiny model (every parameter non-trivial), saved by the reference."""
    cfg = dict(vocab_size=len(flowref.VOCAB), max_tokens=flowref.MAX_TOKENS, image_size=32,
               image_channels=3, channels=[8, 16, 32], res_blocks=1, mid_blocks=1,
               attn_resolutions=[16, 8], joint_attn_resolutions=[8], attn_head_dim=8, groups=4,
               text_dim=32, text_layers=1, text_heads=2, time_freq_dim=32, cond_dim=32,
               cfg_dropout=0.1, seed=0)
    torch.manual_seed(3)
    model = flowref.FlowModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("beta", "bias", "pos_embedding")):
                p.copy_(0.1 * torch.randn_like(p))
    flowref.save_checkpoint(model, path)
    return flowref.load_checkpoint(path)


# ------------------------------------------------------------------------------------------
# 2. trajectories, advantages, update
# ------------------------------------------------------------------------------------------

def run_pipeline(flowrun, work):
    runs = os.path.join(work, "runs")
    run([flowrun, "pipelines/tafs_grpo.yaml", "--runs-dir", runs, "--quiet",
         "--set", "iterations=2", "--set", "checkpoint_every=1",
         "--set", "nodes.prompts.params.prompts_per_iter=2",
         "--set", "nodes.prompts.params.group_size=4",
         "--set", "nodes.trajectories.params.tensors=f32"])
    dirs = sorted(glob.glob(os.path.join(runs, "tafs_grpo-*")))
    if not dirs:
        print(f"error: no run directory under {runs}")
        sys.exit(2)
    return dirs[-1]


def base_checkpoint(run_dir):
    """The `checkpoint:` of the run's resolved pipeline (the weights of iteration 1)."""
    with open(os.path.join(run_dir, "pipeline.yaml")) as f:
        m = re.search(r"^\s*checkpoint:\s*['\"]?([^'\"\s#]+)", f.read(), re.M)
    if not m:
        return None
    path = m.group(1)
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def read_iteration(path):
    import pyarrow.parquet as pq
    t = pq.read_table(path)
    cols = {c: np.asarray(t.column(c).to_pylist()) for c in
            ["group", "sample", "step", "t", "cfg", "kernel_a", "kernel_b", "kernel_std",
             "old_logprob", "advantage", "reward", "reward_before"]}
    x_t = t.column("x_t").combine_chunks().to_numpy_ndarray().astype(np.float32)
    x_next = t.column("x_next").combine_chunks().to_numpy_ndarray().astype(np.float32)
    f16 = "halffloat" in str(t.schema.field("x_t").type) or "float16" in str(
        t.schema.field("x_t").type)
    prompts = t.column("prompt").to_pylist()
    steps = []
    for k in sorted(set(cols["step"].tolist())):
        idx = np.where(cols["step"] == k)[0]
        idx = idx[np.argsort(cols["sample"][idx])]
        c = {name: v[idx] for name, v in cols.items()}
        steps.append(dict(
            t=float(c["t"][0]), cfg=float(c["cfg"][0]), a=float(c["kernel_a"][0]),
            b=float(c["kernel_b"][0]), std=float(c["kernel_std"][0]),
            x_t=torch.from_numpy(x_t[idx]), x_next=torch.from_numpy(x_next[idx]),
            old_logprob=torch.from_numpy(c["old_logprob"].astype(np.float32)),
            advantage=c["advantage"].astype(np.float32), reward=c["reward"],
            reward_before=c["reward_before"], group=c["group"],
            tokens=flowref.tokens_tensor([prompts[i] for i in idx])))
    return steps, f16


def metrics_row(run_dir, iteration):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("iteration") == iteration:
                    return row
    return {}


def trajectory_checks(run_dir, checkpoint):
    files = sorted(glob.glob(os.path.join(run_dir, "trajectories", "iter-*.parquet")))
    if not files:
        print(f"error: no trajectories/iter-*.parquet in {run_dir}")
        sys.exit(2)
    for path in files:
        it = int(re.search(r"iter-(\d+)", path).group(1))
        weights = checkpoint if it == 1 else os.path.join(
            run_dir, "checkpoints", f"iter-{it - 1:06d}", "resources", "policy",
            "model.safetensors")
        if not weights or not os.path.exists(weights):
            print(f"NOTICE: iteration {it}: the weights that sampled it are not stored; skipped")
            continue
        steps, f16 = read_iteration(path)
        model = flowref.load_checkpoint(weights)
        # Old log-probs.
        worst = 0.0
        for s in steps:
            b = s["x_t"].shape[0]
            with torch.no_grad():
                v = model.forward_cfg(s["x_t"], torch.full((b,), s["t"]), s["tokens"], s["cfg"])
                lp = flowref.log_prob(s["x_next"], s["a"] * s["x_t"] + s["b"] * v, s["std"])
            worst = max(worst, float((lp - s["old_logprob"]).abs().max()))
        report(f"iteration {it}: old log-prob max|Δ| ({len(steps)} steps × "
               f"{steps[0]['x_t'].shape[0]} samples{', f16 states' if f16 else ''})",
               worst, LOGPROB_ABS_TOL_F16 if f16 else LOGPROB_ABS_TOL)
        # Advantages from the stored rewards: rewards[0] = reward_before of step 1,
        # rewards[k] = reward of step k.
        rewards = [steps[0]["reward_before"].astype(np.float32)] + [
            s["reward"].astype(np.float32) for s in steps]
        adv = flowref.step_advantages(rewards, steps[0]["group"], mode="mix", lam=0.5)
        worst = max(float(np.abs(a - s["advantage"]).max()) for a, s in zip(adv, steps))
        report(f"iteration {it}: advantages (mix, λ=0.5) max|Δ|", worst, ADVANTAGE_ABS_TOL)
        if it == 1:
            update_check(run_dir, model, steps)


def pipeline_lr(run_dir):
    """The policy's `lr:` in the run's resolved pipeline (what flowrun's update used)."""
    with open(os.path.join(run_dir, "pipeline.yaml")) as f:
        m = re.search(r"^\s*lr:\s*([0-9.eE+-]+)", f.read(), re.M)
    if not m:
        print(f"error: no `lr:` in {run_dir}/pipeline.yaml")
        sys.exit(2)
    return float(m.group(1))


def update_check(run_dir, model, steps):
    after_path = os.path.join(run_dir, "checkpoints", "iter-000001", "resources", "policy",
                              "model.safetensors")
    row = metrics_row(run_dir, 1)
    if not os.path.exists(after_path) or "update/grad_norm" not in row:
        print("NOTICE: no checkpoint after iteration 1 (checkpoint_every=1) or no update "
              "metrics; update replay skipped")
        return
    grpo = flowref.TafsGrpo(model, hp=dict(lr=pipeline_lr(run_dir)))
    transitions = [dict(t=s["t"], a=s["a"], b=s["b"], std=s["std"], x_t=s["x_t"],
                        x_next=s["x_next"], old_logprob=s["old_logprob"]) for s in steps]
    grpo.hp["cfg"] = steps[0]["cfg"]
    loss, grad_norm = grpo.update(steps[0]["tokens"], transitions,
                                  [s["advantage"] for s in steps])
    fr_norm = row["update/grad_norm"]
    report(f"update: grad norm {grad_norm:.6f} vs flowrun {fr_norm:.6f}, relative Δ",
           abs(grad_norm - fr_norm) / max(fr_norm, 1e-12), GRAD_NORM_REL_TOL)
    report(f"update: loss {loss:.3e} vs flowrun {row['update/loss']:.3e}, |Δ|",
           abs(loss - row["update/loss"]), LOSS_ABS_TOL)
    lr = grpo.hp["lr"]
    after = load_file(after_path)
    linear = flowref._linear_weight_names(model)
    state = model.state_dict()
    worst, flips, total = 0.0, 0, 0
    for name, w in after.items():
        r = state[name].numpy()
        d = np.abs((r.T if name in linear else r) - w) / lr
        worst = max(worst, float(d.max()))
        flips += int((d > 0.5).sum())
        total += d.size
    report(f"update: weights after one AdamW step, max |Δθ| = {worst:.3f}·lr; fraction of "
           f"{total} weights off by more than lr/2", flips / total, UPDATE_FLIP_FRAC_TOL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flowrun", default=os.environ.get(
        "FLOWRUN_BIN", os.path.join(ROOT, "target", "release", "flowrun")))
    ap.add_argument("--checkpoint", default=None,
                    help="weights of the run's iteration 1 (default: the run's `checkpoint:`)")
    ap.add_argument("--run-dir", help="check this run (tensors: f32|f16) instead of running one")
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--skip-trajectories", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.flowrun):
        print(f"error: flowrun binary {args.flowrun} not found (cargo build --release)")
        return 2
    work = args.work or tempfile.mkdtemp(prefix="flowrun-reference-")
    os.makedirs(work, exist_ok=True)
    try:
        torch.set_grad_enabled(True)
        shipped = os.path.join(ROOT, "checkpoints", "shapes-small.safetensors")
        model = flowref.load_checkpoint(shipped)
        velocity_check(args.flowrun, work, "shipped checkpoint", shipped, model, 1.0)
        velocity_check(args.flowrun, work, "shipped checkpoint, cfg 3", shipped, model, 3.0)
        tiny = os.path.join(work, "tiny-random.safetensors")
        velocity_check(args.flowrun, work, "tiny random model", tiny, tiny_random_model(tiny),
                       1.0)
        if args.skip_trajectories:
            pass
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                print("NOTICE: pyarrow is not installed; trajectory checks skipped "
                      "(pip install pyarrow)")
            else:
                run_dir = args.run_dir or run_pipeline(args.flowrun, work)
                checkpoint = args.checkpoint or base_checkpoint(run_dir)
                trajectory_checks(run_dir, checkpoint)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
        return 1
    print("all reference checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
