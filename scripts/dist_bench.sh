#!/usr/bin/env bash
# Data-parallel timing (BENCHMARKS.md, "Data-parallel runs"): the main job (TAFS-GRPO on the
# shipped checkpoint, flex) on the same global batch, in one process and in two processes of one
# thread each over loopback (c10d Gloo), and the share of the update spent in the all-reduce.
#
#   scripts/dist_bench.sh [BINARY] [ITERATIONS] [PROMPTS_PER_ITER]
#     (defaults: target/tch/release/flowrun, 4, 8: 64 samples, K = 4; built with --features tch)
#
# Prints one row per configuration: median over iterations 2.. of the iteration, the sampling
# (iteration minus update) and the update times, and the update's all-reduce. Run it alone on the
# machine: the configurations share its cores.
set -euo pipefail
bin=${1:-target/tch/release/flowrun}
iters=${2:-4}
prompts=${3:-8}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
set_args=(--set iterations="$iters" --set checkpoint_every=0 --set "nodes.prompts.params.prompts_per_iter=$prompts"
  --set nodes.eval.every=100000 --set logging.tensorboard=false --quiet)
run1() { # threads
  RAYON_NUM_THREADS=$1 OMP_NUM_THREADS=$1 "$bin" run pipelines/tafs_grpo.yaml --runs-dir "$out/one-$1" "${set_args[@]}"
}
run2() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  for r in 0 1; do
    RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 \
      MASTER_PORT=$port "$bin" run pipelines/tafs_grpo.yaml --runs-dir "$out/two" "${set_args[@]}" &
  done
  wait
}
run1 1; run1 2; run2
python3 - "$out" <<'PY'
import glob, json, statistics, sys
def rows(d):
    f = glob.glob(f"{sys.argv[1]}/{d}/*/metrics.jsonl")[0]
    return [json.loads(l) for l in open(f)][1:]   # the first iteration warms up
print(f"{'configuration':34} {'iteration s':>11} {'sampling s':>10} {'update s':>9} {'all-reduce s':>12} {'share':>6}")
for d, name in [("one-1", "1 process, 1 thread"), ("one-2", "1 process, 2 threads"), ("two", "2 processes x 1 thread (Gloo)")]:
    r = rows(d)
    it = statistics.median(x["iter_s"] for x in r)
    up = statistics.median(x["time/update"] for x in r)
    ar = statistics.median(x.get("update/allreduce_s", 0.0) for x in r)
    print(f"{name:34} {it:11.2f} {it - up:10.2f} {up:9.2f} {ar:12.3f} {ar / up:6.1%}")
PY
