#!/usr/bin/env python3
"""Check a run's trajectory files with pyarrow, polars and pandas.

    python3 tests/python/check_parquet.py RUN_DIR [--tensors none|f32|f16] [--rows N]

Opens every trajectories/*.parquet (one by one and as a pyarrow dataset), checks the column
types, the tensor columns (arrow.fixed_shape_tensor, shape (rows, 3, 32, 32); an Array column in
Polars), and that the values equal what the run logged in metrics.jsonl: per iteration, the mean
reward of each step's prediction (`advantages/reward_step{k}`, else `score@{k}/reward_mean`) and
the mean |advantage| (`advantages/abs_mean`). Exits non-zero with a message on any mismatch.
Needs: pip install pyarrow polars pandas
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

SCALARS = {
    "run_id": pa.string(),
    "iteration": pa.uint64(),
    "prompt_id": pa.string(),
    "prompt": pa.string(),
    "category": pa.string(),
    "group": pa.uint32(),
    "sample": pa.uint32(),
    "member": pa.uint32(),
    "step": pa.uint32(),
    "t": pa.float32(),
    "t_next": pa.float32(),
    "temperature": pa.float32(),
    "reward": pa.float32(),
    "reward_before": pa.float32(),
    "advantage": pa.float32(),
    "trained": pa.bool_(),
    "old_logprob": pa.float32(),
    "kl": pa.float32(),
    "sampler": pa.string(),
    "cfg": pa.float32(),
    "kernel_a": pa.float32(),
    "kernel_b": pa.float32(),
    "kernel_std": pa.float32(),
    "crit_objects": pa.bool_(),
    "crit_count": pa.bool_(),
    "crit_color": pa.bool_(),
    "crit_position": pa.bool_(),
    "crit_no_extra": pa.bool_(),
    "correct": pa.bool_(),
}
TOL = 1e-5


def fail(msg):
    print(f"check_parquet: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def metric(row, *keys):
    for k in keys:
        if k in row and row[k] is not None:
            return float(row[k])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--tensors", choices=["none", "f32", "f16"], default="none")
    ap.add_argument("--rows", type=int, default=0, help="expected rows per file (0: any)")
    a = ap.parse_args()
    tdir = os.path.join(a.run_dir, "trajectories")
    files = sorted(glob.glob(os.path.join(tdir, "*.parquet")))
    if not files:
        fail(f"no trajectory files in {tdir}")
    rows = {}
    with open(os.path.join(a.run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[r["iteration"]] = r
    run_id = os.path.basename(os.path.normpath(a.run_dir))
    value_type = {"f32": pa.float32(), "f16": pa.float16()}.get(a.tensors)
    total = 0
    for path in files:
        t = pq.read_table(path)
        name = os.path.basename(path)
        # Types.
        for col, ty in SCALARS.items():
            if col not in t.schema.names:
                fail(f"{name}: no column {col}")
            if t.schema.field(col).type != ty:
                fail(f"{name}: column {col} is {t.schema.field(col).type}, expected {ty}")
        n = t.num_rows
        total += n
        if a.rows and n != a.rows:
            fail(f"{name}: {n} rows, expected {a.rows}")
        if value_type is None:
            if "x_t" in t.schema.names:
                fail(f"{name}: unexpected tensor columns")
        else:
            for col in ["x_t", "x_next"]:
                arr = t.column(col).combine_chunks()
                if not isinstance(arr, pa.FixedShapeTensorArray):
                    fail(f"{name}: {col} is {type(arr).__name__}, not a FixedShapeTensorArray")
                if arr.type.value_type != value_type or list(arr.type.shape) != [3, 32, 32]:
                    fail(f"{name}: {col} has type {arr.type}")
                if list(arr.type.dim_names) != ["C", "H", "W"]:
                    fail(f"{name}: {col} dim_names {arr.type.dim_names}")
                nd = arr.to_numpy_ndarray()
                if nd.shape != (n, 3, 32, 32):
                    fail(f"{name}: {col} ndarray shape {nd.shape}")
                if not np.isfinite(nd.astype(np.float32)).all():
                    fail(f"{name}: {col} has non-finite values")
        # Values against the logged metrics.
        df = pl.read_parquet(path)
        if value_type is not None:
            dt = df.schema["x_t"]
            storage = dt.ext_storage() if hasattr(dt, "ext_storage") and dt.is_extension() else dt
            if not isinstance(storage, pl.Array) or storage.size != 3072:
                fail(f"{name}: polars reads x_t as {dt}, expected an Array(…, 3072) column")
        its = df["iteration"].unique().to_list()
        if len(its) != 1:
            fail(f"{name}: iterations {its}")
        it = its[0]
        if name != f"iter-{it:06d}.parquet":
            fail(f"{name}: holds iteration {it}")
        if set(df["run_id"].unique().to_list()) != {run_id}:
            fail(f"{name}: run_id {df['run_id'].unique().to_list()} != {run_id}")
        if df["kl"].null_count() != n:
            fail(f"{name}: kl should be null")
        row = rows.get(it)
        if row is None:
            fail(f"{name}: iteration {it} not in metrics.jsonl")
        steps = sorted(df["step"].unique().to_list())
        per_step = df.group_by("step").agg(pl.col("reward").mean(), pl.col("reward_before").mean())
        means = {s: r for s, r, _ in per_step.iter_rows()}
        before = {s: b for s, _, b in per_step.iter_rows()}
        # Prediction 1 is scored before transition 1; prediction k+1 after transition k.
        checks = [(1, before[steps[0]])] + [(s + 1, means[s]) for s in steps]
        for k, v in checks:
            logged = metric(row, f"advantages/reward_step{k}", f"score@{k}/reward_mean")
            if logged is None or v is None:
                continue
            if abs(v - logged) > TOL:
                fail(f"{name}: mean reward of prediction {k} is {v}, logged {logged}")
        logged = metric(row, "advantages/abs_mean")
        if logged is not None:
            v = df["advantage"].abs().mean()
            if abs(v - logged) > TOL:
                fail(f"{name}: mean |advantage| {v}, logged {logged}")
        # pandas: plain scalar columns.
        pdf = pd.read_parquet(path, columns=["iteration", "sample", "step", "reward", "old_logprob"])
        if len(pdf) != n or not np.isfinite(pdf["old_logprob"].to_numpy()).all():
            fail(f"{name}: pandas read {len(pdf)} rows / non-finite old_logprob")
        if pdf.duplicated(["sample", "step"]).any():
            fail(f"{name}: duplicate (sample, step) rows")
    # The whole directory as one dataset: hidden temporaries and _superseded/ are ignored.
    d = ds.dataset(tdir, format="parquet", ignore_prefixes=[".", "_"],
                   exclude_invalid_files=False)
    if d.count_rows() != total:
        fail(f"dataset has {d.count_rows()} rows, files {total}")
    print(f"check_parquet: ok: {len(files)} files, {total} rows "
          f"(pyarrow {pa.__version__}, polars {pl.__version__}, pandas {pd.__version__})")


if __name__ == "__main__":
    main()
