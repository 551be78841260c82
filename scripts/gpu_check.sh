#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and PyTorch but no Rust toolchain: run a flowrun
# binary built elsewhere with `--features tch` against that machine's own torch `lib/`.
#
#   scripts/gpu_check.sh [BINARY] [OUT_DIR]      (from the repository root; defaults:
#                                                  target/release/flowrun, gpu-check/)
#
# Building the binary for such a machine: its torch must match the libtorch the binary was built
# against in ABI. For a machine with PyPI's torch 2.11 (cu130), build here with
#   python3 -m venv .venv211 && .venv211/bin/pip install torch==2.11.0
#   PATH=$PWD/.venv211/bin:$PATH LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 \
#     CARGO_TARGET_DIR=target/gpu cargo build --release --features tch
# and copy target/gpu/release/flowrun over with the repository (checkpoints/, datasets/, pipelines/).
#
# What it does, in a few minutes: device info (read-only queries; it never changes the GPU's
# settings), the cross-backend check on CUDA (same checkpoint and inputs on flex and CUDA),
# forward/training-step throughput at two batch sizes, a short TAFS-GRPO run on the GPU with its
# iteration time, and the peak GPU memory seen by nvidia-smi while it ran. Everything is also
# written to OUT_DIR/gpu_check.log.
set -uo pipefail
bin=${1:-target/release/flowrun}
out=${2:-gpu-check}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
say() { echo "$@" | tee -a "$log"; }
run() { say "\$ $*"; "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }

[ -x "$bin" ] || { say "no flowrun binary at $bin (build with --features tch, see the header)"; exit 2; }
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { say "python3 cannot import torch: install PyTorch or set LD_LIBRARY_PATH to libtorch's lib/"; exit 2; }
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"

say "== device"
run nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
run python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
run nproc

# Peak GPU memory while the checks run (nvidia-smi, read-only, every 0.5 s).
mem="$out/gpu_memory.csv"
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$mem" 2>/dev/null; sleep 0.5; done ) &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT

status=0
say "== cross-backend check and throughput on CUDA"
run timeout 180 "$bin" device-check --device libtorch-cuda:0 --batch 64 --repeats 10 || status=1
run timeout 180 "$bin" device-check --device libtorch-cuda:0 --batch 256 --repeats 5 || status=1
say "== the same on libtorch CPU and flex (for ratios measured in this run)"
run timeout 180 "$bin" device-check --device libtorch --batch 64 --repeats 3 || status=1
run timeout 180 "$bin" device-check --device flex --batch 64 --repeats 3 || status=1

say "== TAFS-GRPO on CUDA (pipelines/tafs_grpo.yaml, 6 iterations, no eval)"
runs="$out/runs"
run timeout 300 "$bin" pipelines/tafs_grpo.yaml --device libtorch-cuda:0 --set iterations=6 \
  --runs-dir "$runs" --quiet || status=1
metrics=$(ls -d "$runs"/*/ 2>/dev/null | tail -1)metrics.jsonl
if [ -f "$metrics" ]; then
  python3 - "$metrics" <<'PY' | tee -a "$log"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.endswith("\n")]
later = rows[1:] or rows  # the first iteration includes CUDA warm-up
its = [r["iter_s"] for r in later]
print(f"iterations: {len(rows)}; median iteration time after the first: {statistics.median(its):.3f} s")
for k in sorted(k for k in later[0] if k.startswith("time/")):
    print(f"  {k}: median {statistics.median(r[k] for r in later if k in r):.3f} s")
PY
fi

kill $sampler 2>/dev/null
if [ -s "$mem" ]; then
  say "peak GPU memory used (nvidia-smi, whole GPU): $(sort -n "$mem" | tail -1) MiB"
fi
say "== done (status $status)"
exit $status
