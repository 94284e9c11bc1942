#!/usr/bin/env bash
# The README's main command: train a tiny CLUE on scikit-learn's handwritten digits, from scratch, on a CPU.
#
#   bash demo.sh                 # -> runs/demo/
#   bash demo.sh --steps 3000    # extra arguments go to train.py (later flags win)
#   OUT=runs/other bash demo.sh
#
# Phase 1 trains a tiny VAE (32 px digits -> 8x8x4 latents), phase 2 the text encoder, the U-Net and the style
# encoder with v-prediction and the objective of clue.py:
#   diffusion MSE + gamma * |KL - C| + lambda * MMD^2(styles of the batch, N(0, I))
# The capacity C = 0.1 nats per style dimension (gamma 0.2) sets how much the style may say about an image (a KL
# of ~0 would mean the style is ignored); the MMD term (lambda 0.1) keeps all training styles together shaped like
# the prior N(0, I), so that prior draws at tau 1 span the styles of the data (without it the tiny model put its
# style in ~3 directions 10x wider than the prior, and tau 1 showed little). About 14 minutes on 2 idle CPU cores
# (829 s measured; 9 on a faster pair).
# It leaves in runs/demo/:
#   samples.png            rows: digits 0-9; columns: styles drawn from the prior N(0, tau^2 I) at temperatures
#                          0 (the mean style), 1 (five draws), 2, 3; the same initial noise in every cell, so only
#                          the style changes along a row. tau 1 is the range of the training styles; tau 2-3 go
#                          beyond it (in some runs strokes thin out and digits lose their identity; in others
#                          little more changes)
#   samples_posterior.png  the same with styles from the aggregated posterior (the mu of random training images of
#                          each digit)
#   final/                 the trained model + its per-class style posterior (python sample.py --model runs/demo/final)
#   checkpoints/           resumable checkpoints (bash demo.sh --resume)
#   loss_curve.png         VAE reconstruction, diffusion loss, style KL per dimension, MMD to the prior
#   log.jsonl              every logged step and the KL diagnostics; summary.json: timings and diagnostics
set -euo pipefail
cd "$(dirname "$0")"
source .ci/venv.sh
OUT="${OUT:-runs/demo}"
start=$(date +%s)
python train.py --data digits --preset tiny --output "$OUT" \
    --vae-steps 400 --vae-batch-size 32 \
    --steps 2000 --batch-size 32 --lr 1e-3 --warmup-steps 100 --prediction-type v_prediction \
    --kl-mode capacity --capacity 0.1 --gamma 0.2 --mmd-weight 0.1 \
    --sample-every 1000 --checkpoint-every 1000 --grid-taus 0,1,1,1,1,1,2,3 \
    "$@"
echo "demo finished in $(( $(date +%s) - start )) s: see $OUT/samples.png, $OUT/samples_posterior.png, $OUT/loss_curve.png, $OUT/final/"
