#!/usr/bin/env bash
# Measures the peak RSS of the runs tests/memory_check.rs compares validation's memory estimate
# with, and prints each beside the estimate (README "What validation estimates").
#
#   scripts/memory_estimate.sh [FLOWRUN]            # flex cases (default: target/release/flowrun)
#   scripts/memory_estimate.sh target/tch/release/flowrun libtorch   # libtorch CPU cases
#
# Run it alone on the machine: each case is 3 iterations of a pipeline (~6 min for all on flex,
# 2 cores). Peaks are /usr/bin/time's maximum resident set size.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/flowrun}
device=${2:-flex}
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
tiny=(--set 'resources.policy.params.checkpoint=""' --set resources.policy.params.size=tiny)
keep=(--set resources.policy.params.rollout_graph=keep)
recompute=(--set resources.policy.params.rollout_graph=recompute)
ppi() { echo "--set nodes.prompts.params.prompts_per_iter=$1"; }

case_() {
  local name=$1 file=$2; shift 2
  local common=(--set "device=$device" --set iterations=3 --set nodes.eval.every=1000000)
  local est peak
  est=$("$bin" validate "$file" "${common[@]}" "$@" 2>&1 | grep -o 'estimated peak memory: [0-9.]* [GMT]iB' | cut -d' ' -f4-)
  /usr/bin/time -o "$runs/peak" -f '%M' "$bin" run -q --runs-dir "$runs" "$file" "${common[@]}" "$@" >/dev/null 2>&1
  peak=$(tail -1 "$runs/peak")
  printf '%-34s measured %6.3f GiB   estimated %s\n' "$name" "$(awk -v k="$peak" 'BEGIN { print k / 1048576 }')" "$est"
}

main=pipelines/tafs_grpo.yaml
for n in 2 8 32; do
  [ "$device" = flex ] || [ "$n" -le 8 ] || continue
  case_ "tafs_grpo small keep ppi $n" $main $(ppi $n)
done
case_ "tafs_grpo small recompute ppi 8" $main $(ppi 8) "${recompute[@]}"
for n in 2 8 32; do
  [ "$device" = flex ] || [ "$n" -le 8 ] || continue
  case_ "tafs_grpo tiny keep ppi $n" $main $(ppi $n) "${tiny[@]}"
done
if [ "$device" = flex ]; then
  case_ "tafs_grpo tiny recompute ppi 32" $main $(ppi 32) "${recompute[@]}" "${tiny[@]}"
  case_ "mixgrpo keep ppi 8" pipelines/mixgrpo.yaml $(ppi 8) "${keep[@]}"
  case_ "flow_grpo keep ppi 4" pipelines/flow_grpo.yaml $(ppi 4) "${keep[@]}"
fi
