#!/usr/bin/env bash
# Quick start, command 1: set everything up (idempotent), then run iqt-pipe's main job on the
# embedded default: a synthetic subject with known ground truth, written to demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NIPYPE_NO_ET=1
BIN=.venv/bin
DATA=demo/ds-synthetic
if [ ! -f "$DATA/dataset_description.json" ]; then
  "$BIN/iqt-phantom" "$DATA" --preset demo --subjects 1 --seed 1 --snr 30
fi
"$BIN/iqt-degrade" "$DATA/sub-01/dwi/sub-01_dwi.nii.gz" -o demo/out/sub-01 --upsample 2
echo "demo: inputs in $DATA (ground truth in $DATA/derivatives/phantom-truth), outputs in demo/out"
