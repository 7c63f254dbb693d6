#!/usr/bin/env bash
# Quick start, command 1: set everything up (idempotent), then run the whole pipeline with the
# bundled default model on synthetic subjects with known ground truth, all written to demo/.
#   1. iqt-phantom: three synthetic subjects (2.5 mm, 48 directions, SNR 30)
#   2. iqt-pipe participant on sub-01 (bundled model), then iqt-pipe group
#   3. iqt-eval: the bundled model against nearest, trilinear and cubic B-spline on sub-01
# A second run reuses the dataset and the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NIPYPE_NO_ET=1
BIN=.venv/bin
DATA=demo/ds-synthetic
if [ ! -f "$DATA/sub-03/dwi/sub-03_dwi.nii.gz" ]; then
  "$BIN/iqt-phantom" "$DATA" --preset demo --subjects 3 --seed 1 --snr 30
fi
"$BIN/iqt-pipe" "$DATA" demo/out participant --participant-label 01 -w demo/work
"$BIN/iqt-pipe" "$DATA" demo/out group
"$BIN/iqt-eval" "$DATA" -o demo/eval --participant-label 01 --quiet
echo "demo: inputs in $DATA (ground truth in $DATA/derivatives/phantom-truth), derivatives in demo/out," \
     "evaluation in demo/eval/results.md"
