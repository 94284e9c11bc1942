#!/usr/bin/env bash
# The README's main command: train a tiny CLUE on scikit-learn's handwritten digits, from scratch, on a CPU.
#
#   bash demo.sh                 # -> runs/demo/
#   bash demo.sh --steps 3000    # extra arguments go to train.py (later flags win)
#   OUT=runs/other bash demo.sh
#
# Phase 1 trains a tiny VAE (32 px digits -> 8x8x4 latents), phase 2 the U-Net and the style encoder with the
# capacity objective gamma * |KL - C| (DESIGN.md, "What a quick trial showed": beta * KL collapsed the style,
# a large KL drifted off the prior; a small fixed capacity C avoids both). About 10-15 minutes on 2 CPU cores.
# It leaves in runs/demo/:
#   samples.png          rows: digits 0-9; columns: style draws (column 1 the mean style, tau 0; the rest
#                        prior draws at tau 1), same initial noise in every cell: only the style changes
#   final/               the trained model + its per-class style posterior (python sample.py --model runs/demo/final)
#   checkpoints/         resumable checkpoints (bash demo.sh --resume)
#   loss_curve.png       VAE reconstruction, diffusion loss, style KL per dimension
#   log.jsonl            every logged step and the KL diagnostics; summary.json: timings and diagnostics
set -euo pipefail
cd "$(dirname "$0")"
source .ci/venv.sh
OUT="${OUT:-runs/demo}"
start=$(date +%s)
python train.py --data digits --preset tiny --output "$OUT" \
    --vae-steps 400 --vae-batch-size 32 \
    --steps 1500 --batch-size 32 --lr 1e-3 --warmup-steps 100 \
    --kl-mode capacity --capacity 0.05 --gamma 0.05 \
    --sample-every 500 --checkpoint-every 500 \
    "$@"
echo "demo finished in $(( $(date +%s) - start )) s: see $OUT/samples.png, $OUT/loss_curve.png, $OUT/final/"
