#!/usr/bin/env bash
# The README's main command: train a tiny CLUE on scikit-learn's handwritten digits, from scratch, on a CPU.
#
#   bash demo.sh                 # -> runs/demo/
#   bash demo.sh --steps 3000    # extra arguments go to train.py (later flags win)
#   OUT=runs/other bash demo.sh
#
# Phase 1 trains a tiny VAE (32 px digits -> 8x8x4 latents), phase 2 the U-Net and the style encoder with
# v-prediction and the capacity objective gamma * |KL - C| (DESIGN.md, "What a quick trial showed": beta * KL can
# collapse the style, a large KL drifts off the prior; a small capacity C, 0.05 nats per style dimension, keeps
# the style in use). About 8 minutes on 2 idle CPU cores. It leaves in runs/demo/:
#   samples.png            rows: digits 0-9; columns: styles drawn from the prior N(0, tau^2 I) at temperatures
#                          0 (the mean style), 1, 1, 2, 2, 3, 3, 3; the same initial noise in every cell, so only the
#                          style changes along a row. The tiny model keeps its style in ~3 directions about 3x wider
#                          than the prior (summary.json: style_mu_covariance_top_eigenvalues ~10), so tau 1 changes
#                          little and tau ~3 spans the range of the training images' styles
#   samples_posterior.png  the same with styles from the aggregated posterior (the mu of random training images of
#                          each digit): slant and thickness vary, the digit stays
#   final/                 the trained model + its per-class style posterior (python sample.py --model runs/demo/final)
#   checkpoints/           resumable checkpoints (bash demo.sh --resume)
#   loss_curve.png         VAE reconstruction, diffusion loss, style KL per dimension
#   log.jsonl              every logged step and the KL diagnostics; summary.json: timings and diagnostics
set -euo pipefail
cd "$(dirname "$0")"
source .ci/venv.sh
OUT="${OUT:-runs/demo}"
start=$(date +%s)
python train.py --data digits --preset tiny --output "$OUT" \
    --vae-steps 400 --vae-batch-size 32 \
    --steps 2000 --batch-size 32 --lr 1e-3 --warmup-steps 100 --prediction-type v_prediction \
    --kl-mode capacity --capacity 0.05 --gamma 0.05 \
    --sample-every 500 --checkpoint-every 500 --grid-taus 0,1,1,2,2,3,3,3 \
    "$@"
echo "demo finished in $(( $(date +%s) - start )) s: see $OUT/samples.png, $OUT/samples_posterior.png, $OUT/loss_curve.png, $OUT/final/"
