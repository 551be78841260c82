#!/usr/bin/env python3
"""Analyse a run's stored trajectories (trajectory_sink Parquet files) with Polars.

    python3 examples/analyze.py RUN_DIR [--out plot.png]

Prints the mean reward per transition step and iteration, the advantage distribution per
step, and writes a PNG (reward per step over iterations, advantage histograms) when matplotlib
is installed. Needs: pip install polars (pyarrow for the tensor columns; matplotlib for the plot)
"""

import argparse
import os
import sys

import polars as pl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run directory (or its trajectories/ directory)")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/trajectories.png)")
    a = ap.parse_args()
    tdir = a.run_dir
    if os.path.isdir(os.path.join(tdir, "trajectories")):
        tdir = os.path.join(tdir, "trajectories")
    # Hidden temporaries (.iter-*.tmp-*) and _superseded/ never match this glob.
    scalars = [
        "iteration", "group", "sample", "step", "t", "temperature", "reward", "reward_before",
        "advantage", "old_logprob", "correct",
    ]
    lf = pl.scan_parquet(os.path.join(tdir, "iter-*.parquet")).select(scalars)
    df = lf.collect()
    if df.is_empty():
        sys.exit(f"no trajectories in {tdir}")
    print(f"{df.height} rows, iterations {df['iteration'].min()}..{df['iteration'].max()}, "
          f"{df['step'].n_unique()} transition steps")

    per_step = (
        df.group_by("iteration", "step")
        .agg(
            pl.col("reward").mean().alias("reward"),
            (pl.col("reward") - pl.col("reward_before")).mean().alias("gain"),
            pl.col("advantage").mean().alias("adv_mean"),
            pl.col("advantage").std().alias("adv_std"),
            pl.col("correct").mean().alias("accuracy"),
        )
        .sort("iteration", "step")
    )
    with pl.Config(tbl_rows=40):
        print("\nreward of the prediction after each step, per iteration:")
        print(per_step.pivot(on="step", index="iteration", values="reward").sort("iteration"))
        print("\nadvantage distribution per step:")
        print(
            df.group_by("step")
            .agg(
                pl.col("advantage").mean().alias("mean"),
                pl.col("advantage").std().alias("std"),
                pl.col("advantage").quantile(0.05).alias("p05"),
                pl.col("advantage").median().alias("median"),
                pl.col("advantage").quantile(0.95).alias("p95"),
                (pl.col("advantage").abs() > 1e-6).mean().alias("nonzero"),
            )
            .sort("step")
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib not installed: no plot (pip install matplotlib)")
        return
    out = a.out or os.path.join(os.path.dirname(os.path.normpath(tdir)), "trajectories.png")
    steps = sorted(df["step"].unique().to_list())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in steps:
        d = per_step.filter(pl.col("step") == s)
        ax1.plot(d["iteration"].to_list(), d["reward"].to_list(), label=f"after step {s}")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("mean reward")
    ax1.set_title("reward per step")
    ax1.legend()
    for s in steps:
        ax2.hist(df.filter(pl.col("step") == s)["advantage"].to_list(), bins=40, alpha=0.5,
                 label=f"step {s}")
    ax2.set_xlabel("advantage")
    ax2.set_title("advantage distribution")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nplot written to {out}")


if __name__ == "__main__":
    main()
