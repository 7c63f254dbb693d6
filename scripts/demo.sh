#!/usr/bin/env bash
# Quick start, command 1: set everything up (idempotent), then run the whole pipeline on the
# embedded default: synthetic subjects with known ground truth, all written to demo/.
#   1. iqt-phantom: three synthetic subjects (2.5 mm, 48 directions, SNR 30)
#   2. iqt-train:   a small model on sub-01 and sub-02 (no model is bundled yet)
#   3. iqt-pipe participant on sub-03, then iqt-pipe group
# A second run reuses the dataset, the model and the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NIPYPE_NO_ET=1
BIN=.venv/bin
DATA=demo/ds-synthetic
MODEL=demo/model
if [ ! -f "$DATA/sub-03/dwi/sub-03_dwi.nii.gz" ]; then
  "$BIN/iqt-phantom" "$DATA" --preset demo --subjects 3 --seed 1 --snr 30
fi
if [ ! -f "$MODEL/model.json" ]; then
  "$BIN/iqt-train" "$DATA" -o "$MODEL" --participant-label 01 02 --patches-per-subject 400 --epochs 4 --quiet
fi
"$BIN/iqt-pipe" "$DATA" demo/out participant --participant-label 03 --model "$MODEL" -w demo/work
"$BIN/iqt-pipe" "$DATA" demo/out group
echo "demo: inputs in $DATA (ground truth in $DATA/derivatives/phantom-truth), model in $MODEL, derivatives in demo/out"
