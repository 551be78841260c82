#!/usr/bin/env bash
# Export the model of a pretraining run as the shipped checkpoint:
#   scripts/export_checkpoint.sh runs/pretrain_shapes-<timestamp> [NAME]
# copies <run>/checkpoints/<latest>/resources/model/model.safetensors (the EMA weights) to
# checkpoints/NAME.safetensors (default shapes-small) and the run's metrics and resolved pipeline
# next to it, so the shipped file's provenance is in the repository.
set -euo pipefail
run=${1:?usage: scripts/export_checkpoint.sh RUN_DIR [NAME]}
name=${2:-shapes-small}
latest=$(cat "$run/checkpoints/latest")
src="$run/checkpoints/$latest/resources/model/model.safetensors"
[ -f "$src" ] || { echo "no model in $src" >&2; exit 1; }
mkdir -p checkpoints
cp "$src" "checkpoints/.$name.safetensors.tmp" && mv "checkpoints/.$name.safetensors.tmp" "checkpoints/$name.safetensors"
# Metrics up to the exported checkpoint's iteration.
it=$((10#${latest#iter-}))
python3 - "$run/metrics.jsonl" "$it" > "checkpoints/$name.metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.strip() and json.loads(line)["iteration"] <= int(sys.argv[2]):
        sys.stdout.write(line)
PY
cp "$run/pipeline.yaml" "checkpoints/$name.pipeline.yaml"
echo "exported $src (iteration $it) -> checkpoints/$name.safetensors"
