#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and PyTorch but no Rust toolchain: run a flowrun
# binary built elsewhere with `--features tch` against that machine's own torch `lib/`.
#
#   scripts/gpu_check.sh [BINARY] [OUT_DIR] [SD3_DIR]   (from the repository root; defaults:
#                                       target/release/flowrun, gpu-check/, sd3-small/)
#
# SD3_DIR is the SD3 small benchmark model and its embeddings, built where diffusers is
# installed (`python bench/reference/sd3_bench.py build sd3-small`: 38 MB) and copied over with
# the repository; without it the SD3 part is skipped.
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
# iteration time, and the peak GPU memory seen by nvidia-smi while it ran; then, with SD3_DIR,
# the SD3 small TAFS-GRPO iteration (`flowrun bench --sd3`, 16 samples, K = 4, CFG 4.5) in full
# fine-tuning, with LoRA r32, LoRA + activation checkpointing, LoRA over a bf16 base (with and
# without checkpointing), samples/s and the peak
# GPU memory of each, the validation estimate against the GPU's free memory, and the per-block
# memory probes. Everything is also written to OUT_DIR/gpu_check.log.
set -uo pipefail
bin=${1:-target/release/flowrun}
out=${2:-gpu-check}
sd3=${3:-sd3-small}
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

peak_since() {  # the largest nvidia-smi reading after line $1 of the samples
  tail -n +"$(( $1 + 1 ))" "$mem" 2>/dev/null | sort -n | tail -1
}
if [ -f "$sd3/transformer/config.json" ] && [ -f "$sd3/embeds.safetensors" ]; then
  for mode in full lora lora-ckpt lora-bf16 lora-bf16-ckpt; do
    say "== SD3 small TAFS-GRPO iteration on CUDA ($mode)"
    case $mode in
      full) extra=() ;;
      lora) extra=(--lora 32:64) ;;
      lora-ckpt) extra=(--lora 32:64 --activation-checkpointing) ;;
      lora-bf16) extra=(--lora 32:64 --base-dtype bf16) ;;
      lora-bf16-ckpt) extra=(--lora 32:64 --base-dtype bf16 --activation-checkpointing) ;;
    esac
    from=$(wc -l < "$mem" 2>/dev/null || echo 0)
    run timeout 300 "$bin" bench --sd3 "$sd3/transformer" --embeddings "$sd3/embeds.safetensors" \
      --device libtorch-cuda:0 --batches 16 --steps 4 --repeats 3 "${extra[@]}" \
      --json "$out/sd3-$mode.json" || status=1
    say "peak GPU memory during the SD3 $mode run (nvidia-smi, whole GPU): $(peak_since "$from") MiB"
    if [ -f "$out/sd3-$mode.json" ]; then
      python3 - "$out/sd3-$mode.json" <<'PY' | tee -a "$log"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["devices"][0]["configs"][0]
ms = c["per_sample_ms"]
print(f"samples/s: {1000.0 / ms['iteration']:.2f} (per sample: iteration {ms['iteration']:.1f} ms, "
      f"rollout {ms['rollout']:.1f} ms, update {ms['update']:.1f} ms; medians)")
PY
    fi
  done
  say "== SD3: the validation estimate against the GPU's free memory (cudaMemGetInfo)"
  run "$bin" validate pipelines/tafs_grpo_sd3.yaml --set device=libtorch-cuda:0 \
    --set "resources.policy.params.diffusers=$sd3/transformer" \
    --set "nodes.prompts.params.embeddings=$sd3/embeds.safetensors" \
    --set 'resources.policy.params.lora={rank: 32, alpha: 64}' --set memory_check=warn || status=1
  say "== SD3 per-block memory probes on CUDA"
  run timeout 300 "$bin" bench --sd3 "$sd3/transformer" --device libtorch-cuda:0 --memory-probe \
    --json "$out/sd3-memory.json" || status=1
else
  say "== SD3: skipped (no $sd3/transformer and $sd3/embeds.safetensors; see the header)"
fi

kill $sampler 2>/dev/null
if [ -s "$mem" ]; then
  say "peak GPU memory used (nvidia-smi, whole GPU): $(sort -n "$mem" | tail -1) MiB"
fi
say "== done (status $status)"
exit $status
